"""Every GPU path of the project in one prepared run: build, test, benchmark (issue 30).

    python3 tools/gpu_check.py                 # on the lent GPU machine: $OUT gets the results
    python3 tools/gpu_check.py --dry-run       # on a CPU machine: the same steps, CUDA absent
    make gpu-check [DRY=1] [GPU_CHECK_ARGS="--only bench_cp,tests"]

The steps, in order of what matters most if the time runs out:

    machine        nvidia-smi, torch / triton / CUDA / nvcc versions, the card (names the results)
    wheels         carried wheels (.gpu_wheels/, from `make gpu-wheels`): pip install --no-index
                   --no-deps --target <work>/site, then on PYTHONPATH; absent folder: skipped
    install        pip install --no-build-isolation --no-deps --no-index -e . with MAX_JOBS = all
                   cores: builds torch_cp._C and torch_cp._cuda against the machine's torch
    build_fallback only if install failed: tools/gpu_build.py (cpp_extension.load, no setuptools)
    verify         what imports and what is usable: extensions, backends, optional packages (an
                   absent one is skipped with a line saying so)
    cutlass        CUTLASS's Python interface on this CUDA (with tools/cuda_compat when needed)
    bench_cp       tools/gpu_bench_cp.py: CUDA and Triton decode kernels at 256 MiB, 1 GiB and
                   4 GiB caches against the measured device-to-device copy rate
    tests          pytest: every `gpu`-marked test and every CUDA twin (tools/gpu_select.py), junit
    nccl           torch_cp.attention over a 1-rank NCCL group
    collage_<m>    benchmarks/bench_collage.py --hardware <card>_<m>, one zoo model per step
                   (whole graphs on each GPU backend: eager, triton = Inductor, cutlass, ...; collage)

Each step runs as its own process group under its own time limit (and the run's budget, --budget-s):
a step that exceeds it is killed with its children and recorded as "timeout", and the next step
runs. Steps that need CUDA say "skipped: no CUDA" without it. The log and every results file go
under $OUT (default: .gpu_check_out/ here), flat, at most 8 files (the device tool's limit):

    gpu_check.log                  every step's command and output, as it ran
    gpu_check_<card>.md / .json    the summary (rewritten after each step, so a kill leaves one)
    pytest_<card>.xml              junit of the test step
    cp_gpu_<card>.json             the decode benchmark's numbers
    gpu_check_raw_<card>.tar.gz    everything else the steps wrote (collage json/md/png, probes)

<card> is h100 / h200 (from the device name), so the summary is gpu_check_h100.md or
gpu_check_h200.md; a dry run names it cpu_dryrun. Exit status 1 when any step failed or timed out.

The dry run (--dry-run) hides CUDA (CUDA_VISIBLE_DEVICES=""), installs nothing (pip install
--dry-run; the wheels go to a scratch --target), and runs CPU stand-ins where a GPU step has one:
the decode benchmark on the C++ kernel and Triton under its interpreter, one tiny collage model.
tests/test_gpu_check.py runs it (with --skip for the slow steps and --self-test-hang, a step that
sleeps past its 2 s limit, to prove a hang is killed and the later steps still run).

The device call (one call, nothing else needed; make the wheels here first: `make gpu-wheels`):

    run(command="PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --budget-s 420",
        carry=[".gpu_wheels"], timeout_s=480)          # kind left out: an H100 (or an H200)

The script ends itself within its 420 s budget, before the call's 480 s limit kills it. The machine's
start (1-2 min) plus these 8 min leave about 5 of the 15 device minutes: enough for one rerun of a
few steps on the still-warm machine (it goes back 30 s after a call: rerun at once, else give_back).
stdout carries one line per step and a table at the end (the reply's output_tail holds them); the
full log is $OUT/gpu_check.log. A rerun keeps what install built on that machine:

    run(command="PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --only wheels,verify,cutlass,bench_cp "
                "--budget-s 200", carry=[".gpu_wheels"], timeout_s=240)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
SHIM = TOOLS / "cuda_compat"
RESERVE_S = 10.0  # kept back from the budget for collecting the results
MIN_STEP_S = 5.0  # a step with less time than this left is skipped
OUT_MAX_FILES = 8
OUT_MAX_BYTES = 16 * 2**20
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
OWN_FILES = ("gpu_check", "pytest_", "cp_gpu_")  # the names this script writes in $OUT start so
COLLAGE_MODELS = ("mlp", "resnet18", "gpt2")
GPU_HARDWARE = ("h200", "h100", "a100", "l40s", "v100", "rtx", "gpu", "cuda")  # bench_collage's list


def card_name(device_name: str | None) -> str:
    """The short card name results are named by: "NVIDIA H100 80GB HBM3" -> "h100"; none -> "cpu"."""
    if not device_name:
        return "cpu"
    match = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", device_name.upper())
    if match:
        return match.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") or "gpu"


@dataclass
class Plan:
    """What a step runs: commands one after another, under the step's one time limit."""

    cmds: list[list[str]]
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""


@dataclass
class Record:
    name: str
    status: str = "not run"  # ok | failed | timeout | skipped | not run
    seconds: float = 0.0
    limit_s: float = 0.0
    note: str = ""
    commands: list[str] = field(default_factory=list)
    returncodes: list[int | None] = field(default_factory=list)


@dataclass
class Step:
    name: str
    limit_s: float
    plan: Callable[[Ctx], Plan | str]  # a string: skipped, and why
    after: Callable[[Ctx, Record], None] | None = None


@dataclass
class Ctx:
    args: argparse.Namespace
    out: Path
    work: Path
    log: Any
    deadline: float
    started: float
    dry: bool
    cuda: bool = False
    card: str = "unknown"
    machine: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    pythonpath: list[str] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    current: subprocess.Popen | None = None

    def py(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        paths = [*self.pythonpath, str(ROOT)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if self.dry:
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(extra)
        return env

    def logline(self, text: str) -> None:
        self.log.write((text + "\n").encode())
        self.log.flush()


# --- the steps ------------------------------------------------------------------------------------


def plan_machine(ctx: Ctx) -> Plan:
    smi = "command -v nvidia-smi >/dev/null || { echo 'nvidia-smi: not found'; exit 0; }; "
    query = "name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw"
    return Plan([
        ["sh", "-c", smi + f"nvidia-smi; nvidia-smi --query-gpu={query} --format=csv"],
        ["sh", "-c", "nproc; uname -m; (command -v nvcc && nvcc --version) || echo 'nvcc: not found'"],
        ctx.py(str(TOOLS / "gpu_probe.py"), "machine", "--json", str(ctx.work / "machine.json")),
    ])  # fmt: skip


def after_machine(ctx: Ctx, rec: Record) -> None:
    path = ctx.work / "machine.json"
    if path.is_file():
        ctx.machine = json.loads(path.read_text())
    ctx.cuda = bool(ctx.machine.get("cuda_available")) and not ctx.dry
    ctx.card = card_name(ctx.machine.get("device_name") if ctx.cuda else None)
    if ctx.dry:
        ctx.card += "_dryrun"
    rec.note = f"card {ctx.card}" + ("" if ctx.cuda else ", no CUDA")


def plan_hang(ctx: Ctx) -> Plan:
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']); "
        f"open({str(ctx.work / 'hang_child.pid')!r}, 'w').write(str(child.pid)); "
        "print('sleeping past the limit', flush=True); time.sleep(3600)"
    )
    return Plan([ctx.py("-c", code)], note="self-test: a step that hangs (it and its child are killed)")


def _wheels(ctx: Ctx) -> list[Path]:
    folder = Path(ctx.args.wheels)
    return sorted(folder.glob("*.whl")) if folder.is_dir() else []


def plan_wheels(ctx: Ctx) -> Plan | str:
    wheels = _wheels(ctx)
    if not wheels:
        return f"skipped: no carried wheels in {ctx.args.wheels} (make gpu-wheels)"
    site = ctx.work / "site"
    shutil.rmtree(site, ignore_errors=True)
    cmd = ctx.py("-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                 "--find-links", str(ctx.args.wheels), "--target", str(site))  # fmt: skip
    if ctx.dry:  # check the carried set against the GPU machine's Python, install into scratch
        cmd += ["--python-version", "3.12", "--only-binary=:all:"]
    return Plan([cmd + [str(w) for w in wheels]], note=", ".join(w.name for w in wheels))


def after_wheels(ctx: Ctx, rec: Record) -> None:
    if rec.status == "ok":
        ctx.pythonpath.insert(0, str(ctx.work / "site"))


def plan_install(ctx: Ctx) -> Plan:
    cmd = ctx.py("-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index")
    if ctx.dry:
        return Plan([[*cmd, "--dry-run", "-e", str(ROOT)]], note="dry run: pip --dry-run, nothing built")
    env = {"MAX_JOBS": str(ctx.machine.get("usable_cores") or os.cpu_count() or 1)}
    if ctx.machine.get("capability"):
        env["TORCH_CUDA_ARCH_LIST"] = ctx.machine["capability"]  # this card's own arch only (sm_90)
    note = ", ".join(f"{k}={v}" for k, v in env.items())
    return Plan([[*cmd, "-v", "-e", str(ROOT)]], env=env, note=note)


def plan_build_fallback(ctx: Ctx) -> Plan | str:
    install = next((r for r in ctx.records if r.name == "install"), None)
    if install is None or install.status in ("ok", "skipped"):
        return "skipped: install " + ("did not run" if install is None else install.status)
    env = {"MAX_JOBS": str(ctx.machine.get("usable_cores") or os.cpu_count() or 1)}
    if ctx.machine.get("capability"):
        env["TORCH_CUDA_ARCH_LIST"] = ctx.machine["capability"]
    cmd = ctx.py(str(TOOLS / "gpu_build.py"))
    if not ctx.cuda:
        cmd.append("--no-cuda")
    return Plan([cmd], env=env, note="install failed: cpp_extension.load, the repository on PYTHONPATH")


def plan_verify(ctx: Ctx) -> Plan:
    return Plan([ctx.py(str(TOOLS / "gpu_probe.py"), "verify", "--json", str(ctx.work / "verify.json"))])


def after_verify(ctx: Ctx, rec: Record) -> None:
    path = ctx.work / "verify.json"
    if path.is_file():
        ctx.verify = json.loads(path.read_text())
        absent = [k for k, v in ctx.verify.get("optional", {}).items() if str(v).startswith("absent")]
        rec.note = f"absent: {', '.join(absent)}" if absent else "all optional packages present"


def plan_cutlass(ctx: Ctx) -> Plan | str:
    present = not str(ctx.verify.get("optional", {}).get("nvidia-cutlass", "absent")).startswith("absent")
    if not present:
        return "skipped: nvidia-cutlass absent (make gpu-wheels, carry .gpu_wheels)"
    cmd = ctx.py(str(TOOLS / "gpu_probe.py"), "cutlass")
    if ctx.verify.get("cuda.cuda importable"):
        return Plan([cmd], note="cuda.cuda importable: no shim")
    shim = os.pathsep.join([str(SHIM), *ctx.pythonpath, str(ROOT)])
    return Plan([cmd], env={"PYTHONPATH": shim}, note="cuda.cuda not importable: with tools/cuda_compat")


def after_cutlass(ctx: Ctx, rec: Record) -> None:
    if rec.status == "ok" and "with tools/cuda_compat" in rec.note:
        ctx.pythonpath.insert(0, str(SHIM))
        rec.note += " (on PYTHONPATH from here on)"


def plan_bench_cp(ctx: Ctx) -> Plan | str:
    paths = [
        "--json",
        str(ctx.work / f"cp_gpu_{ctx.card}.json"),
        "--md",
        str(ctx.work / f"cp_gpu_{ctx.card}.md"),
    ]
    script = str(TOOLS / "gpu_bench_cp.py")
    if ctx.cuda:
        return Plan([ctx.py(script, "--contexts", ctx.args.cp_contexts, *paths)])
    if not ctx.dry:
        return "skipped: no CUDA"
    stand_in = ["--device", "cpu", "--contexts", "256", "--dtype", "float32", "--backends", "cpp,triton,sdpa",
                "--repeats", "2", "--copy-mib", "16"]  # fmt: skip
    return Plan([ctx.py(script, *stand_in, *paths)], env={"TRITON_INTERPRET": "1"},
                note="CUDA kernels skipped: no CUDA; dry run: CPU stand-in (C++ kernel, Triton interpreted)")  # fmt: skip


def after_bench_cp(ctx: Ctx, rec: Record) -> None:
    path = ctx.work / f"cp_gpu_{ctx.card}.json"
    if path.is_file():
        ctx.results["bench_cp"] = json.loads(path.read_text())
        shutil.copy2(path, ctx.out / path.name)


def _gpu_test_files() -> list[str]:
    """Test files with `gpu`-marked tests or CUDA twins (device lists built from torch.cuda)."""
    files = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        text = path.read_text(errors="replace")
        if "pytest.mark.gpu" in text or "torch.cuda.is_available()" in text:
            files.append(str(path.relative_to(ROOT)))
    return files


def plan_tests(ctx: Ctx) -> Plan | str:
    files = _gpu_test_files()
    if not files:
        return "skipped: no test file marks a test gpu"
    junit = ctx.work / f"pytest_{ctx.card}.xml"
    cmd = ctx.py("-m", "pytest", "-p", "gpu_select", "-p", "no:cacheprovider", "-q", "-rfEs",
                 f"--junitxml={junit}", "-o", f"timeout={int(ctx.args.test_timeout)}", *files)  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join([str(TOOLS), *ctx.pythonpath, str(ROOT)])}
    note = "" if ctx.cuda else "no CUDA: the gpu tests skip, the twins are not generated"
    return Plan([cmd], env=env, note=note)


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and failing tests of a pytest junit file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            bad = case.find(kind)
            if bad is not None:
                message = (bad.get("message") or bad.text or "").strip().splitlines()
                failed.append(
                    f"{case.get('classname')}::{case.get('name')}: {kind}: {message[0][:300] if message else ''}"
                )
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def after_tests(ctx: Ctx, rec: Record) -> None:
    path = ctx.work / f"pytest_{ctx.card}.xml"
    if path.is_file():
        ctx.results["tests"] = summary = junit_summary(path)
        shutil.copy2(path, ctx.out / path.name)
        rec.note = (rec.note + "; " if rec.note else "") + ", ".join(
            f"{summary[k]} {k}" for k in ("passed", "failures", "errors", "skipped")
        )


def plan_nccl(ctx: Ctx) -> Plan | str:
    if not ctx.cuda:
        return "skipped: no CUDA"
    return Plan([ctx.py(str(TOOLS / "gpu_probe.py"), "nccl")])


def _collage_hardware(ctx: Ctx, model: str) -> str:
    card = ctx.card if ctx.card.startswith(GPU_HARDWARE) else f"gpu_{ctx.card}"
    return f"{card}_{model}" if ctx.cuda else f"{ctx.card}_{model}"


def collage_step(model: str, first: bool) -> Step:
    def plan(ctx: Ctx) -> Plan | str:
        common = ["--models", model, "--search", "dp", "--max-depth", "2", "--time-budget-s", "20",
                  "--repeats", "20", "--rounds", "2", "--out-dir", str(ctx.work)]  # fmt: skip
        cmd = ctx.py(
            str(ROOT / "benchmarks" / "bench_collage.py"), "--hardware", _collage_hardware(ctx, model)
        )
        if ctx.cuda:
            return Plan([[*cmd, "--size", ctx.args.collage_size, *common]])
        if not ctx.dry:
            return "skipped: no CUDA"
        if not first:
            return "skipped: no CUDA; the dry run runs the first model only"
        return Plan([[*cmd, "--size", "tiny", "--backends", "eager,inductor", *common]],
                    note="GPU backends skipped: no CUDA; dry run: CPU stand-in (tiny, eager and inductor)")  # fmt: skip

    def after(ctx: Ctx, rec: Record) -> None:
        md = ctx.work / f"collage_{_collage_hardware(ctx, model)}.md"
        if md.is_file():
            ctx.results.setdefault("collage", {})[model] = md.read_text()

    return Step(f"collage_{model}", 150, plan, after)


def steps(args: argparse.Namespace) -> list[Step]:
    out = [Step("machine", 60, plan_machine, after_machine)]
    if args.self_test_hang:
        out.append(Step("hang", 2, plan_hang))
    out += [
        Step("wheels", 60, plan_wheels, after_wheels),
        Step("install", 300, plan_install),
        Step("build_fallback", 300, plan_build_fallback),
        Step("verify", 90, plan_verify, after_verify),
        Step("cutlass", 60, plan_cutlass, after_cutlass),
        Step("bench_cp", 150, plan_bench_cp, after_bench_cp),
        Step("tests", 240, plan_tests, after_tests),
        Step("nccl", 60, plan_nccl),
    ]
    models = [m for m in args.collage_models.split(",") if m]
    out += [collage_step(m, i == 0) for i, m in enumerate(models)]
    return out


# --- running a step -------------------------------------------------------------------------------


# Each step leads its own process group (so that a kill reaches its children) but stays in this
# session (so that whatever kills this session, the device tool at the end of its call say, ends it too).
_OWN_GROUP: dict[str, Any] = (
    {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
)


def _kill(proc: subprocess.Popen) -> None:
    """End ``proc`` and everything it started (its process group): TERM, then KILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:  # the leader is gone; its children may not be
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(ctx: Ctx, step: Step, index: int, total: int) -> Record:
    rec = Record(step.name)
    ctx.records.append(rec)
    header = f"[{index}/{total}] {step.name}"
    only, skip = ctx.args.only, ctx.args.skip
    plan: Plan | str
    if (only and step.name not in only) or step.name in skip:
        plan = "skipped: --only" if only and step.name not in only else "skipped: --skip"
    else:
        try:
            plan = step.plan(ctx)
        except Exception as err:  # a broken plan is this step's failure, not the run's
            plan = f"failed: could not plan the step: {type(err).__name__}: {err}"
    left = ctx.deadline - time.monotonic() - RESERVE_S
    if isinstance(plan, Plan) and left < MIN_STEP_S:
        plan = f"skipped: no time left in the {ctx.args.budget_s:.0f} s budget"
    if isinstance(plan, str):
        rec.status = "failed" if plan.startswith("failed") else "skipped"
        rec.note = plan.removeprefix("skipped: ").removeprefix("failed: ")
        ctx.logline(f"==== {header}: {plan} ====")
        print(f"{header}: {plan}", flush=True)
        return rec
    rec.limit_s = min(step.limit_s * ctx.args.limit_scale, left)
    rec.note = plan.note
    env = ctx.env(plan.env)
    ctx.logline(f"\n==== {header} (limit {rec.limit_s:.0f} s){': ' + plan.note if plan.note else ''} ====")
    print(f"{header}: running (limit {rec.limit_s:.0f} s)", flush=True)
    start = time.monotonic()
    offset = ctx.log.tell()
    status = "ok"
    for cmd in plan.cmds:
        text = shlex.join(cmd)
        rec.commands.append(text)
        extra = " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.env.items())
        ctx.logline(f"$ {extra + ' ' if extra else ''}{text}")
        remaining = rec.limit_s - (time.monotonic() - start)
        if remaining <= 0:
            status = "timeout"
            break
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=ctx.log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **_OWN_GROUP)  # fmt: skip
        ctx.current = proc
        try:
            rc = proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = None
        finally:
            ctx.current = None
        rec.returncodes.append(rc)
        if rc is None:
            status = "timeout"
            ctx.logline(
                f"!! killed after {time.monotonic() - start:.1f} s: over the step's {rec.limit_s:.0f} s limit"
            )
            break
        if rc != 0:
            status = "failed"
            ctx.logline(f"!! exit status {rc}")
    rec.status, rec.seconds = status, time.monotonic() - start
    if step.after is not None:
        try:
            step.after(ctx, rec)
        except Exception as err:
            rec.note = (rec.note + "; " if rec.note else "") + f"reading its results failed: {err}"
            if rec.status == "ok":
                rec.status = "failed"
    ctx.logline(
        f"---- {step.name}: {rec.status} in {rec.seconds:.1f} s{'; ' + rec.note if rec.note else ''} ----"
    )
    print(f"{header}: {rec.status} in {rec.seconds:.1f} s{'; ' + rec.note if rec.note else ''}", flush=True)
    if rec.status != "ok":
        ctx.log.flush()
        with open(ctx.log.name, "rb") as f:
            f.seek(offset)
            tail = f.read().decode(errors="replace").splitlines()[-15:]
        print("\n".join(f"    | {line}" for line in tail), flush=True)
    return rec


# --- the summary and $OUT -------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def summary_md(ctx: Ctx) -> str:
    m = ctx.machine
    when = datetime.datetime.fromtimestamp(time.time(), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# GPU check — {m.get('device_name') or 'no GPU'} ({ctx.card})",
        "",
        f"Produced by `{shlex.join(['python3', 'tools/gpu_check.py', *ctx.args.argv])}` on {when}"
        + (" — DRY RUN: CUDA hidden, stand-ins on CPU" if ctx.dry else "")
        + f"; {time.monotonic() - ctx.started:.0f} s of a {ctx.args.budget_s:.0f} s budget.",
        "",
        "## Machine",
        "",
        *_table(["key", "value"], [[k, str(v)] for k, v in m.items()]),
        "",
        "## Steps",
        "",
        *_table(
            ["step", "status", "seconds", "limit s", "note"],
            [[r.name, r.status, f"{r.seconds:.1f}", f"{r.limit_s:.0f}", r.note] for r in ctx.records],
        ),
    ]
    cp = ctx.results.get("bench_cp")
    if cp is not None:
        from_tool = ctx.work / f"cp_gpu_{ctx.card}.md"
        lines += ["", "## Decode attention against the copy rate (tools/gpu_bench_cp.py)", ""]
        lines += [from_tool.read_text() if from_tool.is_file() else json.dumps(cp["verdicts"])]
    tests = ctx.results.get("tests")
    if tests is not None:
        lines += ["", "## Tests (gpu-marked and CUDA twins)", ""]
        lines += [", ".join(f"{tests[k]} {k}" for k in ("tests", "passed", "failures", "errors", "skipped"))]
        lines += [f"- {line}" for line in tests["failed"]]
    if ctx.verify:
        lines += ["", "## Extensions, backends, optional packages", ""]
        rows = [[k, str(v)] for k, v in ctx.verify.items() if k not in ("gpu_backends", "optional")]
        rows += [[f"backend {k}", v] for k, v in ctx.verify.get("gpu_backends", {}).items()]
        rows += [[f"package {k}", v] for k, v in ctx.verify.get("optional", {}).items()]
        lines += _table(["what", "state"], rows)
    for model, text in ctx.results.get("collage", {}).items():
        section = text.split("## Results", 1)[-1].split("\n## ", 1)[0].strip()
        section = "\n".join(line for line in section.splitlines() if not line.startswith("!["))  # no PNG here
        lines += ["", f"## Collage: {model} (benchmarks/bench_collage.py)", "", section]
    lines += [
        "",
        "## Files",
        "",
        *[f"- {p.name} ({p.stat().st_size} bytes)" for p in sorted(ctx.out.iterdir())],
    ]
    return "\n".join(lines) + "\n"


def summary_json(ctx: Ctx) -> dict[str, Any]:
    return {
        "card": ctx.card,
        "dry_run": ctx.dry,
        "cuda": ctx.cuda,
        "argv": ctx.args.argv,
        "seconds": time.monotonic() - ctx.started,
        "budget_s": ctx.args.budget_s,
        "machine": ctx.machine,
        "steps": [vars(r) for r in ctx.records],
        "verify": ctx.verify,
        "results": ctx.results,
    }


def write_summary(ctx: Ctx) -> None:
    """gpu_check_<card>.{json,md} in $OUT; written before the card is known it is named "unknown"."""
    names = [f"gpu_check_{ctx.card}.json", f"gpu_check_{ctx.card}.md"]
    for stale in ctx.out.glob("gpu_check_*.*"):
        if stale.suffix in (".json", ".md") and stale.name not in names:
            stale.unlink()
    (ctx.out / names[0]).write_text(json.dumps(summary_json(ctx), indent=1, default=str))
    (ctx.out / names[1]).write_text(summary_md(ctx))


def bundle(ctx: Ctx) -> Path:
    """Everything the steps wrote in the work folder (but the installed site) as one tar.gz in $OUT."""
    target = ctx.out / f"gpu_check_raw_{ctx.card}.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted(ctx.work.iterdir()):
            if path.name not in ("site",):
                tar.add(path, arcname=path.name)
    return target


def check_out_limits(out: Path) -> list[str]:
    """What in ``out`` breaks the device tool's limits on files coming back."""
    problems = []
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > OUT_MAX_FILES:
        problems.append(f"{len(files)} files, over the {OUT_MAX_FILES} that come back")
    for p in files:
        rel = p.relative_to(out)
        if len(rel.parts) > 3:
            problems.append(f"{rel}: more than 2 folders down")
        if p.stat().st_size > OUT_MAX_BYTES:
            problems.append(f"{rel}: {p.stat().st_size} bytes, over 16 MiB")
        if not all(OUT_NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits, '.', '_', '-'")
    return problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CUDA hidden, nothing installed, CPU stand-ins")
    p.add_argument("--out", type=Path, default=None, help="default: $OUT, else .gpu_check_out/")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--wheels", default=str(ROOT / ".gpu_wheels"), help="carried wheels (make gpu-wheels)")
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole run's time (default 420 s)")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiply every step's own limit")
    p.add_argument(
        "--only", default="", help="comma-separated steps to run (and machine; the others: skipped)"
    )
    p.add_argument("--skip", default="", help="comma-separated steps to skip")
    p.add_argument("--cp-contexts", default="65536,262144,1048576", help="bench_cp cache lengths (bf16)")
    p.add_argument("--collage-models", default=",".join(COLLAGE_MODELS), help="zoo models, one step each")
    p.add_argument("--collage-size", default="full", choices=("tiny", "full"))
    p.add_argument("--test-timeout", type=float, default=120, help="pytest-timeout per test (s)")
    p.add_argument("--self-test-hang", action="store_true", help="add a step that hangs past its 2 s limit")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.wheels = str(Path(args.wheels).resolve())
    args.only = {s for s in args.only.split(",") if s}
    args.skip = {s for s in args.skip.split(",") if s}
    if "machine" in args.skip:
        p.error("the machine step always runs: it finds the card and whether CUDA is there")
    if args.only:
        args.only.add("machine")
    known = {s.name for s in steps(args)}
    unknown = (args.only | args.skip) - known
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; the steps are {sorted(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or ROOT / ".gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))  # removed at the end (it is bundled)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for old in out.iterdir():  # an earlier run's files (here: $OUT is emptied before each device call)
        if old.is_file() and old.name.startswith(OWN_FILES):
            old.unlink()
    with open(out / "gpu_check.log", "wb") as log:
        ctx = Ctx(args, out, work, log, started + args.budget_s, started, args.dry_run)

        def on_term(signum: int, frame: Any) -> None:  # the caller's own limit: leave a summary
            if ctx.current is not None:
                _kill(ctx.current)
            ctx.logline(f"!! gpu_check received signal {signum}: stopping")
            write_summary(ctx)
            sys.exit(128 + signum)

        signal.signal(signal.SIGTERM, on_term)
        ctx.logline(f"gpu_check {shlex.join(args.argv)} at {time.ctime()}; out {out}, work {work}")
        todo = steps(args)
        for i, step in enumerate(todo, 1):
            run_step(ctx, step, i, len(todo))
            write_summary(ctx)
        bundle(ctx)
        write_summary(ctx)
        problems = check_out_limits(out)
        for line in problems:
            ctx.logline(f"!! $OUT: {line}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in ctx.records if r.status in ("failed", "timeout")]
    print(f"\n== gpu_check: {ctx.card}, {time.monotonic() - started:.0f} s, results in {out} ==")
    for r in ctx.records:
        print(f"{r.name:16s} {r.status:8s} {r.seconds:6.1f} s  {r.note}")
    for line in ctx.results.get("bench_cp", {}).get("verdicts", []):
        print(line)
    for line in problems:
        print(f"$OUT: {line}")
    return 1 if bad or problems else 0


if __name__ == "__main__":
    sys.exit(main())
