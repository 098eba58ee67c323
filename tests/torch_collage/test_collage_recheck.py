"""Costs that do not remember noise: a warm compile re-checks its cached choice side by side and
measures again when the cache is contradicted; the cost cache keeps each timing's spread (an old
cache file gets the column), and ``python -m torch_collage cache`` lists the wide ones
([Note: quiet measurements] in timing.py)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from torch import fx, nn

import torch_collage
from torch_collage.backends.registry import registered_backend
from torch_collage.cache import HIGH_SPREAD, CachedCost, CostCache
from torch_collage.cli import main
from torch_collage.place import Placer
from torch_collage.timing import QuietProbe

_FAST = {"repeats": 3, "warmup": 1, "progress": False, "mode": "fast"}
_DELAY_S = {"memo_a": 0.0, "memo_b": 0.0}  # each test sets the delays it needs


def _memo_compile(name: str):
    """A backend that runs ``gm`` once per set of input tensors and then answers from memory, after
    sleeping ``_DELAY_S[name]``: faster than eager on a repeated input, as slow as its delay says."""

    def compile_fn(gm: fx.GraphModule, example_inputs):
        memo: dict[tuple[int, ...], tuple[tuple, object]] = {}

        def run(*args):
            key = tuple(id(a) for a in args)
            if key not in memo:
                memo[key] = (args, gm(*args))  # the arguments are kept: their ids stay theirs
            time.sleep(_DELAY_S[name])
            return memo[key][1]

        return run

    return compile_fn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()


@pytest.fixture
def memo_backends():
    with (
        registered_backend("memo_a", compile=_memo_compile("memo_a")),
        registered_backend("memo_b", compile=_memo_compile("memo_b")),
    ):
        yield


def test_warm_compile_rechecks_and_measures_again_when_the_cache_is_contradicted(tmp_path, memo_backends):
    """Cold: memo_a answers at once, memo_b sleeps 3 ms; memo_a is chosen. Then memo_a sleeps 3 ms
    and memo_b answers at once: the warm compile's cached choice now runs far slower than its
    cached time, so it measures again and picks memo_b; the next warm compile agrees with it."""
    x = torch.randn(64, 256)
    opts = {"backends": ["memo_a", "memo_b"], "cache_dir": str(tmp_path), **_FAST}
    placer = Placer(probe=QuietProbe())
    _DELAY_S.update(memo_a=0.0, memo_b=0.003)
    cold = torch_collage.explain(_model(), x, placer=placer, **opts)
    assert cold.graphs[0].chosen == "memo_a" and cold.graphs[0].recheck == ""  # it measured: no re-check
    _DELAY_S.update(memo_a=0.003, memo_b=0.0)
    before = placer.measurements
    warm = torch_collage.explain(_model(), x, placer=placer, **opts)
    (g,) = warm.graphs
    assert g.recheck.startswith("contradicted: memo_a ran"), g.recheck
    assert g.recheck_ms["memo_a"] > 3.0 and g.recheck_ms["memo_b"] < 3.0
    assert g.chosen == "memo_b" and placer.measurements > before and g.measured > 0
    assert "measured again" in warm.to_markdown()
    before = placer.measurements
    again = torch_collage.explain(_model(), x, placer=placer, **opts)
    assert again.graphs[0].recheck == "agreed" and again.graphs[0].chosen == "memo_b"
    assert placer.measurements == before and again.graphs[0].measured == 0  # a re-check is not a measurement


def test_a_recheck_that_agreed_is_not_repeated_on_the_same_cached_costs(tmp_path, memo_backends):
    x = torch.randn(64, 256)
    opts = {"backends": ["memo_a", "memo_b"], "cache_dir": str(tmp_path), **_FAST}
    placer = Placer(probe=QuietProbe())
    _DELAY_S.update(memo_a=0.0, memo_b=0.003)
    torch_collage.explain(_model(), x, placer=placer, **opts)
    first = torch_collage.explain(_model(), x, placer=placer, **opts)
    assert first.graphs[0].recheck == "agreed" and first.graphs[0].recheck_ms
    again = torch_collage.explain(_model(), x, placer=placer, **opts)
    (g,) = again.graphs
    assert g.recheck == "agreed before" and g.recheck_ms == {} and g.chosen == "memo_a"
    assert "not re-checked" in again.to_markdown()


def test_a_compile_that_reads_the_whole_graphs_from_the_cache_rechecks_them(tmp_path, memo_backends):
    """A compile that measures some pieces again (here: every cached cost but the whole graphs' was
    lost) still rests its choice on cached whole-graph costs, so it re-checks them too."""
    x = torch.randn(64, 256)
    opts = {"backends": ["memo_a", "memo_b"], "cache_dir": str(tmp_path), **_FAST, "mode": "search"}
    placer = Placer(probe=QuietProbe())
    _DELAY_S.update(memo_a=0.0, memo_b=0.003)
    cold = torch_collage.explain(_model(), x, placer=placer, **opts)
    assert cold.graphs[0].recheck == ""
    with sqlite3.connect(tmp_path / "costs.sqlite") as db:
        kept = db.execute("SELECT count(*) FROM costs WHERE label LIKE '%whole graph%'").fetchone()[0]
        db.execute("DELETE FROM costs WHERE label NOT LIKE '%whole graph%'")
        db.execute("DELETE FROM outcomes")
    assert kept >= 2
    _DELAY_S.update(memo_a=0.003, memo_b=0.0)
    (g,) = torch_collage.explain(_model(), x, placer=placer, **opts).graphs
    assert g.measured > 0  # not a warm compile: pieces were measured again
    assert g.recheck.startswith("contradicted: "), g.recheck  # memo_a slower, or memo_b faster, than cached
    assert g.chosen != "memo_a"


def _copy_compile(gm: fx.GraphModule, example_inputs):
    return gm


@pytest.mark.parametrize(
    ("now_ms", "outcome", "confirmed"),
    [
        ({"copy": 1.06, "eager": 1.0, "slow": 5.0}, "agreed", False),  # within RECHECK_CLOSE + floor
        ({"copy": 1.1, "eager": 0.8, "slow": 5.0}, "contradicted: eager ran 0.800 ms, copy 1.100 ms", False),
        ({"copy": 1.6, "eager": 2.0, "slow": 5.0}, "contradicted: copy ran 1.600 ms, cached 1.000 ms", False),
        # ahead by less than RECHECK_MARGIN, more than RECHECK_CLOSE: timed longer, and still ahead
        (
            {"copy": 1.1, "eager": 1.0, "slow": 5.0},
            "contradicted: eager ran 1.000 ms, copy 1.100 ms over 4 more rounds",
            True,
        ),
        # a rival cached (from a busy minute) at more than RECHECK_SLOWER times what it runs now
        ({"copy": 1.0, "eager": 1.2, "slow": 2.0}, "contradicted: slow ran 2.000 ms, cached 5.000 ms", False),
    ],
)
def test_recheck_compares_the_choice_with_its_cached_time_and_its_rivals(
    tmp_path, now_ms, outcome, confirmed
):
    """The chosen "copy" was cached at 1.0 ms, its rivals at 1.2 and 5.0 ms; timed now side by side,
    the cache is contradicted where copy runs more than RECHECK_SLOWER times its cached time, a rival
    runs that much faster than its own, or a rival beats copy by more than RECHECK_MARGIN, or by more
    than RECHECK_CLOSE over RECHECK_CONFIRM_ROUNDS more rounds."""
    checked, timed, cost = _recheck_with(tmp_path, lambda backend, k: now_ms[backend])
    assert checked.outcome == outcome and checked.times == pytest.approx(now_ms)
    extra = ["copy", "eager"] * 4 if confirmed else []  # RECHECK_CONFIRM_ROUNDS, the choice and the rival
    assert sorted(timed[:6]) == sorted(["copy", "eager", "slow"] * 2) and sorted(timed[6:]) == sorted(extra)
    assert cost.measured == 0 and cost.rechecks == len(timed)  # not counted as measurements


def test_a_rival_ahead_only_in_the_short_recheck_is_timed_longer_and_the_choice_stands(tmp_path):
    """Eager leads by 10% in the two short rounds (jitter) and trails in the four more: agreed."""

    def now(backend: str, k: int) -> float:
        return {"copy": 1.1 if k < 6 else 1.0, "eager": 1.0 if k < 6 else 1.1, "slow": 5.0}[backend]

    checked, timed, _ = _recheck_with(tmp_path, now)
    assert checked.outcome == "agreed after 4 more rounds beside eager", checked.outcome
    assert len(timed) == 6 + 8


def _recheck_with(tmp_path, now_ms):
    """A re-check of "copy", chosen from a cached 1.0 ms, with each timing's result ``now_ms(backend,
    k)`` for the k-th timing; returns the outcome, the backends timed in order and the cost model."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.backends.registry import get_spec
    from torch_collage.choose import Choice, recheck, single
    from torch_collage.cost import CostModel, record_values
    from torch_collage.endtoend import EndToEnd
    from torch_collage.graph import DataflowGraph
    from torch_collage.options import CollageOptions

    model, x = _model(), torch.randn(4, 256)
    gm = make_fx(model)(x)
    graph = DataflowGraph.from_graph(gm.graph)
    with registered_backend("copy", compile=_copy_compile), registered_backend("slow", compile=_copy_compile):
        specs = {name: get_spec(name) for name in ("eager", "copy", "slow")}
        opts = CollageOptions(cache_dir=str(tmp_path))
        cost = CostModel(
            gm, graph, record_values(gm, [x]), specs, opts, CostCache(str(tmp_path)), probe=QuietProbe()
        )
        e2e = EndToEnd(gm, cost)
        timed: list[str] = []

        def time_call(call, repeats=None):  # the assembled placements' backends, as timed now
            backend = call.args[0].steps[0].backend
            timed.append(backend)
            cost.measured += 1
            return now_ms(backend, len(timed) - 1)

        cost.time_call = time_call
        chosen = single(graph, "copy", 1.0)
        choice = Choice(e2e.lazy(chosen)(), 1.0, "copy", {}, chosen)
        checked = recheck(e2e, choice, {"copy": 1.0, "eager": 1.2, "slow": 5.0})
    return checked, timed, cost


class _SwitchedProbe(QuietProbe):
    """Quiet until ``busy_now`` is set: the machine under another process's load."""

    busy_now = False

    def busy(self, slowdown: float) -> bool:
        return self.busy_now


def test_a_recheck_on_a_busy_machine_proves_nothing(tmp_path, memo_backends):
    x = torch.randn(64, 256)
    opts = {"backends": ["memo_a", "memo_b"], "cache_dir": str(tmp_path), **_FAST}
    probe = _SwitchedProbe()
    placer = Placer(probe=probe)
    _DELAY_S.update(memo_a=0.0, memo_b=0.003)
    torch_collage.explain(_model(), x, placer=placer, **opts)
    _DELAY_S.update(memo_a=0.003, memo_b=0.0)
    probe.busy_now = True
    before = placer.measurements
    (g,) = torch_collage.explain(_model(), x, placer=placer, **opts).graphs
    assert g.recheck == "ignored: the machine was busy" and g.chosen == "memo_a"
    assert placer.measurements == before


def test_costs_keep_their_spread_and_label(tmp_path):
    cache = CostCache(str(tmp_path))
    cache.put("k", CachedCost(1.5, "", 0.4, "inductor: 3 ops (addmm, relu, addmm_1)"))
    cache.put("rejected", CachedCost(float("inf"), "export failed", 0.0, "onnxruntime: whole graph (9 ops)"))
    assert cache.get("k") == CachedCost(1.5, "", 0.4, "inductor: 3 ops (addmm, relu, addmm_1)")
    assert cache.get("rejected").label == "onnxruntime: whole graph (9 ops)"
    cache.close()


def _old_layout(path) -> None:
    """A cache file as schema version 1 first wrote it: ``costs`` without spread and label."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema', '1')")
    db.execute("CREATE TABLE costs (key TEXT PRIMARY KEY, ms REAL, reason TEXT, created REAL)")
    db.execute("INSERT INTO costs VALUES ('old', 2.5, '', 1.0)")
    db.execute("CREATE TABLE outcomes (key TEXT PRIMARY KEY, value TEXT, created REAL)")
    db.commit()
    db.close()


def test_an_old_cache_file_gets_the_new_columns_and_stays_readable_by_old_readers(tmp_path):
    path = tmp_path / "costs.sqlite"
    _old_layout(path)
    cache = CostCache(str(tmp_path))
    assert cache.get("old") == CachedCost(2.5, "") and not cache.degraded
    cache.put("new", CachedCost(1.0, "", 0.5, "eager: 1 ops (relu)"))
    assert cache.get("new") == CachedCost(1.0, "", 0.5, "eager: 1 ops (relu)")
    cache.close()
    db = sqlite3.connect(path)  # what an older torch_collage reads and writes: named columns
    assert db.execute("SELECT ms, reason FROM costs WHERE key = 'new'").fetchone() == (1.0, "")
    db.execute("INSERT OR REPLACE INTO costs(key, ms, reason, created) VALUES ('older', 3.0, '', 2.0)")
    assert db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone() == ("1",)
    db.commit()
    db.close()
    cache = CostCache(str(tmp_path))
    assert cache.get("older") == CachedCost(3.0, "")
    cache.close()


_READ_OLD = """
import json, sys
from torch_collage.cache import CachedCost, CostCache
cache = CostCache(sys.argv[1])
old = cache.get("old")
cache.put("new", CachedCost(1.0, "", 0.5, "x"))  # kept in memory
print(json.dumps({"old": old.ms, "new": cache.get("new").spread, "degraded": bool(cache.degraded)}))
"""


def test_a_read_only_old_cache_file_is_read_without_the_new_columns(tmp_path):
    path = tmp_path / "costs.sqlite"
    _old_layout(path)
    before = path.read_bytes()
    prefix = []
    if os.geteuid() == 0:  # root writes read-only files unless setpriv drops that capability
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be made to hold")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        r = subprocess.run(
            [*prefix, sys.executable, "-c", _READ_OLD, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        tmp_path.chmod(0o755)
        path.chmod(0o644)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == {"old": 2.5, "new": 0.5, "degraded": True}
    assert path.read_bytes() == before


def test_cache_command_lists_the_costs_whose_repeats_spread_widely(tmp_path, capsys):
    cache = CostCache(str(tmp_path))
    cache.put("steady", CachedCost(1.0, "", HIGH_SPREAD / 2, "eager: whole graph (5 ops)"))
    cache.put("wide", CachedCost(7.6, "", 0.8, "openvino: whole graph (90 ops)"))
    cache.put("wider", CachedCost(2.0, "", 1.5, "inductor: 2 ops (addmm, relu)"))
    cache.close()
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 cost(s) whose repeats spread more than 25%" in out
    lines = out.splitlines()
    wide = [i for i, line in enumerate(lines) if "whole graph (90 ops)" in line or "(addmm, relu)" in line]
    assert len(wide) == 2 and "inductor" in lines[wide[0]] and "150%" in lines[wide[0]]  # widest first
    assert "80%" in lines[wide[1]] and "7.600" in lines[wide[1]]
    assert "eager: whole graph" not in out
