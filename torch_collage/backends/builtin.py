"""The built-in CPU backends by name. (The full registry, with capability specs and entry points,
comes later; this is the name -> default-constructed backend lookup that it will build on.)"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from torch_collage.backends.base import Backend
from torch_collage.backends.eager import EagerBackend
from torch_collage.backends.inductor import InductorBackend
from torch_collage.backends.onnxruntime import OnnxRuntimeBackend
from torch_collage.backends.openvino import OpenVinoBackend

__all__ = ["BUILTIN_BACKENDS", "get_backend"]

BUILTIN_BACKENDS: Mapping[str, Callable[..., Backend]] = MappingProxyType(
    {
        "eager": EagerBackend,
        "inductor": InductorBackend,
        "inductor_freezing": functools.partial(InductorBackend, freezing=True),
        "onnxruntime": OnnxRuntimeBackend,
        "openvino": OpenVinoBackend,
    }
)


def get_backend(name: str, **options: Any) -> Backend:
    """A fresh backend ``name`` configured with ``options`` (its dataclass fields), e.g.
    ``get_backend("onnxruntime", allow_spinning=True)``. Unknown names or options raise ``ValueError``."""
    try:
        factory = BUILTIN_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; valid names: {', '.join(BUILTIN_BACKENDS)}") from None
    cls = factory.func if isinstance(factory, functools.partial) else factory
    valid = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for backend {name!r}; valid options: {sorted(valid)}")
    return factory(**options)
