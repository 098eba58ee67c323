"""The one backend registry: the built-in backends (each module of this package exports its ``SPEC``),
user registrations, and the ``torch_collage.backends`` entry points.

A backend is a ``BackendSpec``: what the search may place on it, and how it compiles a partition.
Where it also runs whole modules, ``get_backend(name, **options)`` builds its runner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from torch_collage.backends.base import Backend, BackendInfo, BackendSpec

__all__ = [
    "CPU_BACKENDS",
    "ENTRY_POINT_GROUP",
    "GPU_BACKENDS",
    "check_names",
    "get_backend",
    "get_spec",
    "list_backends",
    "register_backend",
    "registered_backend",
    "registered_names",
    "unregister_backend",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "torch_collage.backends"
# Built-in backends: the module ``torch_collage.backends.<name>`` exports ``SPEC``. The GPU ones are
# listed everywhere and placed only where available (CUDA and their packages).
CPU_BACKENDS = ("eager", "inductor", "onnxruntime", "openvino")
GPU_BACKENDS = ("tensorrt", "cutlass", "triton", "onnxruntime_cuda")

_SPECS: dict[str, BackendSpec] = {}
_LOCK = threading.RLock()
_loaded = False


def register_backend(name: str | BackendSpec, **fields: Any) -> BackendSpec:
    """Register a backend: ``register_backend(spec)`` or ``register_backend("name", compile=..., ...)``
    with the fields of ``BackendSpec``. A name already registered raises ``ValueError``."""
    if isinstance(name, BackendSpec) and fields:
        raise TypeError("pass either a BackendSpec or a name with fields, not both")
    spec = name if isinstance(name, BackendSpec) else BackendSpec(name=name, **fields)
    _ensure_loaded()
    with _LOCK:
        _add(spec)
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


def check_names(names: Iterable[str], option: str = "backends") -> None:
    """Every name in ``names`` must be registered (available or not: that is decided when placing);
    else ``ValueError`` naming the unknown ones, the ``option`` they came from and the valid names."""
    known = registered_names()
    unknown = [b for b in names if b not in known]
    if unknown:
        raise ValueError(
            f"unknown backend(s) {unknown} in option {option!r}; valid backends: {', '.join(known)}"
        )


def list_backends() -> dict[str, BackendInfo]:
    """Every registered backend with whether it is available on this machine and, if not, why."""
    _ensure_loaded()
    return {name: _info(spec) for name, spec in list(_SPECS.items())}


def get_backend(name: str, **options: Any) -> Backend:
    """A fresh whole-module runner of backend ``name`` configured with ``options`` (its dataclass
    fields), e.g. ``get_backend("onnxruntime", allow_spinning=True)`` or ``get_backend("inductor",
    freezing=True)``. Unknown names, backends without a runner and unknown options raise ``ValueError``."""
    factory = get_spec(name).runner
    if factory is None:
        raise ValueError(f"backend {name!r} places partitions only; it has no whole-module runner")
    valid: set[str] = (
        {f.name for f in dataclasses.fields(factory)} if dataclasses.is_dataclass(factory) else set()
    )
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for backend {name!r}; valid options: {sorted(valid)}")
    return factory(**options)


def _add(spec: BackendSpec) -> None:
    if spec.name in _SPECS:
        raise ValueError(f"backend {spec.name!r} is already registered; unregister it first")
    _SPECS[spec.name] = spec


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
        for name in (*CPU_BACKENDS, *GPU_BACKENDS):
            _add(importlib.import_module(f"torch_collage.backends.{name}").SPEC)
        _load_entry_points()


def _load_entry_points() -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            spec = obj() if callable(obj) and not isinstance(obj, BackendSpec) else obj
            if not isinstance(spec, BackendSpec):
                raise TypeError(
                    f"expected a BackendSpec (or a callable returning one), got {type(spec).__name__}"
                )
            _add(spec)
        except Exception as exc:
            logger.warning("torch_collage: backend entry point %r not loaded: %s", ep.name, exc)
