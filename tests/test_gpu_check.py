"""tools/gpu_check.py, the one-call GPU run (issue 30), proven on CPU by its dry run.

The dry run is run for real in a child process (CUDA hidden; the slow steps, the editable install's
metadata and the collage benchmark, skipped): its $OUT layout, a step that hangs past its limit
(killed with its child, recorded as "timeout", the later steps still run), carried wheels installed
without an index, the summary naming the card, and a budget too short for a step.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (module gpucheck_probe), as `make gpu-wheels` would carry."""
    folder.mkdir(parents=True)
    files = {
        "gpucheck_probe.py": "VALUE = 7\n",
        "gpucheck_probe-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpucheck-probe\nVersion: 0.1\n",
        "gpucheck_probe-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append("gpucheck_probe-0.1.dist-info/RECORD,,")
    files["gpucheck_probe-0.1.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = folder / "gpucheck_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def _dead(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return True
    state = next((line for line in status.read_text().splitlines() if line.startswith("State:")), "")
    return "Z" in state.split(":", 1)[-1][:3]  # a zombie has ended; only its parent's wait is left


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    _wheel(tmp / "wheels")
    out, work = tmp / "out", tmp / "work"
    done = _run(
        "--dry-run", "--self-test-hang", "--out", str(out), "--work", str(work), "--wheels", str(tmp / "wheels"),
        "--skip", "install,collage_mlp", "--collage-models", "mlp,resnet18", "--budget-s", "300",
    )  # fmt: skip
    summary = json.loads((out / "gpu_check_cpu_dryrun.json").read_text())
    return done, out, work, summary


def test_dry_run_layout(dry_run):
    done, out, _, summary = dry_run
    names = {p.name for p in out.iterdir()}
    assert names == {
        "gpu_check.log", "gpu_check_cpu_dryrun.md", "gpu_check_cpu_dryrun.json",
        "gpu_check_raw_cpu_dryrun.tar.gz", "cp_gpu_cpu_dryrun.json", "pytest_cpu_dryrun.xml",
    }, done.stdout  # fmt: skip
    assert all(p.is_file() for p in out.iterdir())  # flat: nothing deeper than $OUT itself
    assert gpu_check.check_out_limits(out) == []
    assert summary["card"] == "cpu_dryrun" and summary["dry_run"] is True and summary["cuda"] is False
    md = (out / "gpu_check_cpu_dryrun.md").read_text()
    assert md.startswith("# GPU check — no GPU (cpu_dryrun)") and "DRY RUN" in md
    log = (out / "gpu_check.log").read_text()
    for step in ("machine", "hang", "wheels", "verify", "bench_cp", "tests"):
        assert f"] {step}" in log, step


def test_a_hanging_step_is_killed_and_the_run_goes_on(dry_run):
    done, out, work, summary = dry_run
    steps = {s["name"]: s for s in summary["steps"]}
    order = [s["name"] for s in summary["steps"]]
    hang = steps["hang"]
    assert hang["status"] == "timeout" and hang["returncodes"] == [None]
    assert 1.5 < hang["seconds"] < 15, hang
    assert _dead(int((work / "hang_child.pid").read_text())), "the hanging step's child outlived it"
    assert order.index("hang") < order.index("verify")
    for name in ("verify", "bench_cp", "tests"):  # after the hang, and they ran
        assert steps[name]["status"] == "ok", (name, steps[name], done.stdout[-3000:])
    assert done.returncode == 1  # a timed-out step fails the run
    assert "hang             timeout" in done.stdout
    assert "| hang | timeout |" in (out / "gpu_check_cpu_dryrun.md").read_text()


def test_dry_run_steps(dry_run):
    _, out, work, summary = dry_run
    steps = {s["name"]: s for s in summary["steps"]}
    # carried wheels: installed with no index into the scratch site, which later steps import from
    assert steps["wheels"]["status"] == "ok"
    assert (work / "site" / "gpucheck_probe.py").is_file()
    assert steps["install"]["status"] == "skipped" and steps["install"]["note"] == "--skip"
    assert steps["build_fallback"]["status"] == "skipped"
    assert steps["nccl"] == steps["nccl"] | {"status": "skipped", "note": "no CUDA"}
    assert steps["collage_mlp"]["note"] == "--skip"
    assert steps["collage_resnet18"]["status"] == "skipped"
    assert "no CUDA" in steps["collage_resnet18"]["note"]
    # verify: what is missing is named, with what it turns off
    assert summary["verify"]["torch_cp._cuda"] == "skipped: no CUDA"
    assert "tensorrt" in summary["verify"]["gpu_backends"]
    # the decode benchmark's CPU stand-in: C++ kernel and Triton (interpreted) against float64
    cp = json.loads((out / "cp_gpu_cpu_dryrun.json").read_text())
    assert {r["impl"] for r in cp["rows"]} == {"cpp", "triton", "sdpa"}
    assert all(r["status"] == "ok" and r["rel_err"] < 1e-3 for r in cp["rows"]), cp["rows"]
    # the tests step ran pytest on the gpu files: everything there is gpu-marked, so all skipped
    tests = summary["results"]["tests"]
    assert tests["tests"] > 10 and tests["skipped"] == tests["tests"] and tests["failed"] == []


def test_a_step_without_time_left_is_skipped(tmp_path):
    # 15.5 s budget, 10 s of it kept for collecting: machine gets 5.5 s, verify nothing
    done = _run("--dry-run", "--out", str(tmp_path), "--only", "verify", "--budget-s", "15.5", timeout=120)
    summary = json.loads((tmp_path / "gpu_check_cpu_dryrun.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["verify"]["status"] == "skipped", done.stdout
    assert "no time left" in steps["verify"]["note"]
    assert steps["tests"]["note"] == "--only"


def test_unknown_step_names_are_refused():
    done = _run("--only", "bench_cp,benchmark_cp", timeout=60)
    assert done.returncode == 2 and "unknown steps ['benchmark_cp']" in done.stderr
    done = _run("--skip", "machine", timeout=60)
    assert done.returncode == 2 and "machine step always runs" in done.stderr


@pytest.mark.parametrize(
    ("device", "card"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA L40S", "l40s"),
        ("Some Accelerator", "some_accelerator"),
        (None, "cpu"),
    ],
)
def test_card_name(device, card):
    assert gpu_check.card_name(device) == card


def test_out_limits_are_checked(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}.txt").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = gpu_check.check_out_limits(tmp_path)
    assert any("11 files" in p for p in problems)
    assert any("deep.txt: more than 2 folders down" in p for p in problems)
    assert any("bad name.txt" in p for p in problems)
    assert gpu_check.check_out_limits(tmp_path / "a") == []  # 1 file, 2 folders down


def test_junit_summary(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="t" name="c"><error message="boom"/></testcase>'
        '<testcase classname="t" name="d"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    got = gpu_check.junit_summary(path)
    assert (got["tests"], got["passed"], got["failures"], got["errors"], got["skipped"]) == (4, 1, 1, 1, 1)
    assert got["failed"] == ["t::b: failure: assert 1 == 2", "t::c: error: boom"]


def test_gpu_test_files_are_found():
    files = gpu_check._gpu_test_files()
    assert "tests/torch_cp/test_cuda.py" in files and "tests/torch_cp/test_merge_states.py" in files
    assert os.path.join("tests", "test_gpu_check.py") not in files
