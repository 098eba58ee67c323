"""GraphPipe vs every chain schedule of torch.distributed.pipelining: iteration time of pipeline training on CPU.

    python benchmarks/bench_graphpipe.py                       # all workloads (about 7 minutes on 2 cores)
    python benchmarks/bench_graphpipe.py --workloads two_branch,chain
    python benchmarks/bench_graphpipe.py --plans-only --workloads mmt,dlrm,candle_uno   # plans, no run

Every stage is one gloo process. This machine has 2 cores and a pipeline has up to 8 stages, so stage
compute is EMULATED: each stage runs the tiny version of the model (same operator graph, so the same
plan applies), and each of its compute actions lasts its planned cost, as if it ran on a device of
its own: the action's real work, then a sleep for the rest of its cost (see [Note: emulated device
time] in benchmarks/graphpipe_workloads.py). The costs are fixed units for the synthetic models and,
for the zoo models, per-operator times profiled on the full-size model (one thread) and scaled so
that a stage takes ``--target-ms`` per micro-batch on average (more where the tiny model's real
work needs it, see [Note: emulated time and real work] in benchmarks/graphpipe_workloads.py). For
each workload the runtimes run side by side, rotating order: GraphPipe on the DAG plan, GraphPipe
on the best chain plan, and each of torch 2.13's chain schedules
(``benchmarks.graphpipe_torch_schedules``: GPipe, 1F1B, Interleaved1F1B, LoopedBFS,
InterleavedZeroBubble, ZBVZeroBubble, DualPipeV) on the chain split with as many stages per rank as
it needs, at the same batch and micro-batch size, with each runtime's predicted peak memory per
device beside it; one that cannot run is a row saying why. Beside the measured median the table gives the
simulator's prediction for the same plan and sleeps (messages cost the measured gloo latency), the
planning time, and the peak in-flight micro-batches per stage (simulated / measured from GraphPipe's
own trace). Writes ``benchmarks/results/graphpipe_cpu.{json,md,png}`` and timeline PNGs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find the packages

from benchmarks.graphpipe_baseline import TORCH_SCHEDULES
from benchmarks.graphpipe_torch_schedules import LABELS as TORCH_LABELS
from benchmarks.graphpipe_torch_schedules import (
    WEIGHT_SHARE,
    TorchRun,
    build_runners,
    gp_memory,
    peak_held,
    torch_memory,
)
from benchmarks.graphpipe_workloads import EmulatedDevice, Workload, stage_ms, workloads
from benchmarks.harness import (
    DEFAULT_OUT_DIR,
    Column,
    PlotSpec,
    ResultTable,
    load_note,
    machine_info,
    print_header,
    progress,
    rotated_orders,
    write_results,
)
from torch_graphpipe import (
    CommModel,
    CostTable,
    GraphPipe,
    OpCost,
    Plan,
    capture,
    plan_graph,
    plan_stages,
    plot_timeline,
    profile_graph,
    simulate,
)
from torch_graphpipe.calibrate import Calibration, fit_calibration, simulate_calibrated, traced_result
from torch_graphpipe.groups import stages_from_module_groups
from torch_graphpipe.simulator import SimulationResult

LABELS = {  # GraphPipe's plan key -> runtime label
    "dag": "GraphPipe (DAG, planner)",
    "dag_zb": "GraphPipe (DAG, zero-bubble)",
    "dag_explicit": "GraphPipe (DAG, explicit partition)",
    "chain": "GraphPipe (chain)",
}
BASELINE = TORCH_LABELS["Schedule1F1B"]
PLAN_COMM = CommModel(alpha_ms=0.3, bytes_per_ms=1.0e6)  # gloo over loopback, for planning
PROFILE_REPEATS = 51  # samples per operator: with 11, back-to-back runs chose different chain splits (see [Note: plans that reproduce])
CORES = len(os.sched_getaffinity(0))


def _costs(wl: Workload, microbatch: int, target_ms: float) -> tuple[CostTable, float]:
    """Operator costs for ``wl`` (scaled, ms) and the profiling time (s)."""
    start = time.perf_counter()
    if wl.profiled:
        model = wl.build("full")
        captured = capture(model)
        inputs, _ = wl.batch("full", microbatch)
        raw = profile_graph(
            captured.graph_module, captured.graph, inputs, repeats=PROFILE_REPEATS, microbatch_size=microbatch
        )
        graph = captured.graph
    else:
        graph = capture(wl.build("tiny")).graph
        unit = {n.name: 1.0 if n.target.endswith("lin") else 0.0 for n in graph.nodes}
        raw = CostTable(
            ops={
                k: OpCost(fwd_ms=u, bwd_ms=2 * u, wgt_ms=2 * u * WEIGHT_SHARE, out_bytes=4096)
                for k, u in unit.items()
            }
        )
    elapsed = time.perf_counter() - start
    total = sum(c.fwd_ms + c.bwd_ms for c in raw.ops.values())
    scale = target_ms * wl.stages / total
    ops = {
        k: dataclasses.replace(
            c,
            fwd_ms=c.fwd_ms * scale,
            bwd_ms=c.bwd_ms * scale,
            wgt_ms=c.wgt_ms * scale,
            fwd_spread_ms=c.fwd_spread_ms * scale,
            bwd_spread_ms=c.bwd_spread_ms * scale,
        )
        for k, c in raw.ops.items()
    }
    return CostTable(ops=ops, comm=PLAN_COMM, microbatch_size=raw.microbatch_size), elapsed


def _plans(wl: Workload, costs: CostTable, microbatches: int) -> tuple[dict[str, Plan], dict[int, Plan]]:
    """GraphPipe's plans by key, and the chain splits for torch's schedules by stages per rank."""
    graph = capture(wl.build("tiny")).graph
    plans = {kind: plan_graph(graph, costs, wl.stages, microbatches, kind) for kind in ("dag", "chain")}
    plans["dag_zb"] = plan_graph(graph, costs, wl.stages, microbatches, schedule_kind="zero_bubble")
    if wl.groups is not None:
        plans["dag_explicit"] = plan_stages(
            graph, costs, stages_from_module_groups(graph, wl.groups), microbatches
        )
    per_rank = sorted({v for v, _ in TORCH_SCHEDULES.values()})
    chains = {v: plan_graph(graph, costs, v * wl.stages, microbatches, "chain") for v in per_rank}
    return plans, chains


def plan_id(p: Plan) -> str:
    """A short fingerprint of a plan's partition and schedule (equal ids: the same plan)."""
    text = repr([s.node_names for s in p.stages]) + str(p.schedule)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def plans_only(wl: Workload, args: argparse.Namespace) -> list[str]:
    """Profile and plan ``wl`` as a full run would, without running it: one line per plan."""
    costs, profile_s = _costs(wl, args.profile_microbatch, stage_ms(wl, args)[0])
    plans, chains = _plans(wl, costs, args.microbatches)
    named = {LABELS[k]: p for k, p in plans.items()} | {
        f"chain split, {v} stage(s)/rank": p for v, p in chains.items()
    }
    return [
        f"{wl.name} | {label} | plan {plan_id(p)} | in-flight {'/'.join(str(s.in_flight) for s in p.stages)} | "
        f"simulated {p.simulate().iteration_time:.1f} ms | margin {p.margin:.1%} | profiling {profile_s:.1f} s"
        for label, p in named.items()
    ]


# -- the distributed run (one process per stage) -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    workload: str
    plans: dict[str, Plan]  # GraphPipe's
    chains: dict[int, Plan]  # chain splits for torch's schedules, by stages per rank
    microbatches: int
    batch: int
    rounds: int
    steps: int
    out: str


def _ping_ms(rank: int) -> float:
    """One-way latency of a small gloo message between ranks 0 and 1 (ms)."""
    t = torch.zeros(16)
    start = time.perf_counter()
    for _ in range(50):
        if rank == 0:
            dist.send(t, 1)
            dist.recv(t, 1)
        elif rank == 1:
            dist.recv(t, 0)
            dist.send(t, 0)
    value = torch.tensor([(time.perf_counter() - start) * 1e3 / 100])
    dist.broadcast(value, 0)
    return float(value)


def _runners(
    job: Job, wl: Workload, rank: int
) -> tuple[dict[str, Callable[[], Any]], dict[str, GraphPipe], dict[str, TorchRun]]:
    torch.manual_seed(0)
    model = wl.build("tiny")
    inputs, target = wl.batch("tiny", job.batch)
    kw = {"example_inputs": inputs, "loss_fn": wl.loss_fn, "num_microbatches": job.microbatches}
    pipes, runners = {}, {}
    for key, p in job.plans.items():
        gp = GraphPipe(copy.deepcopy(model), partition=p, **kw)
        costs = {kind: ms for (s, kind), ms in gp.plan.action_costs().items() if s == rank}
        device = EmulatedDevice(costs)
        gp.runtime.around_action = lambda a, d=device: d.action(a.kind)
        pipes[LABELS[key]] = gp
        runners[LABELS[key]] = lambda gp=gp: gp.step(*inputs, target=target)
    torch_runners, runs = build_runners(model, inputs, target, wl.loss_fn, job.chains)
    return runners | torch_runners, pipes, runs


def _time(
    runners: dict[str, Callable[[], Any]], rounds: int, steps: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per runtime, the step times (ms) and this process's CPU seconds during them."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu = dict.fromkeys(runners, 0.0)
    for order in rotated_orders(list(runners), rounds):
        for name in order:
            runners[name]()  # warm-up (and torch.distributed.pipelining's shape inference)
            for _ in range(steps):
                dist.barrier()
                start, start_cpu = time.perf_counter(), time.process_time()
                runners[name]()
                dist.barrier()
                times[name].append((time.perf_counter() - start) * 1e3)
                cpu[name] += time.process_time() - start_cpu
    return times, cpu


def _trace(gp: GraphPipe, run: Callable[[], Any]) -> list[list[tuple[str, int, float, float]]]:
    """F/B intervals of every stage during one step (perf_counter seconds; one clock on one machine)."""
    gp.runtime.events = []
    dist.barrier()
    run()
    events, gp.runtime.events = gp.runtime.events, None
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, events)
    return gathered


def _worker(rank: int, world: int, init: str, job: Job) -> None:
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    torch.set_num_threads(1)
    try:
        alpha = _ping_ms(rank)
        wl = workloads()[job.workload]
        runners, pipes, runs = _runners(job, wl, rank)
        times, cpu = _time(runners, job.rounds, job.steps)
        cpus: list[Any] = [None] * world
        dist.all_gather_object(cpus, cpu)
        events = {label: _trace(gp, runners[label]) for label, gp in pipes.items()}
        if rank == 0:
            executed = {label: gp.plan for label, gp in pipes.items()}
            payload = {
                "times": times,
                "cpu_s": {label: sum(c[label] for c in cpus) for label in times},
                "alpha_ms": alpha,
                "events": events,
                "executed": executed,
                "torch": runs,
            }
            torch.save(payload, job.out)
        dist.barrier()  # no rank leaves while a peer still talks to it
    except Exception:  # mp.spawn reports only the first rank to fail, often a victim: say who failed first
        progress(f"rank {rank} failed:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    # gloo's threads, torn down with the interpreter, now and then call std::terminate ("terminate
    # called without an active exception", SIGABRT) after a step that passed: leave at once instead
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- results -------------------------------------------------------------------------------------


def _simulate(p: Plan, alpha_ms: float) -> SimulationResult:
    fwd = [s.cost.fwd_ms for s in p.stages]
    bwd = [s.cost.bwd_ms for s in p.stages]
    return simulate(p.schedule, fwd, bwd, dict.fromkeys(p.edges, alpha_ms), p.late_cost(), wgt=p.wgt_cost())


def _rows(
    name: str, job: Job, result: dict[str, Any], profile_s: float, out_dir: Path, param_copies: float
) -> list[dict[str, Any]]:
    alpha, plans = result["alpha_ms"], result["executed"]
    plans[BASELINE] = plans[LABELS["chain"]]  # Schedule1F1B on the chain plan: the same schedule
    base = statistics.median(result["times"][BASELINE])
    chain = LABELS["chain"]
    cal = (
        fit_calibration(result["events"][chain], plans[chain])
        if chain in result["events"]
        else Calibration(latency_ms=alpha)
    )
    rows = []
    for label, samples in result["times"].items():
        q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
        median = statistics.median(samples)
        row = {
            "model": name, "runtime": label, "microbatches": job.microbatches, "median_ms": median,
            "iqr_ms": q[2] - q[0], "speedup": base / median, "profile_s": profile_s, "status": "ok",
            "alpha_ms": alpha, "samples_ms": samples,
            "cpu_busy": result["cpu_s"][label] / (CORES * sum(samples) / 1e3),
        }  # fmt: skip
        run = result["torch"].get(label)
        if run is not None:
            chain_plan = job.chains[run["per_rank"]]
            memory = torch_memory(run["order"], chain_plan, param_copies)
            row |= {"stages": chain_plan.num_stages, "peak_sim": "/".join(map(str, peak_held(run["order"])))}
            row |= {"memory": memory, "plan_s": chain_plan.planning_time_s}
        if label in plans:
            row |= _plan_columns(name, label, plans[label], alpha, cal, result["events"].get(label), out_dir)
            row |= {"meas_over_sim": median / row["sim_ms"], "meas_over_cal": median / row["sim_cal_ms"]}
            if run is None:
                row["memory"] = gp_memory(plans[label], row["_peaks"], param_copies)
        row.pop("_peaks", None)
        rows.append(row)
    for label, run in result["torch"].items():
        if run["error"] is not None:
            rows.append({"model": name, "runtime": label, "stages": job.chains[run["per_rank"]].num_stages,
                         "microbatches": job.microbatches, "status": "cannot run", "error": run["error"]})  # fmt: skip
    budget = max(next(r for r in rows if r["runtime"] == BASELINE)["memory"])
    for row in rows:
        if "memory" in row:
            row["memory_mb"] = max(row["memory"]) / 1e6
            row["memory_ratio"] = max(row["memory"]) / budget
            row["within_budget"] = max(row["memory"]) <= budget * (1 + 1e-9)
    return rows


def _plan_columns(
    name: str, label: str, plan: Plan, alpha: float, cal: Calibration, events: Any, out_dir: Path
) -> dict[str, Any]:
    """Simulated, calibrated and traced columns of a runtime that runs one of our plans."""
    sim = _simulate(plan, alpha)
    sim_cal = simulate_calibrated(plan, cal).iteration_time
    measured = traced_result(events) if events is not None else None
    pngs = []
    if "DAG" in label or label == BASELINE:
        tag = label.split("(")[1].rstrip(")").replace(", ", "_").replace(" ", "_")
        path = out_dir / f"graphpipe_cpu_{name}_sim_{tag}.png"
        pngs.append(plot_timeline(sim, path, title=f"{name}: simulated {label}"))
        if measured is not None:
            path = out_dir / f"graphpipe_cpu_{name}_measured_{tag}.png"
            pngs.append(plot_timeline(measured, path, title=f"{name}: measured {label}"))
    return {
        "stages": plan.num_stages, "sim_ms": sim.iteration_time, "sim_cal_ms": sim_cal,
        "overrun_ms": cal.overrun_ms, "message_ms": cal.message_ms, "latency_ms": cal.latency_ms,
        "plan_s": plan.planning_time_s, "margin": plan.margin, "plan_id": plan_id(plan),
        "peak_sim": "/".join(map(str, sim.peak_in_flight)),
        "peak_meas": "/".join(map(str, measured.peak_in_flight)) if measured is not None else None,
        "pngs": [p.name for p in pngs], "_peaks": sim.peak_in_flight,
    }  # fmt: skip


COLUMNS = (
    Column("model", "model"),
    Column("runtime", "runtime"),
    Column("stages", "stages"),
    Column("microbatches", "micro-batches"),
    Column("median_ms", "median ms", "{:.1f}"),
    Column("iqr_ms", "IQR ms", "{:.1f}"),
    Column("sim_ms", "simulated ms", "{:.1f}"),
    Column("meas_over_sim", "measured/sim", "{:.3f}"),
    Column("sim_cal_ms", "calibrated sim ms", "{:.1f}"),
    Column("meas_over_cal", "measured/calibrated", "{:.3f}"),
    Column("speedup", "speedup vs 1F1B", "{:.2f}x"),
    Column("cpu_busy", "CPU busy", "{:.0%}"),
    Column("memory_mb", "peak MB/device (pred.)", "{:.2f}"),
    Column("memory_ratio", "memory / 1F1B's", "{:.2f}"),
    Column("plan_s", "planning s", "{:.3f}"),
    Column("margin", "cost margin", "{:.1%}"),
    Column("plan_id", "plan id"),
    Column("profile_s", "profiling s", "{:.1f}"),
    Column("peak_sim", "peak in-flight (sim / schedule)"),
    Column("peak_meas", "peak in-flight (measured)"),
    Column("error", "error"),
)


def run_workload(wl: Workload, args: argparse.Namespace, out_dir: Path) -> list[dict[str, Any]]:
    target, real = stage_ms(wl, args)
    costs, profile_s = _costs(wl, args.profile_microbatch, target)
    plans, chains = _plans(wl, costs, args.microbatches)
    progress(f"{wl.name}: {target:.1f} ms per stage and micro-batch (tiny model's real work {real:.2f} ms); "
             f"planned DAG in {plans['dag'].planning_time_s:.3f} s, chain in "
             f"{plans['chain'].planning_time_s:.3f} s; running {wl.stages} processes")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_gp_") as tmp:
        job = Job(wl.name, plans, chains, args.microbatches, 2 * args.microbatches, args.rounds, args.steps,
                  os.path.join(tmp, "result.pt"))  # fmt: skip
        mp.spawn(_worker, args=(wl.stages, "file://" + os.path.join(tmp, "store"), job), nprocs=wl.stages)
        result = torch.load(job.out, weights_only=False)
    rows = _rows(wl.name, job, result, profile_s, out_dir, costs.param_copies)
    for row in rows:
        row |= {"stage_ms": target, "real_ms": real}
    return rows


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if r.get("status") == "ok"):
        mine = {r["runtime"]: r for r in rows if r["model"] == model and r.get("status") == "ok"}
        dag = max((r for k, r in mine.items() if "DAG" in k), key=lambda r: r["speedup"])
        chain = mine[LABELS["chain"]]
        torch_rows = [r for k, r in mine.items() if k in TORCH_LABELS.values()]
        fit = [r for r in torch_rows if r["within_budget"]]
        best = max(fit, key=lambda r: r["speedup"])
        fastest = max(torch_rows, key=lambda r: r["speedup"])
        over = "" if fastest is best else (
            f" (fastest at any memory: {fastest['runtime']} {fastest['speedup']:.2f}x, "
            f"{fastest['memory_ratio']:.2f}x Schedule1F1B's memory)"
        )  # fmt: skip
        cannot = [
            r["runtime"].split(" ")[0]
            for r in rows
            if r["model"] == model and r.get("status") == "cannot run"
        ]
        ratios = [r["meas_over_sim"] for r in mine.values() if "meas_over_sim" in r]
        calibrated = [r["meas_over_cal"] for r in mine.values() if "meas_over_cal" in r]
        out.append(
            f"{model}: {dag['runtime']} {dag['speedup']:.2f}x the speed of Schedule1F1B (simulated "
            f"{mine[BASELINE]['sim_ms'] / dag['sim_ms']:.2f}x) and {dag['speedup'] / best['speedup']:.2f}x the best "
            f"torch schedule within Schedule1F1B's memory, {best['runtime']} ({best['speedup']:.2f}x){over}"
            f"{'; cannot run: ' + ', '.join(cannot) if cannot else ''}; predicted memory per device "
            f"{dag['memory_ratio']:.2f}x Schedule1F1B's; stage-0 in-flight {dag['peak_sim'].split('/')[0]} vs "
            f"{chain['peak_sim'].split('/')[0]}; GraphPipe's step time on the chain plan "
            f"{1 / chain['speedup'] - 1:+.1%} vs Schedule1F1B's; measured/simulated {min(ratios):.2f}-{max(ratios):.2f} "
            f"(calibrated {min(calibrated):.2f}-{max(calibrated):.2f})."
        )
    return out


def _notes(args: argparse.Namespace, info: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    alphas = sorted({round(r["alpha_ms"], 3) for r in rows if "alpha_ms" in r})
    pngs = ", ".join(f"[{p}]({p})" for r in rows for p in r.get("pngs", ()))
    return [
        "EMULATED DEVICES: every stage is a gloo process on a 2-core CPU running the tiny model; each compute "
        "action (forward, backward, or a backward's input- or weight-gradient part) lasts the stage's planned cost "
        "for it (real work, then a sleep for the rest; see [Note: emulated device time] in "
        "benchmarks/graphpipe_workloads.py), so stages overlap as if each had a device of its own. Messages and the "
        "runtimes' work between actions take real time.",
        *_summary(rows),
        f"Costs: synthetic models one unit per Linear (forward 1, backward 2); zoo models profiled at full size "
        f"(micro-batch {args.profile_microbatch}, one thread, {PROFILE_REPEATS} samples per operator); all scaled to a mean stage time "
        f"per micro-batch of {args.target_ms} ms, or more where the tiny model's real forward + backward time needs it (see [Note: emulated time and real work] in benchmarks/graphpipe_workloads.py): "
        + ", ".join(
            sorted(
                {
                    f"{r['model']} {r['stage_ms']:.1f} ms (real {r['real_ms']:.2f} ms)"
                    for r in rows
                    if "stage_ms" in r
                }
            )
        )
        + f". 'CPU busy': the stages' CPU time during a runtime's steps over {CORES} cores x the steps' time. Planning assumed messages of {PLAN_COMM.alpha_ms} ms + bytes / 1 GB/s.",
        "GraphPipe (DAG, planner) is torch_graphpipe.plan_graph(stage_graph='dag'): the better (by simulation) of "
        "the series-parallel DAG search and the best chain split laid out as a DAG. On two_branch the DAG search "
        "finds the one-block-per-stage partition (the last block of one branch with the free join, see [Note: "
        "branch tail with the join] in torch_graphpipe/partition.py); the explicit partition is shown beside it. "
        "A stage that joins branches is split at its late input (see [Note: late inputs] in "
        "torch_graphpipe/schedule.py): on two_branch the join stage runs its own branch's block before the other "
        "branch's value arrives and sends that branch its gradient before the block's backward, so each branch "
        "pipelines like a 4-stage chain: (8 + 3) x 3 = 33 units vs the chain's (8 + 7) x 3 = 45 (1.36x); run as "
        "one piece the join stage would start after 4 forwards and release the other branch's gradient 2 units "
        "later: 36 units (1.25x). Split stages are timed as two actions (F/FL, BL/B) in the traces.",
        f"Simulated = the discrete-event simulator on the executed plan with the same costs and the measured gloo "
        f"latency per message ({', '.join(map(str, alphas))} ms, one value per workload).",
        "Calibrated sim = the same simulation with a per-action overrun, a per-message cost on the stage and "
        "a message latency fitted on one traced step of GraphPipe (chain) (see [Note: calibrated "
        "simulation] in torch_graphpipe/calibrate.py); per workload: "
        + "; ".join(
            sorted(
                {
                    f"{r['model']} +{r['overrun_ms']:.2f} ms/action, {r['message_ms']:.2f} ms/message on "
                    f"its stage, {r['latency_ms']:.2f} ms latency"
                    for r in rows
                    if "overrun_ms" in r
                }
            )
        )
        + ".",
        f"Median of {args.rounds} rounds x {args.steps} steps per runtime, runtimes in rotating order; a step is timed "
        "between two barriers.",
        "torch's schedules run the chain split of the model through torch.distributed.pipelining (see [Note: chain "
        "baseline] in benchmarks/graphpipe_baseline.py): model inputs travel along the chain, the loss is scaled by "
        "1/M; schedules with 2 stages per rank run a chain split into 2 x ranks stages (each stage on its own "
        "emulated device time). A backward split into input and weight gradients (GraphPipe's and torch's "
        f"zero-bubble schedules alike) gives each part the stage's cost for it: {1 - WEIGHT_SHARE:.0%} / "
        f"{WEIGHT_SHARE:.0%} on the synthetic models, as profiled on the zoo models (all weight gradient on a stage "
        "no gradient flows into); a whole backward takes both. A "
        "schedule's 'peak in-flight' is, per rank, the most micro-batches its stages hold in its action list.",
        "Memory (see [Note: predicted memory] in benchmarks/graphpipe_torch_schedules.py): predicted peak bytes per "
        "device (parameters x 4 + held activations, from the plan's profiled bytes at full size); the budget of "
        "the comparison is Schedule1F1B's per-device peak; 'best torch schedule' is the fastest within it.",
        load_note(info),
        "Timelines (one row per stage, forward light, backward dark, ms): " + pngs,
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(workloads()), help="comma-separated workload names")
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument(
        "--target-ms",
        type=float,
        default=20.0,
        help="mean stage time per micro-batch (fwd + bwd); a workload may ask for more (Workload.stage_ms)",
    )
    p.add_argument(
        "--profile-microbatch", type=int, default=4, help="micro-batch size for full-size profiling"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per runtime and round")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    p.add_argument(
        "--plans-only",
        action="store_true",
        help="profile and plan each workload, print the plans (ids, in-flight, simulated step), run nothing",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plans_only:
        for name in [n.strip() for n in args.workloads.split(",") if n.strip()]:
            print("\n".join(plans_only(workloads()[name], args)), flush=True)
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print_header(info)
    table = ResultTable(COLUMNS)
    all_workloads = workloads()
    for name in [n.strip() for n in args.workloads.split(",") if n.strip()]:
        try:
            rows = run_workload(all_workloads[name], args, args.out_dir)
        except Exception as exc:  # one broken workload must not hide the others' results
            progress(f"{name} failed: {type(exc).__name__}: {exc}")
            rows = [
                {"model": name, "runtime": "all", "status": "fail", "error": f"{type(exc).__name__}: {exc}"}
            ]
        for row in rows:
            table.add(**row)
    plot = PlotSpec(group_keys=("model",), series_key="runtime", baseline=BASELINE,
                    ylabel="iteration time relative to Schedule1F1B (lower is better)")  # fmt: skip
    write_results("graphpipe", "cpu", info, table, notes=_notes(args, info, table.rows), plot=plot,
                  out_dir=args.out_dir, extra={"args": {k: str(v) for k, v in vars(args).items()}})  # fmt: skip
    print(
        json.dumps(
            {
                r["model"] + " / " + r["runtime"]: round(r["median_ms"], 1)
                if "median_ms" in r
                else r.get("error")
                for r in table.rows
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
