"""The backend registry: built-ins, user registrations, and the ``torch_collage.backends`` entry points."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import threading
from collections.abc import Iterator
from typing import Any

from torch_collage.spec import BackendInfo, BackendSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "get_spec",
    "list_backends",
    "register_backend",
    "registered_backend",
    "registered_names",
    "unregister_backend",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "torch_collage.backends"
_SPECS: dict[str, BackendSpec] = {}
_LOCK = threading.Lock()
_loaded = False


def register_backend(name: str | BackendSpec, **fields: Any) -> BackendSpec:
    """Register a backend: ``register_backend(spec)`` or ``register_backend("name", compile=..., ...)``
    with the fields of ``BackendSpec``. A name already registered raises ``ValueError``."""
    _ensure_loaded()
    spec = name if isinstance(name, BackendSpec) else BackendSpec(name=name, **fields)
    if isinstance(name, BackendSpec) and fields:
        raise TypeError("pass either a BackendSpec or a name with fields, not both")
    with _LOCK:
        if spec.name in _SPECS:
            raise ValueError(f"backend {spec.name!r} is already registered; unregister it first")
        _SPECS[spec.name] = spec
    return spec


def unregister_backend(name: str) -> None:
    """Remove ``name``; unknown names raise ``ValueError`` listing the registered ones."""
    _ensure_loaded()
    with _LOCK:
        if name not in _SPECS:
            raise ValueError(f"unknown backend {name!r}; registered backends: {', '.join(_SPECS)}")
        del _SPECS[name]


@contextlib.contextmanager
def registered_backend(name: str | BackendSpec, **fields: Any) -> Iterator[BackendSpec]:
    """Register a backend for the duration of a ``with`` block (for tests and experiments)."""
    spec = register_backend(name, **fields)
    try:
        yield spec
    finally:
        unregister_backend(spec.name)


def get_spec(name: str) -> BackendSpec:
    """The spec registered as ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    _ensure_loaded()
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(_SPECS)}") from None


def registered_names() -> tuple[str, ...]:
    _ensure_loaded()
    return tuple(_SPECS)


def list_backends() -> dict[str, BackendInfo]:
    """Every registered backend with whether it is available on this machine and, if not, why."""
    _ensure_loaded()
    return {name: _info(spec) for name, spec in list(_SPECS.items())}


def _info(spec: BackendSpec) -> BackendInfo:
    try:
        ok, reason = spec.available()
        version = spec.version() if ok else ""
    except Exception as exc:  # a broken plug-in must not break listing the others
        ok, reason, version = False, f"availability check failed: {type(exc).__name__}: {exc}", ""
    return BackendInfo(spec.name, bool(ok), "" if ok else (reason or "unavailable"), spec.fusion, version)


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    with _LOCK:
        if _loaded:
            return
        _loaded = True
        from torch_collage.builtin_specs import builtin_specs

        for spec in builtin_specs():
            _SPECS[spec.name] = spec
    _load_entry_points()


def _load_entry_points() -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            spec = obj() if callable(obj) and not isinstance(obj, BackendSpec) else obj
            register_backend(spec)
        except Exception as exc:
            logger.warning("torch_collage: backend entry point %r not loaded: %s", ep.name, exc)
