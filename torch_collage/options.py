"""Options of ``torch.compile(model, backend="collage", options={...})``, parsed into a frozen dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch_collage.backends.base import CACHE_ENV, default_cache_dir

__all__ = ["CACHE_ENV", "CollageOptions", "default_cache_dir"]


@dataclass(frozen=True, kw_only=True)
class CollageOptions:
    """What Collage searches over and how carefully it measures. Times in seconds unless named ``_ms``."""

    backends: tuple[str, ...] = ()  # backends to place on; empty: every available registered backend
    time_budget_s: float = 300.0  # wall-clock cap on measuring candidates (and on refinement)
    max_depth: int = 3  # most ATen ops one candidate subgraph may hold (the whole graph is always tried too)
    search: Literal["dp", "dp+refine"] = "dp"  # exact DP only, or DP then measured local refinement
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
        _check_choice("search", self.search, ("dp", "dp+refine"))
        _check_choice("on_backend_failure", self.on_backend_failure, ("fallback", "raise"))
        for name in ("time_budget_s", "rtol", "atol"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.compiled_cache_mb < 0:
            raise ValueError(f"compiled_cache_mb must be >= 0, got {self.compiled_cache_mb!r}")
        for name in ("max_depth", "repeats", "max_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.segments < 0 or self.segments == 1:
            raise ValueError(f"segments must be 0 (off) or >= 2, got {self.segments!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads!r}")

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
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
