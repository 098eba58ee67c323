"""``cuda.cudart`` (cuda-python 12): the runtime API of cuda-bindings 13 (see __init__.py)."""

from cuda.bindings.runtime import *  # noqa: F403
