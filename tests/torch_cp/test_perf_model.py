import dataclasses

import pytest

from torch_cp import perf_model as pm


def _shape(**kw):
    return dataclasses.replace(pm.MODELS["llama3-70b"], **kw)


def test_design_numbers_for_llama3_70b_on_h200():
    shape, hw = pm.MODELS["llama3-70b"], pm.HARDWARE["h200"]
    # 128K tokens in bf16 over 80 layers is ~43 GB and takes ~9 ms per step to read at 4.8 TB/s.
    total = shape.kv_bytes_per_layer(131072, 1) * shape.layers
    assert 42e9 < total < 44e9
    assert 8e-3 < total / hw.mem_bw < 10e-3


def test_attention_time_follows_the_formula():
    shape, hw = _shape(), pm.HARDWARE["h200"]
    for ranks in (1, 2, 8):
        got = pm.attention_time(shape, hw, context_len=50_000, batch=3, ranks=ranks)
        read = 3 * 50_000 * 2 * 8 * 128 * 2 / (ranks * hw.efficiency * hw.mem_bw)
        assert got == pytest.approx(
            max(hw.launch_floor, read) + pm.merge_time(shape, hw, batch=3, ranks=ranks)
        )


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_break_even_is_where_the_times_cross(ranks):
    shape, hw = _shape(), dataclasses.replace(pm.HARDWARE["h200"], launch_floor=0.0)
    n = pm.break_even_context(shape, hw, batch=1, ranks=ranks)
    at = lambda length, p: pm.attention_time(shape, hw, context_len=length, batch=1, ranks=p)
    assert at(n, ranks) < at(n, 1) and at(n - 1, ranks) >= at(n - 1, 1)
    # The note's closed form: per-layer bytes = eta * BW * t_merge * P / (P - 1).
    bytes_needed = (
        hw.efficiency * hw.mem_bw * pm.merge_time(shape, hw, batch=1, ranks=ranks) * ranks / (ranks - 1)
    )
    assert shape.kv_bytes_per_layer(n, 1) == pytest.approx(bytes_needed, rel=1e-3)
    assert 5_000 < n < 100_000  # "tens of thousands of tokens on an H200"


def test_schemes_trade_latency_and_memory_as_expected():
    shape, hw = _shape(), pm.HARDWARE["h200"]
    est = {
        s: pm.decode_step(shape, hw, context_len=1 << 20, batch=1, ranks=8, scheme=s)
        for s in ("tensor", "pipeline", "cache")
    }
    one = pm.decode_step(shape, hw, context_len=1 << 20, batch=1, ranks=1, scheme="cache")
    assert not one.fits  # 1M tokens of Llama-3-70B do not fit one H200
    assert est["pipeline"].latency_s > one.latency_s  # no per-token gain, plus hops
    assert est["cache"].latency_s < one.latency_s and est["tensor"].latency_s < one.latency_s
    # Tensor parallelism gains nothing on the cache beyond the KV heads: with 4 KV heads and a large
    # batch (the cache dominates), 8 tensor ranks are barely faster than 4, 8 cache ranks are.
    wide = _shape(kv_heads=4)
    step = lambda p, s: pm.decode_step(wide, hw, context_len=1 << 20, batch=8, ranks=p, scheme=s)
    assert step(8, "tensor").latency_s > 0.9 * step(4, "tensor").latency_s
    assert step(8, "cache").latency_s < 0.9 * step(8, "tensor").latency_s


@pytest.mark.parametrize(("kwargs", "match"), [({"ranks": 0}, "ranks"), ({"context_len": -1}, "context_len")])
def test_bad_input(kwargs, match):
    args = {"context_len": 10, "batch": 1, "ranks": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        pm.attention_time(pm.MODELS["llama3-8b"], pm.HARDWARE["cpu"], **args)
    with pytest.raises(ValueError, match="scheme"):
        pm.decode_step(
            pm.MODELS["llama3-8b"], pm.HARDWARE["cpu"], context_len=1, batch=1, ranks=1, scheme="data"
        )
    with pytest.raises(ValueError, match="efficiency"):
        dataclasses.replace(pm.HARDWARE["cpu"], efficiency=1.5)
