"""Options of ``torch.compile(model, backend="collage", options={...})``, parsed into a frozen dataclass."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch_collage.backends.base import CACHE_ENV, default_cache_dir

__all__ = ["CACHE_ENV", "CollageOptions", "default_cache_dir"]


@dataclass(frozen=True, kw_only=True)
class CollageOptions:
    """What Collage searches over and how carefully it measures. Times in seconds unless named ``_ms``."""

    backends: tuple[str, ...] = ()  # backends to place on; empty: every available registered backend
    # wall-clock cap on placing one graph: measuring, merging, refinement, the end-to-end check
    # (timing.py's [Note: the compile budget]); 50 s keeps a cold compile with dynamo's capture
    # under a minute; a training step places two graphs; inf: no cap
    time_budget_s: float = 50.0
    max_depth: int = 3  # most ATen ops one candidate subgraph may hold (the whole graph is always tried too)
    search: Literal["dp", "dp+refine"] = "dp"  # exact DP only, or DP then measured local refinement
    # "search": mixes of backends over subgraphs; "fast": the whole graph on the fastest single backend
    # (a few compiles per graph, no subgraph candidates)
    mode: Literal["search", "fast"] = "search"
    verify: bool = True  # check the assembled module against eager on random inputs before using it
    on_backend_failure: Literal["fallback", "raise"] = (
        "fallback"  # a failing candidate: infinite cost or raise
    )
    cache_dir: str = field(default_factory=default_cache_dir)  # where the SQLite cost cache lives
    compiled_cache_mb: int = 2048  # compiled partitions kept under cache_dir/compiled (0: none); LRU
    threads: int | None = None  # torch/runtime threads while timing; None: torch.get_num_threads()
    warmup: int = 2  # untimed calls before timing a candidate
    repeats: int = 15  # timed calls per candidate (median of them is its cost)
    rtol: float = 1e-3  # tolerance of a candidate's outputs against eager's
    atol: float = 1e-4
    max_candidates: int = 400  # most candidates measured per graph (beyond it, larger ones are dropped)
    segments: int = 0  # also try intervals between K-1 cuts as candidates (0: none); [Note: coarse segments]
    progress: bool = True  # tqdm progress bar on searches that measure many candidates
    freeze: bool = True  # inference graphs: parameters become constants, re-placed if they change

    def __post_init__(self) -> None:
        if isinstance(self.backends, str) or not all(isinstance(b, str) for b in self.backends):
            raise ValueError(f"backends must be a list of backend names, got {self.backends!r}")
        object.__setattr__(self, "backends", tuple(self.backends))
        if not isinstance(self.cache_dir, (str, os.PathLike)):
            raise TypeError(
                f"cache_dir must be a path, got {type(self.cache_dir).__name__} {self.cache_dir!r}"
            )
        object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        _check_choice("search", self.search, ("dp", "dp+refine"))
        _check_choice("mode", self.mode, ("search", "fast"))
        _check_choice("on_backend_failure", self.on_backend_failure, ("fallback", "raise"))
        for name in ("verify", "progress", "freeze"):
            _check_bool(name, getattr(self, name))
        _check_number("time_budget_s", self.time_budget_s, low=0.0, allow_inf=True)
        _check_number("rtol", self.rtol, low=0.0)
        _check_number("atol", self.atol, low=0.0)
        for name in ("max_depth", "repeats", "max_candidates"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("warmup", self.warmup, low=0)
        _check_int("compiled_cache_mb", self.compiled_cache_mb, low=0)
        _check_int("segments", self.segments, low=0)
        if self.segments == 1:
            raise ValueError("segments must be 0 (off) or >= 2, got 1")
        if self.threads is not None:
            _check_int("threads", self.threads, low=1, what="an int >= 1 or None")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> CollageOptions:
        """Parse ``torch.compile``'s ``options``; unknown keys raise ``ValueError``. Backend names are
        checked where a compile starts (``backends.registry.check_names``): parsing loads no backend."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown collage option(s) {unknown}; valid options: {', '.join(valid)}")
        return cls(**options)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):  # "false" and "no" are truthy strings
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _check_int(name: str, value: object, *, low: int, what: str | None = None) -> None:
    what = what or f"an int >= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _check_number(name: str, value: object, *, low: float, allow_inf: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= {low}, got {type(value).__name__} {value!r}")
    if math.isnan(value) or (math.isinf(value) and not allow_inf) or value < low:
        finite = "" if allow_inf else "finite "
        raise ValueError(f"{name} must be a {finite}number >= {low}, got {value!r}")
