"""``python -m torch_collage``: backends, the cost cache (shown and cleared) and a zoo model's placement."""

from __future__ import annotations

import subprocess
import sys

from torch_collage.artifacts import ArtifactStore
from torch_collage.backends.registry import list_backends
from torch_collage.cache import CachedCost, CostCache
from torch_collage.cli import main


def test_backends_lists_every_registered_backend(capsys):
    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(list_backends())
    assert rows["eager"].split()[1] == "yes"
    for name, info in list_backends().items():
        if not info.available:
            assert rows[name].split()[1] == "no" and info.reason.split()[0] in rows[name]


def test_cache_shows_counts_and_reasons_then_clears(tmp_path, capsys):
    cache = CostCache(str(tmp_path))
    cache.put("a", CachedCost(1.5, ""))
    cache.put("b", CachedCost(2.5, ""))
    for key in ("c", "d"):
        cache.put(key, CachedCost(float("inf"), "onnxruntime: export failed"))
    cache.put("e", CachedCost(float("inf"), "differs from eager"))
    cache.put_text("outcome", "[]")
    cache.close()
    store = ArtifactStore(str(tmp_path), max_mb=10)
    assert store.save("k", lambda d: (d / "model.blob").write_bytes(b"x" * 4096) > 0)

    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "costs: 2 measured, 3 rejected, 1 search outcomes" in out
    reasons = [line.split(None, 1) for line in out.splitlines() if line[:1].isdigit()]
    assert reasons == [
        ["2", "onnxruntime: export failed"],
        ["1", "differs from eager"],
    ]  # most frequent first
    assert "compiled partitions: 1 (4.1 kB)" in out

    assert main(["cache", "--cache-dir", str(tmp_path), "--clear"]) == 0
    assert "1 cost file(s), 1 compiled partition(s)" in capsys.readouterr().out
    assert not (tmp_path / "costs.sqlite").exists() and not (tmp_path / "compiled").exists()
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    assert "no cost cache here yet" in capsys.readouterr().out
    assert not (tmp_path / "costs.sqlite").exists()  # showing an empty cache does not create one


def test_cache_says_when_rows_are_damaged_or_the_file_is_not_used(tmp_path, capsys):
    import sqlite3

    cache = CostCache(str(tmp_path))
    cache.put("a", CachedCost(1.5, ""))
    cache.close()
    with sqlite3.connect(tmp_path / "costs.sqlite") as db:
        db.execute("INSERT INTO costs(key, ms, reason, created) VALUES ('bad', 'fast', '', 0)")
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    assert "1 damaged row(s)" in capsys.readouterr().out
    with sqlite3.connect(tmp_path / "costs.sqlite") as db:
        db.execute("UPDATE meta SET v = '99' WHERE k = 'schema'")
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    assert "schema version '99'" in capsys.readouterr().out


def test_cache_stats_of_an_empty_cache_and_bad_argument(tmp_path):
    cache = CostCache(str(tmp_path))
    try:
        stats = cache.stats()
        assert (stats.measured, stats.rejected, stats.outcomes, stats.oldest, stats.reasons) == (
            0,
            0,
            0,
            None,
            [],
        )
        try:
            cache.stats(top_reasons=-1)
        except ValueError as exc:
            assert "top_reasons" in str(exc)
        else:
            raise AssertionError("stats(top_reasons=-1) did not raise")
    finally:
        cache.close()


def test_explain_places_a_zoo_model_and_saves_its_picture(tmp_path, capsys):
    picture = tmp_path / "placement.png"
    argv = ["explain", "mlp", "--backends", "eager", "--max-depth", "1", "--cache-dir", str(tmp_path)]
    assert main([*argv, "--save", str(picture)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**Collage placement**: backends eager") and "| 0 | eager |" in out
    assert picture.stat().st_size > 0


def test_bad_arguments_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["explain", "no_such_model", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown zoo model 'no_such_model'; valid names: mlp" in capsys.readouterr().err
    assert main(["explain", "mlp", "--backends", "nope", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown backend(s) ['nope']" in capsys.readouterr().err


def test_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "torch_collage", "backends"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.split()[:2] == ["backend", "available"]
