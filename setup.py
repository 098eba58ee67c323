"""Builds the torch_cp kernels in csrc/: a C++ CPU extension always, a CUDA one when possible.

Build without isolation so the installed torch is used: `pip install --no-build-isolation -e .`
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CXX_FLAGS = ["-O3", "-fopenmp"]
NVCC_FLAGS = ["-O3"]


def _want_cuda() -> bool:
    if os.environ.get("TORCH_CP_BUILD_CUDA", "auto") == "0":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def extensions() -> list:
    exts = [
        CppExtension(
            "torch_cp._C",
            sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ]
    if _want_cuda():
        exts.append(
            CUDAExtension(
                "torch_cp._cuda",
                sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
                extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS},
            )
        )
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
