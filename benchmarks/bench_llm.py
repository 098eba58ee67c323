"""LLM decoding on CPU: a Llama-architecture model with a static KV cache, every backend side by side.

    python benchmarks/bench_llm.py                                # the issue's model, 512 / 8K / 32K
    python benchmarks/bench_llm.py --contexts 8192 --batches 1 --backends eager,collage
    python benchmarks/bench_llm.py --small                        # a minute-long version (make demo)

The model (random weights, fp32): hidden 1024, 8 layers, 16 query heads, 4 KV heads, head dim 64,
FFN 2816, vocab 32000 (``--small``: hidden 256, 2 layers, contexts 512 and 4096). For each static
cache of ``Lmax`` slots and each batch, the cache holds ``--fill`` of ``Lmax`` tokens (random keys and
values: a 30,000-token prefill would take hours here) and one decode step is timed on every backend
side by side, in rounds, order rotated; the prefill of ``--prompt`` tokens is timed too.

Backends, each through ``torch.compile(model.forward, backend=...)`` with a ``transformers.StaticCache``:
- ``eager``; ``inductor`` (defaults);
- ``onnxruntime`` and ``openvino``: the whole ATen graph (weights frozen) on the runtime; its cache
  writes (the functionalized ``index_copy`` results, which the runtime returns) are copied into the
  cache tensors afterwards, as aot_autograd's graph does with ``copy_``;
- ``collage``: ``backend="collage"`` over every available backend (options: ``--collage-options``).
The ceiling row is (weight bytes + bytes of the valid keys and values) / the read bandwidth measured
here (``x.sum()`` over 1 GiB). The decode placement (which nodes run where) is printed and stored.
``--dtype bf16`` runs weights, cache and activations in bfloat16. Each backend's first decode step is
checked against eager's logits (within 1e-3 of their largest magnitude in float32, 2e-2 in bfloat16;
in bfloat16 also passing when at most twice as far as eager from the step run in float32) on the
cache as filled, and fails its row if it wrote cache slots other than the step's.
Writes ``benchmarks/results/llm_<hardware>.{json,md,png}``; the PNG shows decode tokens/s against
the context length.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch.utils._python_dispatch import _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find the packages

from benchmarks.harness import (
    DEFAULT_OUT_DIR,
    Column,
    PlotSpec,
    ResultTable,
    load_note,
    machine_info,
    measure_rounds,
    paired_ratio,
    print_header,
    progress,
    write_results,
)
from torch_collage.backends.registry import get_spec
from torch_collage.entry import make_backend
from torch_collage.freeze import freeze_inputs, static_input_indices
from torch_collage.options import CollageOptions
from torch_collage.report import GraphReport
from torch_collage.timing import measure

__all__ = ["main"]

FULL = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
            head_dim=64, intermediate_size=2816, vocab_size=32000)  # fmt: skip
SMALL = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             head_dim=32, intermediate_size=704, vocab_size=8000)  # fmt: skip
BACKENDS = ("eager", "inductor", "onnxruntime", "openvino", "collage")

COLUMNS = (
    Column("context", "Lmax"),
    Column("batch", "batch"),
    Column("held", "tokens held"),
    Column("backend", "backend"),
    Column("status", "status"),
    Column("median_ms", "decode ms", "{:.2f}"),
    Column("tokens_s", "decode tokens/s", "{:.1f}"),
    Column("vs_best", "vs best single", "{:.2f}x"),
    Column("prefill_ms", "prefill ms", "{:.1f}"),
    Column("compile_s", "compile s", "{:.0f}"),
    Column("error", "error"),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--contexts", default=None, help="static cache sizes (default 512,8192,32768; --small 512,4096)"
    )
    p.add_argument("--batches", default="1,4", help="batch sizes")
    p.add_argument("--skip", default="32768:4", help="Lmax:batch pairs not run (memory, time)")
    p.add_argument("--fill", type=float, default=0.9, help="fraction of the cache holding tokens")
    p.add_argument("--prompt", type=int, default=64, help="prefill length")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--collage-options", default="{}", help="JSON; merged over the defaults below")
    p.add_argument("--small", action="store_true", help="a small model and contexts (make demo)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--hardware", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights, cache and activations")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = p.parse_args(argv)
    args.contexts = [
        int(c) for c in (args.contexts or ("512,4096" if args.small else "512,8192,32768")).split(",")
    ]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.skip = {tuple(int(x) for x in s.split(":")) for s in args.skip.split(",") if s}
    args.backends = args.backends.split(",")
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown:
        p.error(f"unknown backend(s) {unknown}; valid: {', '.join(BACKENDS)}")
    args.collage_options = json.loads(args.collage_options)
    return args


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(small: bool, dtype: torch.dtype = torch.float32) -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**(SMALL if small else FULL), max_position_embeddings=1 << 16)
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


# --- a static cache holding `held` tokens, and one decode step over it -------------------------------
def filled_cache(model: Any, batch: int, lmax: int, held: int) -> Any:
    cfg = model.config
    cache = transformers.StaticCache(config=cfg, max_cache_len=lmax)
    cache.early_initialization(batch, cfg.num_key_value_heads, cfg.head_dim, model.dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(lmax + batch)
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            t[:, :, :held].copy_(torch.randn(t[:, :, :held].shape, generator=g))  # cast to the cache's dtype
        layer.cumulative_length.fill_(held)
    return cache


class Step:
    """One call of ``forward`` on ``ids`` at position ``held``: the cache's counters are put back to
    ``held`` first, so every timed call writes the same slots and reads the same tokens."""

    def __init__(self, forward: Callable[..., Any], cache: Any, ids: torch.Tensor, held: int) -> None:
        self.forward, self.cache, self.ids, self.held = forward, cache, ids, held
        self.position = torch.arange(held, held + ids.shape[1])

    def __call__(self) -> torch.Tensor:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(self.held)
        out = self.forward(input_ids=self.ids, cache=self.cache, cache_position=self.position)
        return out.logits


# --- whole graph on one runtime ----------------------------------------------------------------------
class _WholeGraph:
    """An aot_autograd inference graph compiled whole on runtime ``name`` on its first call (weights
    frozen); the graph's writes into its inputs (``copy_`` nodes: cache and counters) are taken out
    of it, their values returned by the runtime and copied into the inputs afterwards."""

    def __init__(self, name: str, gm: fx.GraphModule, static: tuple[int, ...]) -> None:
        self.name, self.gm, self.static = name, gm, static
        self.fn: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.fn is None:
            with _disable_current_modes():
                self.fn = self._compile(args)
        return self.fn(*args)

    def _compile(self, args: Sequence[Any]) -> Callable[..., Any]:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        gm = fx.GraphModule(self.gm, self.gm.graph)  # a copy to cut the writes out of
        gm.graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        writes: list[tuple[int, fx.Node]] = []
        for node in self.gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.aten.copy_.default:
                writes.append((placeholders.index(node.args[0]), node.args[1]))
                env[node] = env[node.args[0]]
            elif node.op == "output":
                outs = fx.node.map_arg(node.args[0], env.__getitem__)
                gm.graph.output((*outs, *(env[src] for _, src in writes)))
            else:
                env[node] = gm.graph.node_copy(node, env.__getitem__)
        gm.recompile()
        n_out = len(next(n for n in self.gm.graph.nodes if n.op == "output").args[0])
        keep = [i for i in range(len(args)) if i not in self.static]
        frozen = freeze_inputs(gm, args, self.static)
        with torch.no_grad():
            compiled = get_spec(self.name).compile(frozen, tuple(args[i] for i in keep))
        targets = [i for i, _ in writes]

        def run(*call_args: Any) -> Any:
            got = compiled(*[call_args[i] for i in keep])
            for i, value in zip(targets, got[n_out:]):
                call_args[i].copy_(value)
            return tuple(got[:n_out])

        return run


def whole_graph_backend(name: str) -> Callable[..., Any]:
    def compiler(gm: fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        return make_boxed_func(_WholeGraph(name, gm, static_input_indices()))

    return aot_autograd(
        fw_compiler=compiler, inference_compiler=compiler, keep_inference_input_mutations=True
    )


# --- one (Lmax, batch) configuration --------------------------------------------------------------
def compiled_forwards(
    model: Any, backends: Sequence[str], options: dict[str, Any], reports: list[GraphReport]
) -> dict[str, Callable[..., Any]]:
    fns: dict[str, Callable[..., Any]] = {}
    for name in backends:
        if name == "eager":
            fns[name] = model.forward
        elif name == "inductor":
            fns[name] = torch.compile(model.forward, backend="inductor", dynamic=False)
        elif name == "collage":
            backend = make_backend(CollageOptions.from_mapping(options), reports.append)
            fns[name] = torch.compile(model.forward, backend=backend, dynamic=False)
        else:
            fns[name] = torch.compile(model.forward, backend=whole_graph_backend(name), dynamic=False)
    return fns


def _rss_gb() -> float:
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * 4096 / 1e9 if statm.exists() else math.nan


def run_config(
    model: Any, lmax: int, batch: int, args: argparse.Namespace, options: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[GraphReport]]:
    """The decode step on every backend side by side, then the prefill on one backend at a time, each
    phase with compiled forwards of its own, so that at most one compiled graph per backend holds its
    copy of the weights at a time (with both graphs alive, Lmax 8K at batch 4 ran out of 24 GB; with
    every prefill alive at once, 32K did)."""
    held = int(lmax * args.fill)
    g = torch.Generator().manual_seed(batch)
    decode_ids = torch.randint(1, model.config.vocab_size, (batch, 1), generator=g)
    prompt_ids = torch.randint(1, model.config.vocab_size, (batch, args.prompt), generator=g)
    # One cache for every backend: each call resets the counters and writes the same slots with the
    # same token.
    decode_cache = filled_cache(model, batch, lmax, held)
    with torch.no_grad():
        want = Step(model.forward, decode_cache, decode_ids, held)()
        ref = _float32_logits(model, decode_cache, decode_ids, held) if model.dtype != torch.float32 else None
    rows, decode, reports = _phase(model, args, options, f"Lmax {lmax}, batch {batch}: decode", decode_cache,
                                   decode_ids, held, want, rounds=args.rounds, repeats=args.repeats, ref=ref)  # fmt: skip
    del decode_cache
    prefill_cache = filled_cache(model, batch, lmax, 0)
    prefill_ms: dict[str, float] = {}
    for name in args.backends:  # one backend at a time: the prefill is timed alone, not side by side
        prefill_rows, prefill, _ = _phase(model, args, options, f"Lmax {lmax}, batch {batch}: prefill",
                                          prefill_cache, prompt_ids, 0, None, rounds=1, repeats=3,
                                          backends=[name])  # fmt: skip
        if name in rows:
            rows[name]["compile_s"] += prefill_rows.get(name, {}).get("compile_s", 0.0)
        prefill_ms.update({n: min(m.median_ms for m in blocks) for n, blocks in prefill.items()})
    return _rows(lmax, batch, held, rows, decode, prefill_ms), reports


def _float32_logits(model: Any, cache: Any, ids: torch.Tensor, held: int) -> torch.Tensor:
    """The decode step's logits with the weights and the cache (as filled) raised to float32: the
    reference a low-precision backend is judged against."""
    wide = copy.deepcopy(model).float()
    wide_cache = filled_cache(wide, ids.shape[0], cache.layers[0].keys.shape[2], held)
    for t, low in zip(_cache_tensors(wide_cache), _cache_tensors(cache)):
        t.copy_(low)
    out = Step(wide.forward, wide_cache, ids, held)()
    del wide, wide_cache
    return out


def _check(got: torch.Tensor, want: torch.Tensor, ref: torch.Tensor | None, tol: float) -> str:
    """Why ``got`` fails against eager's ``want`` ("" when it passes): within ``tol`` of the largest
    logit; in low precision, or at most twice as far from the float32 ``ref`` as eager is (the rule
    collage's own check follows: [Note: low-precision placements against a float32 reference])."""
    err = (got - want).abs().max().item()
    if err <= tol * want.abs().max().item() + 1e-4:
        return ""
    if ref is not None:
        mine, eager = (got.float() - ref).abs().max().item(), (want.float() - ref).abs().max().item()
        if mine <= 2 * eager + 1e-3 * ref.abs().max().item():
            return ""
        return f"logits {mine:.2e} from the float32 reference, eager {eager:.2e}"
    return f"logits differ by {err:.2e}"


def _phase(model, args, options, label, cache, ids, held, want, *, rounds, repeats, backends=None, ref=None):
    """Compile ``forward`` on every backend (or ``backends``), check it against ``want`` (when given),
    time the calls side by side; the compiled graphs are released before returning."""
    torch._dynamo.reset()
    gc.collect()  # the previous phase's compiled graphs (runtime sessions hold weights)
    reports: list[GraphReport] = []
    forwards = compiled_forwards(model, backends or args.backends, options, reports)
    steps, rows = {}, {}
    tol = TOLERANCE[model.dtype]
    # each backend is checked on the cache as filled: one that writes slots other than the step's
    # would otherwise hand the next backends another cache (and fail their check, not its own)
    pristine = [t.clone() for t in _cache_tensors(cache)] if want is not None else []
    with torch.no_grad():
        for name, fwd in forwards.items():
            progress(f"{label}: {name} (RSS {_rss_gb():.1f} GB)")
            start = time.perf_counter()
            for t, p in zip(_cache_tensors(cache), pristine):
                t.copy_(p)
            try:
                step = Step(fwd, cache, ids, held)
                got = step()
                reason = "" if want is None else _check(got, want, ref, tol)
                if not reason and _wrote_elsewhere(cache, pristine, held, ids.shape[1]):
                    reason = "wrote cache slots other than the step's"
            except Exception as exc:  # a failing backend is a row, not the end of the benchmark
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            rows[name] = {"status": "fail" if reason else "ok", "error": reason[:200],
                          "compile_s": time.perf_counter() - start}  # fmt: skip
            if not reason:
                steps[name] = step
        timed = measure_rounds(steps, rounds=rounds, repeats=repeats, warmup=2)
    del forwards, steps
    torch._dynamo.reset()
    gc.collect()
    return rows, timed, reports


TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}  # of max |logits|: float32 vs bfloat16 rounding


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _wrote_elsewhere(cache: Any, pristine: list[torch.Tensor], held: int, tokens: int) -> bool:
    """Whether a step at ``held`` changed a cache slot outside ``[held, held + tokens)``."""
    for t, p in zip(_cache_tensors(cache), pristine):
        if not (
            torch.equal(t[:, :, :held], p[:, :, :held])
            and torch.equal(t[:, :, held + tokens :], p[:, :, held + tokens :])
        ):
            return True
    return False


def _rows(lmax, batch, held, rows, decode, prefill_ms) -> list[dict[str, Any]]:
    medians = {n: [m.median_ms for m in blocks] for n, blocks in decode.items()}
    singles = [n for n in medians if n != "collage"]
    best = min(singles, key=lambda n: sorted(medians[n])[len(medians[n]) // 2]) if singles else None
    out = []
    for name, row in rows.items():
        ms = medians.get(name, [])
        mid = sorted(ms)[len(ms) // 2] if ms else math.nan
        vs = paired_ratio(medians[best], ms) if ms and best else math.nan
        out.append({"context": lmax, "batch": batch, "held": held, "backend": name, **row, "median_ms": mid,
                    "tokens_s": batch * 1e3 / mid if ms else math.nan, "vs_best": vs,
                    "prefill_ms": prefill_ms.get(name, math.nan)})  # fmt: skip
    return out


# --- the ceiling -----------------------------------------------------------------------------------
def read_bandwidth_gbs() -> float:
    x = torch.ones(1 << 28)  # 1 GiB of float32
    ms = measure(lambda: x.sum(), warmup=2, repeats=7).median_ms
    return x.nbytes / ms / 1e6


def weight_bytes(model: Any) -> int:
    """Bytes a decode step reads: every parameter but the token embedding (one row of it is read)."""
    embed = model.get_input_embeddings().weight
    return sum(p.nbytes for p in model.parameters() if p is not embed)


def ceiling_row(model: Any, lmax: int, batch: int, held: int, gbs: float) -> dict[str, Any]:
    cfg = model.config
    kv = (
        batch
        * held
        * cfg.num_hidden_layers
        * 2
        * cfg.num_key_value_heads
        * cfg.head_dim
        * model.dtype.itemsize
    )
    ms = (weight_bytes(model) + kv) / gbs / 1e6
    return {"context": lmax, "batch": batch, "held": held, "backend": "ceiling", "status": "model",
            "median_ms": ms, "tokens_s": batch * 1e3 / ms, "vs_best": math.nan, "prefill_ms": math.nan,
            "compile_s": math.nan, "error": f"(weights {weight_bytes(model) / 1e6:.0f} MB + KV {kv / 1e6:.0f} MB) "
            f"/ {gbs:.1f} GB/s"}  # fmt: skip


# --- placement, plot, notes -------------------------------------------------------------------------
def placement_lines(lmax: int, batch: int, reports: Sequence[GraphReport]) -> list[str]:
    """The decode graph's placement (the graph placed for one token), one line per backend."""
    if not reports:
        return []
    report = reports[-1]
    per: dict[str, list[str]] = {}
    for p in report.partitions:
        per.setdefault(p.backend, []).extend(p.nodes)
    parts = []
    for backend, nodes in per.items():
        attn = sum("attention" in n for n in nodes)
        updates = sum(n.startswith("index_copy") for n in nodes)
        mm = sum(n.startswith(("mm", "addmm")) for n in nodes)
        parts.append(
            f"{backend}: {len(nodes)} nodes ({mm} matmuls, {attn} attention, {updates} cache updates)"
        )
    return [f"decode placement at Lmax {lmax}, batch {batch} (chose {report.chosen}, "
            f"{len(report.partitions)} partitions; end to end " + ", ".join(f"{k} {v:.2f} ms" for k, v in report.end_to_end_ms.items()) + "): " + "; ".join(parts)]  # fmt: skip


def plot_tokens(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Decode tokens/s against Lmax, one line per backend and batch (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    keys = sorted(
        {(r["backend"], r["batch"]) for r in rows},
        key=lambda k: (k[1], BACKENDS.index(k[0]) if k[0] in BACKENDS else 99),
    )
    for backend, batch in keys:
        pts = sorted((r["context"], r["tokens_s"]) for r in rows
                     if r["backend"] == backend and r["batch"] == batch and math.isfinite(r["tokens_s"]))  # fmt: skip
        if pts:
            style = "--" if backend == "ceiling" else "-"
            ax.plot(*zip(*pts), style, marker="o", label=f"{backend}, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("static cache size Lmax (tokens held: the fill fraction of it)")
    ax.set_ylabel("decode tokens/s (higher is better)")
    ax.set_title("LLM decode on CPU, fp32")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def target_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for lmax, goal in ((512, 0.97), (8192, 1.3), (32768, 1.8)):
        r = [x for x in rows if x["context"] == lmax and x["batch"] == 1 and x["backend"] == "collage"]
        if r and math.isfinite(r[0]["vs_best"]):
            verdict = "met" if r[0]["vs_best"] >= goal else "missed"
            lines.append(f"target at Lmax {lmax}, batch 1: collage >= {goal}x the best single backend: "
                         f"{r[0]['vs_best']:.2f}x, {verdict}")  # fmt: skip
    return lines


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "unknown"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64
    info = machine_info()
    print_header(info)
    progress(f"load before: {_loadavg()}")
    model = build_model(args.small, DTYPES[args.dtype])
    gbs = read_bandwidth_gbs()
    table = ResultTable(COLUMNS)
    placements: list[str] = []
    notes: list[str] = []
    paths: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="collage-llm-") as cache_dir:  # a cold search each run
        options = {"cache_dir": cache_dir, "progress": False, **args.collage_options}
        for lmax in args.contexts:
            for batch in args.batches:
                if (lmax, batch) in args.skip:
                    continue
                rows, reports = run_config(model, lmax, batch, args, options)
                for row in [*rows, ceiling_row(model, lmax, batch, int(lmax * args.fill), gbs)]:
                    table.add(**row)
                placements += placement_lines(lmax, batch, reports)
                for line in placements[-1:]:
                    progress(line)
                # written after every configuration: a later one that fails keeps what was measured
                notes = _notes(args, model, gbs, options, placements, table, info)
                paths = _write(args, info, table, notes)
    progress(f"load after: {_loadavg()}")
    for line in notes:
        print(f"- {line}")
    if paths:
        print(f"wrote {paths['md']}")
    else:
        print("nothing run: every configuration was skipped")


def _notes(args, model, gbs, options, placements, table, info) -> list[str]:
    skipped = ", ".join(f"{a}:{b}" for a, b in sorted(args.skip)) or "none"
    return [
        f"model: {'SMALL' if args.small else 'FULL'} {json.dumps(SMALL if args.small else FULL)}, {args.dtype}, "
        f"{weight_bytes(model) / 1e6:.0f} MB of weights read per step; cache filled to {args.fill} of Lmax "
        f"with random keys and values; prefill of {args.prompt} tokens; skipped (Lmax:batch): {skipped}.",
        f"decode timed side by side, {args.rounds} rounds of {args.repeats} calls, rotated order; 'vs best "
        f"single' is the paired ratio of the fastest single backend's time to this row's (above 1: faster); "
        f"{torch.get_num_threads()} threads; read bandwidth {gbs:.1f} GB/s (x.sum() over 1 GiB).",
        f"collage options: {json.dumps({k: v for k, v in options.items() if k != 'cache_dir'})}.",
        *placements,
        *target_lines(table.rows),
        load_note(info),
    ]


def _write(args, info, table, notes) -> dict[str, Path]:
    plot = PlotSpec(group_keys=("context", "batch"), series_key="backend", baseline=None,
                    ylabel="decode time relative to the fastest (lower is better)")  # fmt: skip
    paths = write_results("llm", args.hardware, info, table, notes=notes, out_dir=args.out_dir, plot=plot)
    plot_tokens(table.rows, paths["png"])
    return paths


if __name__ == "__main__":
    main()
