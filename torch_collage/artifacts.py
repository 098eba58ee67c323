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
Processes share the store: [Note: sharing the compiled store].
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch_collage.once import warn_once

__all__ = ["ArtifactStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_DIR = "compiled"
_TMP = ".tmp-"
_STALE_S = 3600.0  # a temporary directory this old belongs to a process that died


# [Note: sharing the compiled store]
# Processes compiling the same model at once share <cache_dir>/compiled. Every change to it is one
# rename: an entry is written to a temporary directory (.tmp-<key>-<random>) and renamed to <key>;
# when two processes save the same key, the first rename wins and the loser, whose rename fails
# because <key> is there, discards its copy. An entry is deleted (discarded, or pruned) by renaming it
# to a temporary name first, so a reader finds all of an entry or none of it. A load that fails
# because the entry was removed or replaced while it read (another inode at <key>, or none) is not
# damage: it compiles, and leaves the entry alone. A store that cannot be written (read-only
# directory or file system, a cache_dir below a regular file) is still read; saving is off for the
# process, said once per directory at WARNING. A partition larger than the whole store is not saved
# (saving it would evict every other entry, then itself); said once per directory.


class ArtifactStore:
    """``load(key, loader)`` / ``save(key, saver)`` over ``<cache_dir>/compiled``, at most ``max_mb``;
    safe to share across processes ([Note: sharing the compiled store])."""

    def __init__(self, cache_dir: str, max_mb: int) -> None:
        if max_mb < 0:
            raise ValueError(f"max_mb must be >= 0, got {max_mb}")
        self.root = Path(cache_dir).expanduser() / _DIR
        self.max_bytes = max_mb * 1024 * 1024
        self.unwritable = ""  # why nothing can be saved under root; empty while saving works

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def load(self, key: str, loader: Callable[[Path], T]) -> T | None:
        """``loader(directory)`` of the entry ``key``; None when there is none or it cannot be loaded
        (then it is deleted, with a warning)."""
        path = self.root / key
        before = _stat_dir(path) if self.enabled else None
        if before is None:
            return None
        try:
            value = loader(path)
        except Exception as exc:  # a stale or damaged entry: compile again
            if not _same_entry(path, before):
                logger.debug("torch_collage: saved partition %s was replaced while loading (%s)", path, exc)
                return None
            logger.warning("torch_collage: saved partition %s unusable (%s); compiling again", path, exc)
            self.discard(key)
            return None
        _touch(path)
        return value

    def save(self, key: str, saver: Callable[[Path], bool]) -> bool:
        """Write the entry ``key`` with ``saver(directory)`` (False: nothing to save); True if saved.
        Not saved either when the entry is there already, when it is larger than the whole store, or
        when the store cannot be written. Failures are logged, never raised: the compiled partition
        works without its copy on disk."""
        if not self.enabled or self.unwritable or self._has(key):
            return False
        tmp = self._temporary(key)
        if tmp is None:
            return False
        try:
            saved = self._fill(tmp, saver) and self._publish(tmp, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if saved:
            self.prune()
        return saved

    def discard(self, key: str) -> None:
        _remove(self.root / key)

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
            _remove(path)
            total -= size

    def _has(self, key: str) -> bool:
        path = self.root / key
        if _stat_dir(path) is not None:
            return True
        if path.exists():  # a file where an entry belongs: damaged
            _remove(path)
        return False

    def _temporary(self, key: str) -> Path | None:
        tmp = self.root / f"{_TMP}{key}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            self.unwritable = str(exc)
            warn_once(
                logger,
                self.root,
                "unwritable",
                "torch_collage: compiled partitions cannot be saved under %s (%s); they are compiled, "
                "not saved",
                self.root,
                exc,
            )
            return None
        return tmp

    def _fill(self, tmp: Path, saver: Callable[[Path], bool]) -> bool:
        """``saver(tmp)``, and whether what it wrote fits in the store."""
        try:
            if not saver(tmp):
                return False
        except Exception as exc:  # e.g. a full disk: said once per kind of failure, then DEBUG
            warn_once(
                logger,
                self.root,
                f"saver {type(exc).__name__}",
                "torch_collage: could not save a compiled partition under %s: %s: %s",
                self.root,
                type(exc).__name__,
                exc,
            )
            return False
        size = _size_of(tmp)
        if size > self.max_bytes:
            warn_once(
                logger,
                self.root,
                "oversize",
                "torch_collage: a compiled partition of %.1f MiB is larger than the whole store under %s "
                "(compiled_cache_mb=%d); not saved",
                size / 2**20,
                self.root,
                self.max_bytes // 2**20,
            )
            return False
        return True

    def _publish(self, tmp: Path, key: str) -> bool:
        """Rename ``tmp`` to the entry ``key``; False if another process published it first."""
        try:
            os.rename(tmp, self.root / key)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # else: lost the race, no matter
                logger.warning(
                    "torch_collage: could not save a compiled partition under %s: %s", self.root, exc
                )
            return False
        return True

    def _remove_stale_temporaries(self) -> None:
        """Temporary directories left by a process that died while saving."""
        for path in self.root.glob(f"{_TMP}*"):
            try:
                if time.time() - path.stat().st_mtime > _STALE_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:  # removed meanwhile
                continue

    def _entries(self) -> list[tuple[Path, float, int]]:
        try:
            paths = [p for p in self.root.iterdir() if not p.name.startswith(_TMP)]
        except OSError:  # no store, or an unreadable one
            return []
        out = []
        for path in paths:
            st = _stat_dir(path)
            if st is not None:
                out.append((path, st.st_mtime, _size_of(path)))
        return out


def _size_of(directory: Path) -> int:
    """Bytes of the files under ``directory``; what is deleted meanwhile counts as nothing."""
    total = 0
    for parent, _, names in os.walk(directory):  # os.walk skips directories it cannot list
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


def _stat_dir(path: Path) -> os.stat_result | None:
    """``path``'s stat if it is a directory, else None (missing, a file, or not readable)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISDIR(st.st_mode) else None


def _same_entry(path: Path, before: os.stat_result) -> bool:
    now = _stat_dir(path)
    return now is not None and _identity(now) == _identity(before)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """A directory's identity: its inode, and its change time to tell a new entry from an old one
    whose inode number the file system gave again (renaming a directory sets its change time)."""
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _remove(path: Path) -> None:
    """Delete an entry, renamed out of sight first so that a reader finds all of it or none."""
    trash = path.with_name(f"{_TMP}removed-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except OSError:
        return  # removed by another process already, or the store is read-only
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def _touch(path: Path) -> None:
    try:
        now = time.time()
        os.utime(path, (now, now))
    except OSError:
        pass
