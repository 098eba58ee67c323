"""The ``cuda`` package as cuda-python 12 laid it out, over cuda-bindings 13: a shim for CUTLASS.

nvidia-cutlass 4.2.0.0 (the newest on PyPI) imports ``cuda.cuda`` and ``cuda.cudart`` and reads
``cuda.__version__``; cuda-bindings 13 (on the GPU machine, with nvcc 13.0) removed those modules and
made ``cuda`` a namespace package, and cuda-python 12 (which has them) fails CUTLASS's check that the
Python CUDA version is at least nvcc's. tools/gpu_check.py puts the folder above this one first on
PYTHONPATH only when CUTLASS is carried and ``import cuda.cuda`` fails there, and says so in its log.
Each module re-exports its cuda.bindings counterpart, as cuda-python 12's own shims did.
"""

import importlib.metadata
import pkgutil

__path__ = pkgutil.extend_path(__path__, __name__)  # cuda.bindings, cuda.core, cuda.pathfinder stay visible

try:
    __version__ = importlib.metadata.version("cuda-bindings")
except importlib.metadata.PackageNotFoundError:
    __version__ = "0"
