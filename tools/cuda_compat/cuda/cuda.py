"""``cuda.cuda`` (cuda-python 12): the driver API of cuda-bindings 13 (see __init__.py)."""

from cuda.bindings.driver import *  # noqa: F403
