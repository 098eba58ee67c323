"""The rewrites collage makes before placing a graph ([Note: rewrites before placing] in
torch_collage/rewrite.py): grouped attention instead of ``repeat_kv`` copies, cache updates marked to
run in place on eager. Graphs captured the way collage receives them (aot_autograd, input mutations
kept), from Hugging Face decoders built from configs with random weights."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from torch_collage import ExplainReport
from torch_collage.backends.registry import get_spec
from torch_collage.entry import make_backend
from torch_collage.options import CollageOptions
from torch_collage.place import Placer
from torch_collage.report import GraphReport
from torch_collage.rewrite import IN_PLACE, rewrite_for_placing, run_marked_in_place
from torch_collage.subgraph import extract
from torch_collage.timing import QuietProbe

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def capture(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[fx.GraphModule, list[Any]]:
    """The inference graph aot_autograd hands a backend for ``fn(*args, **kwargs)`` and the flat
    inputs of that call."""
    seen: list[tuple[fx.GraphModule, list[Any]]] = []

    def compiler(gm: fx.GraphModule, _example: Any) -> Any:
        def run(*flat: Any) -> Any:
            seen.append((gm, list(flat)))
            return gm(*flat)

        return make_boxed_func(run)

    backend = aot_autograd(
        fw_compiler=compiler, inference_compiler=compiler, keep_inference_input_mutations=True
    )
    with torch.no_grad():
        torch.compile(fn, backend=backend, dynamic=False)(*args, **kwargs)
    return seen[0]


def _llama(max_len: int, dtype: torch.dtype = torch.float32) -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_len,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


def _decode_graph(
    max_len: int, held: int, dtype: torch.dtype = torch.float32
) -> tuple[Any, fx.GraphModule, list[Any]]:
    """A Llama decode step over a ``StaticCache`` of ``max_len`` slots holding ``held`` random tokens."""
    model = _llama(max_len, dtype)
    cache = transformers.StaticCache(config=model.config, max_cache_len=max_len)
    with torch.no_grad():  # a prefill fills ``held`` slots
        model(input_ids=torch.randint(1, 256, (1, held)), cache=cache, use_cache=True)
    ids = torch.randint(1, 256, (1, 1))
    position = torch.tensor([held])
    gm, flat = capture(model.forward, input_ids=ids, cache=cache, cache_position=position)
    return cache, gm, flat


def _fresh(flat: list[Any]) -> list[Any]:
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]


def _ops(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_attention_and_in_place_updates_give_the_graph_s_values(dtype) -> None:
    """The rewritten decode graph, run as eager runs it (marked updates in place), returns bitwise
    the original graph's outputs and leaves the cache inputs as the original's ``copy_`` write-backs
    do; no ``clone`` of the cache is left, and each attention reads the cache's own KV heads."""
    torch.manual_seed(0)
    _, gm, flat = _decode_graph(128, 37, dtype)
    original = copy.deepcopy(gm)
    clones_before = sum("clone" in op for op in _ops(gm))
    done = rewrite_for_placing(gm, "inference")
    assert done == {"grouped attention": 2, "in-place cache updates": 4}, done
    assert clones_before >= 4 and not any("clone" in op for op in _ops(gm))
    marked = [n for n in gm.graph.nodes if n.meta.get(IN_PLACE)]
    assert len(marked) == 4 and all("index_copy" in str(n.target) for n in marked)
    for node in gm.graph.nodes:
        if "flash_attention" in str(node.target):
            assert node.args[1].meta["val"].shape[1] == 2  # Hkv, not Hq = 8

    want_inputs, got_inputs = _fresh(flat), _fresh(flat)
    with torch.no_grad():
        want = original(*want_inputs)
        got = run_marked_in_place(gm)(*got_inputs)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for w, g in zip(want_inputs, got_inputs):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert rewrite_for_placing(gm, "inference") == {"in-place cache updates": 4}  # nothing left to group


def test_graphs_that_do_not_qualify_are_left_alone() -> None:
    """A repeat_kv chain on the key only (the value has all heads), an ``index_copy`` whose cache is
    also read elsewhere, and any graph that is not an inference graph are not rewritten."""

    def step(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor
    ) -> Any:
        b, h, s, d = k.shape
        wide_k = k[:, :, None].expand(b, h, 4, s, d).reshape(b, h * 4, s, d)
        new = cache.index_copy(2, pos, q[:, :2])
        cache.index_copy_(2, pos, q[:, :2])
        return F.scaled_dot_product_attention(q, wide_k, v) + new.sum()

    q, v = torch.randn(1, 8, 1, 16), torch.randn(1, 8, 32, 16)
    k, cache = torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    gm, _ = capture(step, q, k, v, cache, torch.tensor([3]))
    before = _ops(gm)
    assert rewrite_for_placing(gm, "inference") == {}
    assert _ops(gm) == before and not any(n.meta.get(IN_PLACE) for n in gm.graph.nodes)

    _, decode, _ = _decode_graph(64, 5)
    assert rewrite_for_placing(decode, "forward") == {}


def test_the_in_place_mark_is_part_of_a_partition_s_key() -> None:
    """A partition holding a marked ``index_copy`` keeps the mark and has another cache key than the
    same partition unmarked: a cost measured in place is never read for the functional node."""
    _, gm, _ = _decode_graph(64, 5)
    node = next(n for n in gm.graph.nodes if "index_copy" in str(n.target))
    plain = extract(gm, [node])
    rewrite_for_placing(gm, "inference")
    marked = extract(gm, [node])
    assert plain.structure != marked.structure
    assert [n.meta.get(IN_PLACE) for n in marked.graph.nodes if n.op == "call_function"] == [True]


def _collage(model: Any, cache_dir: str, backends: tuple[str, ...]) -> list[GraphReport]:
    options = CollageOptions(
        backends=backends, max_depth=1, warmup=1, repeats=3, cache_dir=cache_dir, progress=False
    )
    reports: list[GraphReport] = []
    model.forward = torch.compile(
        model.forward, backend=make_backend(options, reports.append, Placer(probe=QuietProbe()))
    )
    return reports


def test_eager_alone_decodes_without_copying_the_cache(tmp_path) -> None:
    """Collage with eager only, on a Llama decode step over a 4096-slot cache: no op of the step
    allocates as much as one layer's key cache (the traced graph's ``repeat_kv`` clones and
    functional ``index_copy`` would, several times over), the cache keeps its storage and gets the
    step's rows, and the logits are eager's."""
    torch.manual_seed(3)
    max_len = 4096
    model = _llama(max_len)
    ids = torch.randint(1, 256, (1, 6))
    caches = [transformers.StaticCache(config=model.config, max_cache_len=max_len) for _ in range(2)]
    with torch.no_grad():
        want = [model(input_ids=ids, cache=caches[0], use_cache=True).logits]
        want.append(model(input_ids=ids[:, :1], cache=caches[0], use_cache=True).logits)
        reports = _collage(model, str(tmp_path), ("eager",))
        got = [model(input_ids=ids, cache=caches[1], use_cache=True).logits]
        got.append(model(input_ids=ids[:, :1], cache=caches[1], use_cache=True).logits)  # placed here
        pointers = [t.data_ptr() for layer in caches[1].layers for t in (layer.keys, layer.values)]
        with torch.profiler.profile(profile_memory=True) as prof:
            model(input_ids=ids[:, 1:2], cache=caches[1], use_cache=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(reports) == 2
    assert reports[1].rewrites == {"grouped attention": 2, "in-place cache updates": 4}
    markdown = ExplainReport(reports).to_markdown()
    assert (
        "Rewritten before placing (exact, see docs/collage.md): 2 grouped attention, 4 in-place" in markdown
    )
    largest = max((e.cpu_memory_usage, e.name) for e in prof.events())
    assert largest[0] < caches[1].layers[0].keys.nbytes, largest
    assert [t.data_ptr() for layer in caches[1].layers for t in (layer.keys, layer.values)] == pointers
    assert caches[1].layers[0].keys[:, :, 7].abs().sum() > 0  # the third call's token was written


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_runtimes_run_grouped_attention(backend) -> None:
    """ONNX Runtime and OpenVINO compile a partition of the rewritten decode graph holding a
    grouped attention node (K and V with 2 heads, 8 query heads) and compute eager's values
    ([Note: grouped attention for the exporters])."""
    spec = get_spec(backend)
    if not spec.available()[0]:
        pytest.skip(f"{backend} not installed")
    torch.manual_seed(5)
    _, gm, flat = _decode_graph(256, 40)
    rewrite_for_placing(gm, "inference")
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n] = super().run_node(n)
            return values[n]

    with torch.no_grad():
        Recorder(gm).run(*_fresh(flat))
    attention = next(n for n in gm.graph.nodes if "flash_attention" in str(n.target))
    sub = extract(gm, [attention, *attention.users])  # the node and its getitem
    inputs = tuple(values[n] for n in sub.inputs)
    assert inputs[1].shape[1] * 4 == inputs[0].shape[1]  # grouped: Hq = 4 * Hkv
    fn = spec.compile(sub.module, inputs)
    got = fn(*inputs)
    want = [values[n] for n in sub.outputs]
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
