"""Persistent cost cache (SQLite): measured milliseconds, or a rejection with its reason, per key.

Keys are built by the cost model from backend, backend version, canonical subgraph, input shapes,
dtypes, strides, thread count and device. Many processes may share one cache directory, and the
directory may be read-only or hold a file this code cannot use: see [Note: sharing the cost cache].
Nothing here raises into a compile; the worst case is a process that runs on an in-memory cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torch_collage.once import warn_once

__all__ = ["HIGH_SPREAD", "CacheStats", "CachedCost", "CostCache", "cost_cache_path"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_SCHEMA_VERSION = 1
HIGH_SPREAD = 0.25  # a cost whose repeats' IQR exceeds this share of their median: [Note: quiet measurements]
_FILE = "costs.sqlite"
_SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database
_BUSY_TIMEOUT_S = 10.0  # default: how long one statement waits for another process's lock
_ATTEMPTS = 3  # tries of a statement that failed for a transient reason (locked, busy, I/O)
_TRANSIENT = {5, 6, 10}  # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR (primary result codes)
_NOTADB = 26
_TABLES = {
    "meta": "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)",
    "costs": "CREATE TABLE IF NOT EXISTS costs "
    "(key TEXT PRIMARY KEY, ms REAL, reason TEXT, created REAL, spread REAL, label TEXT)",
    "outcomes": "CREATE TABLE IF NOT EXISTS outcomes (key TEXT PRIMARY KEY, value TEXT, created REAL)",
}
# columns of ``costs`` added after schema version 1 was written: a file without them gets them when
# opened (ALTER TABLE, NULL in old rows), and one that cannot (read-only) is read without them
_ADDED_COLUMNS = {"spread": "REAL", "label": "TEXT"}
_GET = "SELECT ms, reason, spread, label FROM costs WHERE key = ?"
_GET_OLD = "SELECT ms, reason FROM costs WHERE key = ?"
_PUT = "INSERT OR REPLACE INTO costs(key, ms, reason, created, spread, label) VALUES (?, ?, ?, ?, ?, ?)"
_PUT_OLD = "INSERT OR REPLACE INTO costs(key, ms, reason, created) VALUES (?, ?, ?, ?)"

# [Note: sharing the cost cache]
# Every compile opens <cache_dir>/costs.sqlite, often many processes at once (one worker per GPU, a
# test runner's workers). The protocol:
# * Opening reads the schema version and writes nothing. Only a file that lacks the version row, a
#   table or a column added since (``_ADDED_COLUMNS``) is set up, in one BEGIN IMMEDIATE transaction
#   (one writer at a time) that reads the version again, then CREATE TABLE IF NOT EXISTS, ALTER TABLE
#   ADD COLUMN for the columns still missing and INSERT OR IGNORE: processes setting up a fresh file
#   at once all succeed, in any order. Added columns keep the schema version: an older torch_collage
#   names the columns it writes and reads, so it still shares the file. A file of the old layout that
#   cannot be written is read without the added columns.
# * Statements autocommit, each waits up to _BUSY_TIMEOUT_S for another process's lock, and one that
#   still fails for a transient reason (locked, busy, I/O error) is tried _ATTEMPTS times. A write
#   that fails anyway is kept in memory for the rest of the process (one warning); a read that fails
#   is a miss.
# * The journal stays SQLite's default rollback journal: WAL needs shared memory, which network file
#   systems lack, and a writable directory even to read.
# * A file is moved aside (costs.sqlite.broken-<time>-<pid>) only when it is positively not a
#   database: SQLite says so and its first bytes are not SQLite's header, read again under an
#   exclusive lock on costs.sqlite.lock that every process setting a file aside takes. A locking error, an I/O
#   error or damage inside a database never moves it: other processes may be using it.
# * A database this code cannot use is left byte for byte as it is and the process runs on an
#   in-memory cache: one written by another schema version (a newer torch_collage), a foreign one
#   (tables, none of them ours), a damaged one, or a directory that cannot be created. A database
#   that can be read but not written (read-only directory or file system) is still read.
#   Each of these is one WARNING per path and reason per process, naming both; repeats are DEBUG.
# * Rows are checked as they are read: one that does not parse (text where milliseconds belong, a
#   NULL reason, a missing column) is a miss, counted in ``CostCache.skipped`` and in
#   ``CacheStats.unreadable``; the next measurement of its key overwrites it.


def cost_cache_path(cache_dir: str) -> Path:
    """The SQLite file of the cost cache under ``cache_dir``."""
    return Path(cache_dir).expanduser() / _FILE


@dataclass(frozen=True)
class CachedCost:
    ms: float  # median milliseconds; inf when rejected
    reason: str  # why it was rejected; empty when measured
    # interquartile range of the timed repeats over their median ([Note: quiet measurements])
    spread: float = 0.0
    label: str = ""  # what was measured, for people: "backend: N ops (first op, ...)"

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
    unreadable: int = 0  # rows that do not parse (damaged); read as misses
    degraded: str = ""  # why the file is not used, or not written; empty when it is used normally
    # measured costs whose repeats spread more than ``HIGH_SPREAD`` (timing.py), widest first
    high_spread: list[CachedCost] = field(default_factory=list)


class _Unusable(Exception):
    """The file cannot be this cache; the message says why."""


class CostCache:
    """``get(key)`` / ``put(key, cost)`` over ``<cache_dir>/costs.sqlite``; safe to share across threads
    and processes ([Note: sharing the cost cache]).

    ``get_text`` / ``put_text`` keep outcomes of measured searches (the refined placement), so that a
    warm compile replays a time-budgeted refinement instead of searching on past its cold budget.
    """

    def __init__(self, cache_dir: str, *, busy_timeout_s: float = _BUSY_TIMEOUT_S) -> None:
        if not busy_timeout_s >= 0:
            raise ValueError(f"busy_timeout_s must be >= 0, got {busy_timeout_s!r}")
        self.path = cost_cache_path(cache_dir)
        self.busy_timeout_s = busy_timeout_s  # how long a statement waits for another process's lock
        self.skipped = 0  # rows or reads that failed to parse in this process, taken as misses
        self.degraded = ""  # why the file is not used, or not written; empty when it is
        self._lock = threading.Lock()
        self._memory = _connect_memory()  # what the file cannot take
        self._old_layout = False  # the file lacks ``_ADDED_COLUMNS`` and could not get them
        self._file: sqlite3.Connection | None = self._open()

    def get(self, key: str) -> CachedCost | None:
        row = self._read(_GET, key)
        return None if row is None else self._parsed(key, _cost_of(row))

    def put(self, key: str, cost: CachedCost) -> None:
        ms = cost.ms if math.isfinite(cost.ms) else None
        spread = cost.spread if math.isfinite(cost.spread) else None
        self._write(_PUT, (key, ms, cost.reason, time.time(), spread, cost.label))

    def get_text(self, key: str) -> str | None:
        """A stored search outcome (e.g. a refined placement), or None."""
        row = self._read("SELECT value FROM outcomes WHERE key = ?", key)
        return None if row is None else self._parsed(key, _text_of(row))

    def put_text(self, key: str, value: str) -> None:
        self._write(
            "INSERT OR REPLACE INTO outcomes(key, value, created) VALUES (?, ?, ?)", (key, value, time.time())
        )

    def stats(self, top_reasons: int = 10) -> CacheStats:
        """Counts of what this cache holds and its ``top_reasons`` most frequent rejection reasons."""
        if top_reasons < 0:
            raise ValueError(f"top_reasons must be >= 0, got {top_reasons!r}")
        with self._lock:
            tiers = [_tier_stats(db) for db in self._tiers()]
        reasons: Counter[str] = sum((t.reasons for t in tiers), Counter())
        times = [x for t in tiers for x in t.times]
        wide = sorted((c for t in tiers for c in t.high_spread), key=lambda c: -c.spread)
        return CacheStats(
            sum(t.measured for t in tiers),
            sum(t.rejected for t in tiers),
            sum(t.outcomes for t in tiers),
            min(times) if times else None,
            max(times) if times else None,
            sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:top_reasons],
            sum(t.unreadable for t in tiers),
            self.degraded,
            wide,
        )

    def close(self) -> None:
        with self._lock:
            for db in self._tiers():
                db.close()

    # -- reading and writing --------------------------------------------------------------------

    def _for(self, db: sqlite3.Connection, sql: str) -> str:
        """``sql``, or its form without the added columns for a file of the old layout."""
        if db is self._memory or not self._old_layout:
            return sql
        return {_GET: _GET_OLD, _PUT: _PUT_OLD}.get(sql, sql)

    def _tiers(self) -> list[sqlite3.Connection]:
        return [self._memory] if self._file is None else [self._memory, self._file]

    def _read(self, sql: str, key: str) -> tuple[Any, ...] | None:
        with self._lock:
            for db in self._tiers():
                try:
                    row = _fetch_one(db, self._for(db, sql), key)
                except sqlite3.Error as exc:
                    self._failed_read(db, exc)
                    continue
                if row is not None:
                    return row
        return None

    def _failed_read(self, db: sqlite3.Connection, exc: sqlite3.Error) -> None:
        """A miss: counted when the query does not fit the file (a missing column); when the file
        stays locked, it is not read again ([Note: sharing the cost cache])."""
        if db is self._memory:
            raise exc  # an internal error, not the file system's
        if _code(exc) in _TRANSIENT:
            self._stop_using_file(f"not used: {exc} (after {_ATTEMPTS} tries)")
            return
        self.skipped += 1
        warn_once(
            logger,
            self.path,
            "read",
            "torch_collage: cost cache %s: a lookup failed (%s); taken as a miss",
            self.path,
            exc,
        )

    def _parsed(self, key: str, value: T | None) -> T | None:
        if value is None:
            with self._lock:
                self.skipped += 1
            warn_once(
                logger,
                self.path,
                "row",
                "torch_collage: cost cache %s has rows that do not parse "
                "(first: key %s); they are taken as misses",
                self.path,
                key,
            )
        return value

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._lock:
            db = self._file if self._file is not None and not self.degraded else self._memory
            try:
                if self._for(db, sql) is not sql:  # the old layout: without the added columns
                    _retrying(lambda: db.execute(_PUT_OLD, params[:4]))
                else:
                    _retrying(lambda: db.execute(sql, params))
                return
            except sqlite3.Error as exc:
                if db is self._memory:
                    raise  # an internal error, not the file system's
                self._stop_writing(f"cannot be written: {exc}")
            self._memory.execute(sql, params)

    def _stop_writing(self, reason: str) -> None:
        self.degraded = reason
        warn_once(
            logger,
            self.path,
            reason,
            "torch_collage: cost cache %s %s; new costs are kept in memory for this process",
            self.path,
            reason,
        )

    def _stop_using_file(self, reason: str) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        self._stop_writing(reason)

    # -- opening --------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection | None:
        try:
            return self._open_file()
        except _Unusable as exc:
            self.degraded = f"not used: {exc}"
            warn_once(
                logger,
                self.path,
                str(exc),
                "torch_collage: cost cache %s not used (%s); costs are kept in memory for this process",
                self.path,
                exc,
            )
            return None

    def _open_file(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _Unusable(f"cannot create its directory: {exc}") from exc
        try:
            return self._connect_ours()
        except sqlite3.DatabaseError as exc:
            if not _is_not_a_database(exc):
                raise _Unusable(_describe(exc)) from exc
        _set_aside_if_not_sqlite(self.path)
        try:  # a fresh file, or the database another process put in its place
            return self._connect_ours()
        except sqlite3.DatabaseError as exc:
            raise _Unusable(_describe(exc)) from exc

    def _connect_ours(self) -> sqlite3.Connection:
        """A connection to a file that holds our tables at our schema version, set up if it was new."""
        db = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            if _retrying(lambda: _needs_set_up(db)):
                try:
                    _retrying(lambda: _set_up(db))
                except sqlite3.OperationalError:
                    if _needs_tables(db):
                        raise
                    # only the added columns are missing and the file cannot take them: read as is
            self._old_layout = bool(_missing_columns(db))
        except BaseException:
            db.close()
            raise
        return db


# -- schema -------------------------------------------------------------------------------------


def _fetch_one(db: sqlite3.Connection, sql: str, key: str) -> tuple[Any, ...] | None:
    return _retrying(lambda: db.execute(sql, (key,)).fetchone())


def _needs_set_up(db: sqlite3.Connection) -> bool:
    """False for our database, True for an empty or half-made one; raises ``_Unusable`` for one
    written by another schema version, or by someone else."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "meta" not in tables:
        if tables:
            raise _Unusable(f"not a torch_collage cost cache (tables {sorted(tables)}); left as it is")
        return True
    row = db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
    if row is None:
        return True
    if str(row[0]) != str(_SCHEMA_VERSION):
        raise _Unusable(
            f"written with schema version {row[0]!r}, this torch_collage reads {_SCHEMA_VERSION}; "
            "left as it is (another cache_dir, or `python -m torch_collage cache --clear`, starts afresh)"
        )
    return _needs_tables(db) or bool(_missing_columns(db))


def _needs_tables(db: sqlite3.Connection) -> bool:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return not tables >= set(_TABLES)


def _missing_columns(db: sqlite3.Connection) -> list[str]:
    """The ``_ADDED_COLUMNS`` that the file's ``costs`` table lacks (none when it has no such table)."""
    have = {r[1] for r in db.execute("PRAGMA table_info(costs)")}
    return [c for c in _ADDED_COLUMNS if have and c not in have]


def _set_up(db: sqlite3.Connection) -> None:
    """Create what is missing in one transaction; reads the version again under the write lock."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if _needs_set_up(db):
            for create in _TABLES.values():
                db.execute(create)
            for column in _missing_columns(db):
                db.execute(f"ALTER TABLE costs ADD COLUMN {column} {_ADDED_COLUMNS[column]}")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(_SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _connect_memory() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    for create in _TABLES.values():
        db.execute(create)
    return db


# -- rows ---------------------------------------------------------------------------------------


def _cost_of(row: tuple[Any, ...]) -> CachedCost | None:
    """A row of ``costs`` (ms, reason, and where the file has them spread and label); None if it
    does not parse. An added column that does not parse is left at its default."""
    ms, reason = row[0], row[1]
    if not isinstance(reason, str):
        return None
    spread = row[2] if len(row) > 2 and isinstance(row[2], (int, float)) and row[2] >= 0 else 0.0
    label = row[3] if len(row) > 3 and isinstance(row[3], str) else ""
    if ms is None:
        return CachedCost(math.inf, reason, float(spread), label)
    if isinstance(ms, (int, float)) and ms >= 0:
        return CachedCost(float(ms), reason, float(spread), label)
    return None  # text, bytes, a negative time or NaN


def _text_of(row: tuple[Any, ...]) -> str | None:
    return row[0] if isinstance(row[0], str) else None


@dataclass
class _TierStats:
    measured: int = 0
    rejected: int = 0
    outcomes: int = 0
    unreadable: int = 0
    times: list[float] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    high_spread: list[CachedCost] = field(default_factory=list)


def _tier_stats(db: sqlite3.Connection) -> _TierStats:
    out = _TierStats(high_spread=_high_spread(db))
    for ms, reason, created in _rows(db, "SELECT ms, reason, created FROM costs", "costs", out):
        cost = _cost_of((ms, reason))
        if cost is None:
            out.unreadable += 1
            continue
        out.measured += cost.ok
        out.rejected += not cost.ok
        if not cost.ok:
            out.reasons[cost.reason or "(no reason)"] += 1
        _add_time(out.times, created)
    for value, created in _rows(db, "SELECT value, created FROM outcomes", "outcomes", out):
        if _text_of((value,)) is None:
            out.unreadable += 1
            continue
        out.outcomes += 1
        _add_time(out.times, created)
    return out


def _high_spread(db: sqlite3.Connection) -> list[CachedCost]:
    sql = "SELECT ms, reason, spread, label FROM costs WHERE ms IS NOT NULL AND spread > ?"
    try:
        rows = _retrying(lambda: db.execute(sql, (HIGH_SPREAD,)).fetchall())
    except sqlite3.Error:  # the old layout has no spreads
        return []
    return [c for c in map(_cost_of, rows) if c is not None]


def _rows(db: sqlite3.Connection, sql: str, table: str, out: _TierStats) -> list[tuple[Any, ...]]:
    """The rows of ``sql``; when a column is missing, none, and the table's rows count as unreadable."""
    try:
        return _retrying(lambda: db.execute(sql).fetchall())
    except sqlite3.Error:
        with contextlib.suppress(sqlite3.Error):  # no such table: nothing to count
            out.unreadable += int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        return []


def _add_time(times: list[float], created: Any) -> None:
    if isinstance(created, (int, float)) and math.isfinite(created):
        times.append(float(created))


# -- errors -------------------------------------------------------------------------------------


def _retrying(step: Callable[[], T]) -> T:
    """``step()``, tried again (with a short back-off) while it fails for a transient reason."""
    for attempt in range(_ATTEMPTS):
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if attempt == _ATTEMPTS - 1 or _code(exc) not in _TRANSIENT:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def _code(exc: sqlite3.Error) -> int | None:
    """The primary SQLite result code of ``exc`` (from its message before Python 3.11)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return int(code) & 0xFF
    text = str(exc).lower()
    for needle, value in (("locked", 5), ("busy", 5), ("disk i/o error", 10), ("not a database", 26)):
        if needle in text:
            return value
    return None


def _is_not_a_database(exc: sqlite3.Error) -> bool:
    return _code(exc) == _NOTADB


def _describe(exc: sqlite3.Error) -> str:
    if _is_not_a_database(exc):
        return f"{exc}, though it starts like an SQLite database; left as it is"
    return str(exc)


def _set_aside_if_not_sqlite(path: Path) -> None:
    """Rename ``path`` if its first bytes are not SQLite's header (an empty file is a database).

    Processes set files aside one at a time, under an exclusive lock on a sibling lock file, and
    read the header again under it: a process that found the damaged file a moment ago would
    otherwise rename the fresh database another one had created in its place meanwhile, from under
    that process's open connection. Where no lock file can be made (a read-only directory), nothing
    could be renamed either."""
    try:
        lock = open(path.with_name(path.name + ".lock"), "a+b")  # noqa: SIM115 (closed below)
    except OSError:
        return
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        _set_aside_locked(path)
    finally:
        lock.close()  # releases the lock


def _set_aside_locked(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            before, header = os.fstat(f.fileno()), f.read(len(_SQLITE_HEADER))
    except OSError:
        return  # set aside by another process already, or unreadable: not ours to move
    if before.st_size == 0 or header == _SQLITE_HEADER:
        return
    aside = path.with_suffix(f".broken-{int(time.time())}-{os.getpid()}")
    try:
        os.rename(path, aside)
    except OSError:
        return
    if not os.path.samestat(before, os.stat(aside)):  # replaced without the lock (a user's copy)
        _put_back(aside, path)
        return
    logger.warning(
        "torch_collage: cost cache %s unreadable: not an SQLite database; moved to %s", path, aside
    )


def _put_back(aside: Path, path: Path) -> None:
    logger.debug("torch_collage: %s was a fresh cost cache, not the damaged file; putting it back", aside)
    try:
        os.link(aside, path)  # fails if yet another database is there now: then it stays aside
        os.unlink(aside)
    except OSError:
        pass
