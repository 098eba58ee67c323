"""Compiled partitions on disk, so that a warm compile loads what a cold one compiled.

[Note: compiled artifacts]
With every cost cached, a warm compile still compiled the partitions of its placement, and that was
most of it: OpenVINO's export, conversion and compilation of the whole graph took 4.0 s of bert's
4.2 s warm compile and 18.6 s of mmt's (against a warm target of 10% of cold). A backend that can
save what it compiled (``BackendSpec.save`` / ``BackendSpec.load``; OpenVINO saves the compiled
model's blob, which imports in 0.25 s for mmt) does so for each partition of the placement it runs,
under ``<cache_dir>/compiled/<key>/``, and a warm compile loads it instead of compiling.

The key is the cost key (backend and version, canonical subgraph, input signature, threads, device)
plus a digest of the subgraph's constants' values: frozen weights are baked into the saved model,
and the cost key only knows their shapes. A loaded partition is checked against eager like a freshly
compiled one; one that fails to load or to match is deleted with a warning and compiled again. An
entry is written to a temporary directory and renamed into place, so a reader never sees half of
one. The directory is kept under ``compiled_cache_mb`` by deleting the least recently used entries.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["ArtifactStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_DIR = "compiled"
_TMP = ".tmp-"
_STALE_S = 3600.0  # a temporary directory this old belongs to a process that died


class ArtifactStore:
    """``load(key, loader)`` / ``save(key, saver)`` over ``<cache_dir>/compiled``, at most ``max_mb``."""

    def __init__(self, cache_dir: str, max_mb: int) -> None:
        if max_mb < 0:
            raise ValueError(f"max_mb must be >= 0, got {max_mb}")
        self.root = Path(cache_dir).expanduser() / _DIR
        self.max_bytes = max_mb * 1024 * 1024

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def load(self, key: str, loader: Callable[[Path], T]) -> T | None:
        """``loader(directory)`` of the entry ``key``; None when there is none or it cannot be loaded
        (then it is deleted, with a warning)."""
        path = self.root / key
        if not self.enabled or not path.is_dir():
            return None
        try:
            value = loader(path)
        except Exception as exc:  # a stale or damaged entry: compile again
            logger.warning("torch_collage: saved partition %s unusable (%s); compiling again", path, exc)
            self.discard(key)
            return None
        _touch(path)
        return value

    def save(self, key: str, saver: Callable[[Path], bool]) -> bool:
        """Write the entry ``key`` with ``saver(directory)`` (False: nothing to save); True if saved.
        Failures are logged, never raised: the compiled partition works without its copy on disk."""
        if not self.enabled or (self.root / key).is_dir():
            return False
        tmp = self.root / f"{_TMP}{key}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            if not saver(tmp):
                return False
            os.replace(tmp, self.root / key)
        except OSError as exc:
            if (self.root / key).is_dir():  # another process saved it first
                return False
            logger.warning("torch_collage: could not save a compiled partition under %s: %s", self.root, exc)
            return False
        except Exception as exc:
            logger.warning(
                "torch_collage: saving a compiled partition failed: %s: %s", type(exc).__name__, exc
            )
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.prune()
        return True

    def discard(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)

    def size_bytes(self) -> int:
        return sum(size for _, _, size in self._entries())

    def count(self) -> int:
        """Saved partitions in the store."""
        return len(self._entries())

    def prune(self) -> None:
        """Delete least recently used entries until the store fits in ``max_bytes``."""
        self._remove_stale_temporaries()
        entries = sorted(self._entries(), key=lambda e: e[1])  # oldest use first
        total = sum(size for _, _, size in entries)
        for path, _, size in entries:
            if total <= self.max_bytes:
                break
            shutil.rmtree(path, ignore_errors=True)
            total -= size

    def _remove_stale_temporaries(self) -> None:
        """Temporary directories left by a process that died while saving."""
        if not self.root.is_dir():
            return
        for path in self.root.glob(f"{_TMP}*"):
            try:
                if time.time() - path.stat().st_mtime > _STALE_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                continue

    def _entries(self) -> list[tuple[Path, float, int]]:
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.iterdir():
            if not path.is_dir() or path.name.startswith(_TMP):
                continue
            try:
                files = [f for f in path.rglob("*") if f.is_file()]
                out.append((path, path.stat().st_mtime, sum(f.stat().st_size for f in files)))
            except OSError:  # deleted meanwhile by another process
                continue
        return out


def _touch(path: Path) -> None:
    try:
        now = time.time()
        os.utime(path, (now, now))
    except OSError:
        pass
