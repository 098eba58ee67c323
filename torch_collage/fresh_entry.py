"""A caller of a model with a code object of its own, so that dynamo compiles it afresh."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

__all__ = ["fresh_entry"]

_ENTRY_IDS = itertools.count()


# [Note: one code object per compile]
# Dynamo keeps compiled code, and counts recompiles (limit 8), per Python code object. Compiled
# through `module.forward`, every instance of a class shares one; frozen graphs guard on their
# parameters' identity, so the 9th instance of a class compiled with freezing silently ran eager,
# and the frozen weights of the 8 before stayed alive in the cache. Calling the module from a
# function whose code object is new per compile gives each compile its own cache, freed with it.
# (Graph breaks inside the module still resume in the class's own code.) It also makes
# `torch._dynamo.reset()` unnecessary for a fresh compile: a reset throws away every compiled
# model's code, and one compiled with Inductor's freezing then re-traces, unfrozen, on its next
# call ([Note: freezing needs the global flag] in backends/inductor.py).
def fresh_entry(model: Callable[..., Any], prefix: str = "collage_entry") -> Callable[..., Any]:
    """``lambda *args: model(*args)`` with a code object named ``<prefix>_<n>``, new per call."""

    def entry(*args: Any) -> Any:
        return model(*args)

    entry.__code__ = entry.__code__.replace(co_name=f"{prefix}_{next(_ENTRY_IDS)}")
    return entry
