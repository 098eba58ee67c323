"""``cuda.nvrtc`` (cuda-python 12): NVRTC of cuda-bindings 13 (see __init__.py)."""

from cuda.bindings.nvrtc import *  # noqa: F403
