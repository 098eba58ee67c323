"""Persistent cost cache (SQLite): measured milliseconds, or a rejection with its reason, per key.

Keys are built by the cost model from backend, backend version, canonical subgraph, input shapes,
dtypes, strides, thread count and device. A file that is not our database (corrupt, foreign, or an
older schema) is moved aside with a warning and a fresh one is created.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CacheStats", "CachedCost", "CostCache", "cost_cache_path"]

logger = logging.getLogger(__name__)

_SCHEMA_VERSION = 1
_FILE = "costs.sqlite"


def cost_cache_path(cache_dir: str) -> Path:
    """The SQLite file of the cost cache under ``cache_dir``."""
    return Path(cache_dir).expanduser() / _FILE


@dataclass(frozen=True)
class CachedCost:
    ms: float  # median milliseconds; inf when rejected
    reason: str  # why it was rejected; empty when measured

    @property
    def ok(self) -> bool:
        return math.isfinite(self.ms)


@dataclass(frozen=True)
class CacheStats:
    """What a cost cache holds (``CostCache.stats``; ``python -m torch_collage cache``)."""

    measured: int  # candidate costs and end-to-end times measured
    rejected: int  # candidates that failed to compile or differed from eager
    outcomes: int  # stored search outcomes (refined placements, end-to-end comparisons)
    oldest: float | None  # creation time (seconds since the epoch) of the oldest entry; None if empty
    newest: float | None
    reasons: list[tuple[str, int]]  # rejection reasons, most frequent first


class CostCache:
    """``get(key)`` / ``put(key, cost)`` over ``<cache_dir>/costs.sqlite``; safe to share across threads.

    ``get_text`` / ``put_text`` keep outcomes of measured searches (the refined placement), so that a
    warm compile replays a time-budgeted refinement instead of searching on past its cold budget.
    """

    def __init__(self, cache_dir: str) -> None:
        self.path = cost_cache_path(cache_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = self._open()

    def get(self, key: str) -> CachedCost | None:
        with self._lock:
            row = self._db.execute("SELECT ms, reason FROM costs WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return CachedCost(math.inf if row[0] is None else float(row[0]), row[1] or "")

    def put(self, key: str, cost: CachedCost) -> None:
        ms = cost.ms if math.isfinite(cost.ms) else None
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO costs(key, ms, reason, created) VALUES (?, ?, ?, ?)",
                (key, ms, cost.reason, time.time()),
            )

    def get_text(self, key: str) -> str | None:
        """A stored search outcome (e.g. a refined placement), or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM outcomes WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put_text(self, key: str, value: str) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO outcomes(key, value, created) VALUES (?, ?, ?)",
                (key, value, time.time()),
            )

    def stats(self, top_reasons: int = 10) -> CacheStats:
        """Counts of what this cache holds and its ``top_reasons`` most frequent rejection reasons."""
        if top_reasons < 0:
            raise ValueError(f"top_reasons must be >= 0, got {top_reasons!r}")
        with self._lock:
            measured, rejected, lo, hi = self._db.execute(
                "SELECT COUNT(ms), COUNT(*) - COUNT(ms), MIN(created), MAX(created) FROM costs"
            ).fetchone()
            outcomes, olo, ohi = self._db.execute(
                "SELECT COUNT(*), MIN(created), MAX(created) FROM outcomes"
            ).fetchone()
            reasons = self._db.execute(
                "SELECT reason, COUNT(*) AS n FROM costs WHERE ms IS NULL GROUP BY reason "
                "ORDER BY n DESC, reason LIMIT ?",
                (top_reasons,),
            ).fetchall()
        times = [t for t in (lo, hi, olo, ohi) if t is not None]
        return CacheStats(
            int(measured),
            int(rejected),
            int(outcomes),
            min(times) if times else None,
            max(times) if times else None,
            [(str(r or "(no reason)"), int(n)) for r, n in reasons],
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_suffix(f".broken-{int(time.time())}")
            logger.warning("torch_collage: cost cache %s unreadable (%s); moved to %s", self.path, exc, aside)
            self.path.rename(aside)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS costs (key TEXT PRIMARY KEY, ms REAL, reason TEXT, created REAL)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS outcomes (key TEXT PRIMARY KEY, value TEXT, created REAL)")
            row = db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
            if row is None:
                with db:
                    db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(_SCHEMA_VERSION),))
            elif row[0] != str(_SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema {row[0]}, expected {_SCHEMA_VERSION}")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db
