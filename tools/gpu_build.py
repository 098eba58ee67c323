"""Fallback build of torch_cp's extensions without setuptools: ``torch.utils.cpp_extension.load``.

    MAX_JOBS=16 python tools/gpu_build.py [--no-cuda]

tools/gpu_check.py runs this only when ``pip install --no-build-isolation -e .`` failed (say the
machine's setuptools is older than the 77 that pyproject.toml's license string needs). It compiles
the same sources with the same flags as setup.py (csrc/*.cpp + csrc/cpu/*.cpp into ``torch_cp._C``;
csrc/cuda/*.cu into ``torch_cp._cuda`` when torch has CUDA and nvcc is found) with ninja, in
build/jit/, and copies each library next to torch_cp/__init__.py under the name Python imports
(``_C<EXT_SUFFIX>``), so that the repository on PYTHONPATH imports them. Each library defines its own
``PyInit_<name>`` (csrc/torch_cp.cpp, csrc/cuda/merge_states.cu).
"""

from __future__ import annotations

import argparse
import glob
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import CUDA_HOME, load

ROOT = Path(__file__).resolve().parents[1]


def build(name: str, sources: list[str], build_dir: Path) -> Path:
    """Compile ``sources`` into ``build_dir/<name>.so`` and copy it to torch_cp/<name><EXT_SUFFIX>."""
    start = time.perf_counter()
    build_dir.mkdir(parents=True, exist_ok=True)
    load(
        name=name,
        sources=sources,
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3"],
        build_directory=str(build_dir),
        is_python_module=False,  # loads the library (its static registrations) without importing it
        verbose=True,
    )
    built = build_dir / f"{name}.so"
    if not built.is_file():
        raise FileNotFoundError(f"cpp_extension.load reported success but {built} is missing")
    target = ROOT / "torch_cp" / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    shutil.copy2(built, target)
    print(f"built {target.relative_to(ROOT)} in {time.perf_counter() - start:.0f} s", flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-cuda", action="store_true", help="build torch_cp._C only")
    args = p.parse_args(argv)
    cpu = sorted(glob.glob(str(ROOT / "csrc" / "*.cpp")) + glob.glob(str(ROOT / "csrc" / "cpu" / "*.cpp")))
    build("_C", cpu, ROOT / "build" / "jit" / "_C")
    if args.no_cuda:
        return 0
    if torch.version.cuda is None or CUDA_HOME is None:
        print(f"torch_cp._cuda: skipped: torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}")
        return 0
    cuda = sorted(
        glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")) + glob.glob(str(ROOT / "csrc" / "cuda" / "*.cpp"))
    )
    build("_cuda", cuda, ROOT / "build" / "jit" / "_cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
