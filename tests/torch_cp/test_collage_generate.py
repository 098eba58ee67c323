"""Hugging Face generation with a static KV cache through ``torch.compile(model.forward,
backend="collage")`` (issue 26, items 3 and 4): greedy tokens equal eager's, the prefill and the
decode graph are each placed once, the cache is updated in place on the user's tensors, and no op of a
decode step makes a copy of the cache ([Note: KV cache nodes torch_cp claims] in torch_cp/collage_kv.py).
Random weights from small configs; costs measured for real (one thread, a quiet probe: the 2-core
machine is shared)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import torch_collage
from torch_collage.entry import make_backend
from torch_collage.options import CollageOptions
from torch_collage.place import Placer
from torch_collage.report import GraphReport
from torch_collage.timing import QuietProbe
from torch_cp import _ops

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(not _ops.HAS_CPU_KERNELS, reason="C++ extension not built")

VOCAB = 256


def _llama(max_len: int) -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_len,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _qwen2(max_len: int) -> Any:
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_len,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(cfg)


def _gpt2(max_len: int) -> Any:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=max_len, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg)


MODELS: dict[str, Callable[[int], Any]] = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2}


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared 2-core machine time the scheduler
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()


class Compiled:
    """``model.forward`` compiled with collage on its own placer, keeping every graph's report."""

    def __init__(self, model: Any, cache_dir: str, backends: tuple[str, ...] = ("eager", "torch_cp")) -> None:
        options = CollageOptions(
            backends=backends, max_depth=1, warmup=1, repeats=5, cache_dir=cache_dir, progress=False
        )
        self.reports: list[GraphReport] = []
        self.placer = Placer(probe=QuietProbe())
        self.eager_forward = model.forward
        backend = make_backend(options, self.reports.append, self.placer)
        model.forward = torch.compile(model.forward, backend=backend)


def _static_cache(model: Any, max_len: int) -> Any:
    return transformers.StaticCache(config=model.config, max_cache_len=max_len)


def _generate(model: Any, ids: torch.Tensor, cache: Any, new_tokens: int, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=new_tokens, do_sample=False, cache=cache, pad_token_id=0, **kwargs
        )


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize(
    ("arch", "padded"), [("llama", True), ("qwen2", True), ("gpt2", True), ("llama", False)]
)
def test_greedy_generation_matches_eager_and_places_each_graph_once(
    arch, padded, one_thread, tmp_path
) -> None:
    """Greedy tokens equal eager's for 32 new tokens (a batch of 2, left-padded or not); the prefill
    and the decode graph are placed once each, and a second generation with a new cache places
    nothing and measures nothing; the cache tensors keep their storage through decoding."""
    torch.manual_seed(hash(arch) % 1000 + padded)
    max_len, new_tokens = 64, 32
    model = MODELS[arch](max_len).eval()
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding
    want = _generate(model, ids, _static_cache(model, max_len), new_tokens, attention_mask=mask)
    compiled = Compiled(model, str(tmp_path))
    cache = _static_cache(model, max_len)
    seen: list[list[int]] = []

    def step_hook(*_: Any) -> None:  # after the prefill, each decode step sees the same storages
        if cache.is_initialized:
            seen.append([t.data_ptr() for t in _cache_tensors(cache)])

    got = _generate(
        model,
        ids,
        cache,
        new_tokens,
        attention_mask=mask,
        logits_processor=transformers.LogitsProcessorList([_Hook(step_hook)]),
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [r.kind for r in compiled.reports] == ["inference", "inference"], (
        compiled.reports
    )  # prefill, decode
    assert len(seen) == new_tokens and all(s == seen[0] for s in seen)
    measured = compiled.placer.measurements
    again = _generate(model, ids, _static_cache(model, max_len), new_tokens, attention_mask=mask)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    assert len(compiled.reports) == 2 and compiled.placer.measurements == measured


class _Hook(transformers.LogitsProcessor):
    """Calls ``fn`` once per generated token (before the token is chosen); changes no score."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.fn()
        return scores


def _placed_on(report: GraphReport, op: str) -> list[str]:
    return [p.backend for p in report.partitions for n in p.nodes if n.startswith(op)]


def _greedy(model: Any, ids: torch.Tensor, cache: Any, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """A prefill and ``steps`` greedy decode steps calling the model directly; the logits of each
    call and the tokens."""
    logits, tokens = [], []
    with torch.no_grad():
        for _ in range(steps + 1):
            out = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
            logits.append(out)
            ids = out.argmax(-1, keepdim=True)
            tokens.append(int(ids))
    return logits, tokens


def test_decode_step_updates_the_cache_in_place_and_copies_none_of_it(one_thread, tmp_path) -> None:
    """A static cache of 4096 slots holding a few tokens: the decode placement runs attention on
    torch_cp and each cache update (``index_copy``) in place, and no op of a decode step allocates as much as one
    layer's key cache (eager's functional ``index_copy`` and ``repeat_kv`` would, several times over);
    the cache keeps its storage, and logits and tokens are eager's."""
    torch.manual_seed(7)
    max_len = 4096
    model = _llama(max_len).eval()
    ids = torch.randint(1, VOCAB, (1, 6))
    want_logits, want = _greedy(model, ids, _static_cache(model, max_len), 4)
    compiled = Compiled(model, str(tmp_path))
    cache = _static_cache(model, max_len)
    got_logits, got = _greedy(model, ids, cache, 4)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    prefill, decode = compiled.reports
    markdown = torch_collage.ExplainReport([prefill, decode]).to_markdown()
    assert decode.chosen == "mixed", markdown
    # keys and values of 2 layers, each updated in place: by torch_cp, or by eager where the rewrite
    # marked it ([Note: rewrites before placing]; the two measure alike, so either may be placed)
    updates = _placed_on(decode, "index_copy")
    assert len(updates) == 4 and set(updates) <= {"torch_cp", "eager"}, markdown
    assert _placed_on(decode, "_scaled_dot_product") == ["torch_cp"] * 2, markdown
    pointers = [t.data_ptr() for t in _cache_tensors(cache)]
    step = torch.tensor([[got[-1]]])
    with torch.no_grad(), torch.profiler.profile(profile_memory=True) as prof:
        model(input_ids=step, cache=cache, use_cache=True)
    largest = max((e.cpu_memory_usage, e.name) for e in prof.events())
    assert largest[0] < cache.layers[0].keys.nbytes, largest
    assert [t.data_ptr() for t in _cache_tensors(cache)] == pointers
    assert len(compiled.reports) == 2  # the extra step placed nothing


def test_a_position_counter_the_graph_advances_is_restored_between_timed_calls(tmp_path) -> None:
    """A graph that reads a counter and advances it in place (a static cache's position) is timed
    over repeated calls on copies: each call starts from the recorded count, so the positions stay in
    range ([Note: timing a graph that writes its inputs]); the user's counter advances once per call."""

    def gather_next(x: torch.Tensor, table: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(3) + n
        n.add_(3)
        return table.index_select(0, pos) * x

    table, x = torch.randn(8, 5), torch.randn(3, 5)
    n = torch.tensor(2)
    options = {
        "backends": ["eager"],
        "repeats": 5,
        "warmup": 2,
        "cache_dir": str(tmp_path),
        "progress": False,
    }
    compiled = torch.compile(gather_next, backend="collage", options=options)
    try:
        with torch.no_grad():
            out = compiled(x, table, n)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, table[2:5] * x)
    assert int(n) == 5
