"""The cost cache and the compiled-partition store under concurrent processes, read-only directories
and damaged files ([Note: sharing the cost cache] in cache.py, [Note: sharing the compiled store] in
artifacts.py).

Processes are real ones (``subprocess``) started together against one directory. Each loads
``cache.py`` or ``artifacts.py`` by file path (both need only the standard library), so that a
process starts in tens of milliseconds instead of importing torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import torch_collage.artifacts as artifacts_module
import torch_collage.cache as cache_module
from torch_collage.artifacts import ArtifactStore
from torch_collage.cache import CachedCost, CostCache

pytestmark = pytest.mark.timeout(180)

_PROCESSES = 6
_KEYS = 5  # distinct keys per process, and keys all processes write
_LOAD = """
import importlib.util, json, logging, sys, time
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
args = json.loads(sys.argv[1])
while time.time() < args["start"]:  # all processes go at once
    pass
"""


def _run_together(body: str, args: list[dict], timeout_s: float = 60.0) -> list[subprocess.CompletedProcess]:
    """Run ``body`` in one process per element of ``args``, all starting at the same instant."""
    script = _LOAD + textwrap.dedent(body)
    start = time.time() + 0.5 + 0.05 * len(args)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, json.dumps({**a, "start": start})],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a in args
    ]
    deadline = time.time() + timeout_s
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process did not finish within {timeout_s} s")
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _assert_clean(results: list[subprocess.CompletedProcess]) -> None:
    """Every process exited 0 and logged nothing at WARNING or above."""
    for r in results:
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-2000:]


# -- the cost cache -------------------------------------------------------------------------------

_COST_WRITER = """
cache_module = load("collage_cache", args["module"])
index = args["index"]
mine = {f"p{index}-{i}": float(index * 100 + i) for i in range(args["keys"])}
shared = {f"shared-{i}": float(i) for i in range(args["keys"])}
caches = []
for j, directory in enumerate(args["dirs"]):  # opening sets a fresh cache up: the race
    while time.time() < args["start"] + j * args["gap_s"]:  # all processes open directory j at once
        pass
    caches.append(cache_module.CostCache(directory))
for cache in caches:
    for key, ms in [*mine.items(), *shared.items()]:
        cache.put(key, cache_module.CachedCost(ms, ""))
    cache.put("rejected", cache_module.CachedCost(float("inf"), "differs from eager"))
    cache.put_text(f"outcome-{index}", "[]")
    for key, ms in [*mine.items(), *shared.items()]:
        got = cache.get(key)
        assert got is not None and got.ms == ms, (cache.path, key, got)
    assert cache.get_text(f"outcome-{index}") == "[]"
    cache.close()
"""


def _write_at_once(dirs: list[Path]) -> list[subprocess.CompletedProcess]:
    """``_PROCESSES`` processes open each of ``dirs`` at the same instant and write to it; one
    launch covers many directories, as starting a process costs far more than opening a cache."""
    args = {"module": cache_module.__file__, "dirs": [str(d) for d in dirs], "keys": _KEYS, "gap_s": 0.03}
    return _run_together(_COST_WRITER, [{**args, "index": i} for i in range(_PROCESSES)])


def _check_every_key(directory: Path) -> None:
    cache = CostCache(str(directory))
    try:
        for index in range(_PROCESSES):
            for i in range(_KEYS):
                assert cache.get(f"p{index}-{i}") == CachedCost(float(index * 100 + i), ""), directory
            assert cache.get_text(f"outcome-{index}") == "[]"
        assert all(cache.get(f"shared-{i}") == CachedCost(float(i), "") for i in range(_KEYS))
        assert cache.get("rejected") == CachedCost(float("inf"), "differs from eager")
        stats = cache.stats()
        assert (stats.measured, stats.rejected) == (_KEYS * _PROCESSES + _KEYS, 1)
    finally:
        cache.close()


def test_processes_opening_a_fresh_cache_at_once_all_write_and_nothing_is_moved_aside(tmp_path):
    """6 processes set up each of 60 fresh caches at once and write distinct and identical keys.
    (Before set-up was one transaction, 2 to 3 of 60 such caches were moved aside on a 2-core
    machine, and as many processes failed to write.)"""
    dirs = [tmp_path / f"cache{j}" for j in range(60)]
    _assert_clean(_write_at_once(dirs))
    for directory in dirs:
        assert sorted(p.name for p in directory.iterdir()) == ["costs.sqlite"], directory
        _check_every_key(directory)


def test_processes_opening_a_file_that_is_not_a_database_set_it_aside_once(tmp_path):
    """The one file that is moved aside: not an SQLite database. Moved once, however many processes
    find it at the same time, and the fresh database one of them creates is kept."""
    dirs = [tmp_path / f"cache{j}" for j in range(10)]
    for directory in dirs:
        directory.mkdir()
        (directory / "costs.sqlite").write_bytes(b"not a database at all " * 200)
    results = _write_at_once(dirs)
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    warnings = [line for r in results for line in r.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == len(dirs) and all("not an SQLite database" in w for w in warnings), warnings
    for directory in dirs:
        (aside,) = directory.glob("costs.broken-*")
        assert aside.read_bytes().startswith(b"not a database")
        _check_every_key(directory)


@pytest.mark.parametrize("how", ["parent is a file", "costs.sqlite is a directory"])
def test_unusable_cache_runs_in_memory_with_one_warning(tmp_path, caplog, how):
    """Made unusable in ways that hold for root too (``chmod`` does not stop root from writing)."""
    if how == "parent is a file":
        (tmp_path / "file").write_text("x")
        directory = tmp_path / "file" / "cache"
    else:
        directory = tmp_path
        (directory / "costs.sqlite").mkdir()
    with caplog.at_level(logging.DEBUG, logger="torch_collage.cache"):
        for _ in range(3):  # as a model with graph breaks opens it once per graph
            cache = CostCache(str(directory))
            assert cache.get("k") is None
            cache.put("k", CachedCost(1.5, ""))
            cache.put_text("t", "[]")
            assert cache.get("k") == CachedCost(1.5, "") and cache.get_text("t") == "[]"
            stats = cache.stats()
            assert stats.measured == 1 and stats.outcomes == 1 and "not used" in stats.degraded
            cache.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(cache.path) in warnings[0] and "in memory" in warnings[0]
    if how == "costs.sqlite is a directory":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["costs.sqlite"]  # nothing moved


def _bad_newer_schema(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema', '2')")
    db.execute("CREATE TABLE costs2 (key TEXT PRIMARY KEY, payload BLOB)")
    db.commit()
    db.close()


def _bad_foreign(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO photos VALUES (1, 'holiday')")
    db.commit()
    db.close()


def _bad_malformed(path: Path) -> None:
    CostCache(str(path.parent)).close()
    db = sqlite3.connect(path)
    db.executemany(
        "INSERT INTO costs(key, ms, reason, created) VALUES (?, ?, ?, 1.0)",
        [(f"k{i}", float(i), "x" * 100) for i in range(200)],
    )
    db.commit()
    db.close()
    data = bytearray(path.read_bytes())
    data[4096 + 8 : 4096 + 400] = os.urandom(392)  # the second page: a b-tree page's header and cells
    data[100:108] = b"\xff" * 8  # the first page's b-tree header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "make", [_bad_newer_schema, _bad_foreign, _bad_malformed], ids=lambda f: f.__name__[5:]
)
def test_database_we_cannot_use_is_left_byte_for_byte(tmp_path, caplog, make):
    path = tmp_path / "costs.sqlite"
    make(path)
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="torch_collage.cache"):
        cache = CostCache(str(tmp_path))
        cache.put("k", CachedCost(2.0, ""))
        assert cache.get("k") == CachedCost(2.0, "") and cache.get("other") is None
        assert "not used" in cache.stats().degraded
        cache.close()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["costs.sqlite"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(path) in warning and "in memory" in warning


def test_rows_that_do_not_parse_are_misses_counted_by_stats(tmp_path, caplog):
    cache = CostCache(str(tmp_path))
    cache.put("good", CachedCost(1.0, ""))
    cache.put("rejected", CachedCost(float("inf"), "export failed"))
    cache.put_text("outcome", "[]")
    cache.close()
    db = sqlite3.connect(tmp_path / "costs.sqlite")
    db.executemany(
        "INSERT INTO costs(key, ms, reason, created) VALUES (?, ?, ?, ?)",
        [
            ("text", "fast", "", 1.0),  # text where milliseconds belong
            ("nulls", None, None, None),
            ("blob", b"\x00\x01", "", 1.0),
            ("negative", -3.0, "", 1.0),
            ("created", 2.0, "", "yesterday"),  # readable: only its creation time is not
        ],
    )
    db.execute("INSERT INTO outcomes VALUES ('null-outcome', NULL, 1.0)")
    db.commit()
    db.close()

    cache = CostCache(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="torch_collage.cache"):
        for key in ("text", "nulls", "blob", "negative"):
            assert cache.get(key) is None
        assert cache.get_text("null-outcome") is None
    assert cache.skipped == 5 and len(caplog.records) == 1 and "do not parse" in caplog.text
    assert cache.get("good") == CachedCost(1.0, "") and cache.get("created") == CachedCost(2.0, "")
    stats = cache.stats()
    assert (stats.measured, stats.rejected, stats.outcomes, stats.unreadable) == (2, 1, 1, 5)
    assert stats.reasons == [("export failed", 1)]
    cache.put("text", CachedCost(4.0, ""))  # measured again: the damaged row is replaced
    assert cache.get("text") == CachedCost(4.0, "") and cache.stats().unreadable == 4
    cache.close()


def test_table_missing_a_column_is_a_miss_and_new_costs_stay_in_memory(tmp_path, caplog):
    db = sqlite3.connect(tmp_path / "costs.sqlite")
    db.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema', '1')")
    db.execute("CREATE TABLE costs (key TEXT PRIMARY KEY, ms REAL, created REAL)")  # no reason
    db.execute("INSERT INTO costs VALUES ('k', 1.0, 1.0)")
    db.execute("CREATE TABLE outcomes (key TEXT PRIMARY KEY, value TEXT, created REAL)")
    db.commit()
    db.close()
    cache = CostCache(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="torch_collage.cache"):
        assert cache.get("k") is None and cache.skipped == 1
        cache.put("k", CachedCost(3.0, ""))
        assert cache.get("k") == CachedCost(3.0, "")
        stats = cache.stats()
    assert stats.measured == 1 and stats.unreadable == 1 and "cannot be written" in stats.degraded
    assert len(caplog.records) == 2 and all(str(cache.path) in r.getMessage() for r in caplog.records)
    cache.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["costs.sqlite"]


def _lock_exclusively(path: Path) -> sqlite3.Connection:
    """Another process's write lock, held until the returned connection rolls back."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_locked_cache_is_waited_for_then_not_used_and_never_moved(tmp_path, caplog):
    path = tmp_path / "costs.sqlite"
    cache = CostCache(str(tmp_path))
    cache.put("k", CachedCost(1.0, ""))
    cache.close()
    before = path.read_bytes()
    holder = _lock_exclusively(path)  # locked while opening
    try:
        with caplog.at_level(logging.WARNING, logger="torch_collage.cache"):
            cache = CostCache(str(tmp_path), busy_timeout_s=0.1)
            cache.put("new", CachedCost(2.0, ""))
            assert cache.get("new") == CachedCost(2.0, "") and cache.get("k") is None
            assert "locked" in cache.stats().degraded
            cache.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(path) in warning and "locked" in warning
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["costs.sqlite"]

    cache = CostCache(str(tmp_path), busy_timeout_s=0.1)
    holder = _lock_exclusively(path)  # locked after opening: one wait, not one per lookup
    try:
        start = time.monotonic()
        assert all(cache.get(f"miss{i}") is None for i in range(50))
        cache.put("new", CachedCost(3.0, ""))
        assert cache.get("new") == CachedCost(3.0, "") and time.monotonic() - start < 5.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        cache.close()
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="busy_timeout_s"):
        CostCache(str(tmp_path), busy_timeout_s=-1.0)


# -- read-only directories ------------------------------------------------------------------------

_READ_ONLY = """
cache_module = load("collage_cache", args["cache"])
artifacts_module = load("collage_artifacts", args["artifacts"])
for _ in range(2):  # as a model with graph breaks opens both once per graph
    cache = cache_module.CostCache(args["dir"])
    warm = cache.get("warm")
    cache.put("cold", cache_module.CachedCost(2.0, ""))
    assert cache.get("cold") == cache_module.CachedCost(2.0, "")
    cache.close()
    store = artifacts_module.ArtifactStore(args["dir"], 10)
    loaded = store.load("entry", lambda d: (d / "data").read_text())
    saved = store.save("other", lambda d: (d / "data").write_text("new") > 0)
print(json.dumps({"warm": None if warm is None else warm.ms, "loaded": loaded, "saved": saved}))
"""


def _without_root_override() -> list[str]:
    """A command prefix under which file permissions hold: as root, ``setpriv`` drops the capability
    that lets root write into a 0o555 directory; as anyone else, nothing is needed."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be made to hold")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.mark.parametrize("populated", [True, False])
def test_read_only_directory_is_read_and_new_entries_stay_in_memory(tmp_path, populated):
    """A read-only cache directory (the permissions of a shared, pre-populated cache): a warm compile
    reads it, a cold one runs; one warning each for the costs and the store."""
    directory = tmp_path / "cache"
    directory.mkdir()
    if populated:
        cache = CostCache(str(directory))
        cache.put("warm", CachedCost(1.0, ""))
        cache.close()
        assert ArtifactStore(str(directory), 10).save("entry", lambda d: (d / "data").write_text("old") > 0)
    modes = {p: p.stat().st_mode for p in (directory, *directory.rglob("*"))}
    for path in modes:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        args = json.dumps({"cache": cache_module.__file__, "artifacts": artifacts_module.__file__,
                           "dir": str(directory), "start": 0})  # fmt: skip
        r = subprocess.run(
            [*_without_root_override(), sys.executable, "-c", _LOAD + _READ_ONLY, args],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == (
        {"warm": 1.0, "loaded": "old", "saved": False}
        if populated
        else {"warm": None, "loaded": None, "saved": False}
    )
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 2, warnings
    assert str(directory / "costs.sqlite") in warnings[0] and str(directory / "compiled") in warnings[1]


# -- the compiled-partition store -----------------------------------------------------------------

_STORE_WORKER = """
artifacts_module = load("collage_artifacts", args["module"])
store = artifacts_module.ArtifactStore(args["dir"], 64)
token = str(args["index"]).encode()
def saver(directory):
    for name in ("a", "b", "c"):
        (directory / name).write_bytes(token * 32768)
    return True
def loader(directory):
    parts = [(directory / name).read_bytes() for name in ("a", "b", "c")]
    if len(set(parts)) != 1 or len(parts[0]) != 32768:
        raise ValueError("an entry mixed from several writers, or cut short")
    return parts[0][:1]
loads = saves = 0
end = time.time() + args["seconds"]
while time.time() < end:
    if args["role"] == "writer":
        saves += store.save("shared", saver)
        store.save(f"own-{args['index']}", saver)
        if args["index"] == 0:
            store.discard("shared")
    else:
        loads += store.load("shared", loader) is not None
print(json.dumps({"loads": loads, "saves": saves}))
"""


def test_processes_saving_loading_and_discarding_one_entry_at_once(tmp_path):
    """Writers race to save one entry (one of them keeps discarding it) while readers load it: every
    load sees a whole entry or none, no process logs a warning, nothing temporary is left."""
    roles = ["writer"] * 3 + ["reader"] * 3
    args = [
        {"module": artifacts_module.__file__, "dir": str(tmp_path), "index": i, "role": role, "seconds": 3.0}
        for i, role in enumerate(roles)
    ]
    results = _run_together(_STORE_WORKER, args)
    _assert_clean(results)
    counts = [json.loads(r.stdout) for r in results]
    assert sum(c["saves"] for c in counts) > 0 and sum(c["loads"] for c in counts) > 0
    store = ArtifactStore(str(tmp_path), 64)
    assert sorted(p.name for p in store.root.iterdir() if p.name != "shared") == ["own-0", "own-1", "own-2"]
    for key in ("own-0", "own-1", "own-2"):
        assert len({(store.root / key / n).read_bytes() for n in ("a", "b", "c")}) == 1


def test_partition_larger_than_the_store_is_not_saved_and_says_why(tmp_path, caplog):
    store = ArtifactStore(str(tmp_path), max_mb=1)
    assert store.save("small", lambda d: (d / "data").write_bytes(os.urandom(100_000)) > 0)
    with caplog.at_level(logging.DEBUG, logger="torch_collage.artifacts"):
        for key in ("big", "bigger"):
            assert not store.save(key, lambda d: (d / "data").write_bytes(os.urandom(3 * 2**20)) > 0)
    assert sorted(p.name for p in store.root.iterdir()) == ["small"]  # and the small one is kept
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "3.0 MiB" in warning and "compiled_cache_mb=1" in warning and str(store.root) in warning


def test_store_that_cannot_be_written_warns_once_and_still_loads(tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    with caplog.at_level(logging.DEBUG, logger="torch_collage.artifacts"):
        for _ in range(2):  # a store per graph, as with graph breaks
            store = ArtifactStore(str(tmp_path / "file"), max_mb=10)
            assert not store.save("a", lambda d: (d / "data").write_bytes(b"x") > 0)
            assert not store.save("b", lambda d: (d / "data").write_bytes(b"x") > 0)
            assert store.load("a", lambda d: 1) is None and store.count() == 0 and store.unwritable
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(store.root) in warning and "not saved" in warning


def test_failing_saver_is_said_once_per_kind_of_failure(tmp_path, caplog):
    def full(directory: Path) -> bool:
        (directory / "half").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    with caplog.at_level(logging.DEBUG, logger="torch_collage.artifacts"):
        for key in ("a", "b", "c"):
            assert not ArtifactStore(str(tmp_path), max_mb=10).save(key, full)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "No space left" in warnings[0]
    assert list((tmp_path / "compiled").iterdir()) == []


def test_damaged_entries_are_skipped(tmp_path, caplog):
    store = ArtifactStore(str(tmp_path), max_mb=10)
    assert store.save("good", lambda d: (d / "data").write_bytes(b"1") > 0)
    (store.root / "file-entry").write_bytes(b"not a directory")
    assert store.load("file-entry", lambda d: 1) is None
    assert store.count() == 1 and store.size_bytes() == 1
    assert store.save("file-entry", lambda d: (d / "data").write_bytes(b"2") > 0)  # replaces it
    assert store.load("file-entry", lambda d: (d / "data").read_bytes()) == b"2"
