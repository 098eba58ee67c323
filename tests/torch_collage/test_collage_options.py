"""Options parsing and the backend registry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import fx

import torch_collage
from torch_collage.backends.registry import check_names, get_spec, registered_backend
from torch_collage.options import CACHE_ENV, CollageOptions


def test_defaults_and_parsing():
    opts = CollageOptions.from_mapping({"backends": ["eager", "inductor"], "max_depth": 2, "search": "dp"})
    assert opts.backends == ("eager", "inductor") and opts.max_depth == 2
    assert CollageOptions.from_mapping(None).backends == ()


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match="no_such") as info:
        CollageOptions.from_mapping({"no_such": 1})
    assert "backends" in str(info.value) and "time_budget_s" in str(info.value)


def test_unknown_backend_lists_valid_backends_where_a_compile_starts(tmp_path):
    opts = CollageOptions.from_mapping({"backends": ["tensorrrt"], "cache_dir": str(tmp_path)})
    assert opts.backends == ("tensorrrt",)  # parsing loads no backend, so it cannot check names
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="tensorrrt") as info:
        torch_collage.compile_exported(model, torch.randn(2, 4), backends=["tensorrrt"])
    assert "onnxruntime" in str(info.value) and "'backends'" in str(info.value)
    with pytest.raises(ValueError, match="tensorrrt"):
        torch_collage.explain(model, torch.randn(2, 4), backends=["tensorrrt"], cache_dir=str(tmp_path))


@pytest.mark.parametrize(
    "bad", [{"search": "evolve"}, {"on_backend_failure": "ignore"}, {"max_depth": 0}, {"backends": "eager"}]
)
def test_bad_values(bad):
    with pytest.raises(ValueError):
        CollageOptions.from_mapping(bad)


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("freeze", "false", TypeError),
        ("verify", "no", TypeError),
        ("progress", 1, TypeError),
        ("rtol", float("nan"), ValueError),
        ("atol", float("inf"), ValueError),
        ("atol", "1e-4", TypeError),
        ("time_budget_s", float("nan"), ValueError),
        ("repeats", True, TypeError),
        ("repeats", 2.5, TypeError),
        ("warmup", -3, ValueError),
        ("compiled_cache_mb", -1, ValueError),
        ("threads", 0, ValueError),
        ("threads", True, TypeError),
        ("segments", 1, ValueError),
        ("search", ["dp"], ValueError),
        ("cache_dir", 3, TypeError),
    ],
)
def test_wrong_types_and_ranges_are_refused_naming_the_option(option, value, error):
    with pytest.raises(error, match=option):
        CollageOptions.from_mapping({option: value})


def test_numbers_and_paths_of_the_right_kind_are_taken(tmp_path):
    opts = CollageOptions.from_mapping(
        {"time_budget_s": float("inf"), "rtol": 0, "warmup": 0, "cache_dir": tmp_path, "threads": None}
    )
    assert opts.cache_dir == str(tmp_path) and opts.time_budget_s == float("inf") and opts.warmup == 0


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert CollageOptions().cache_dir == str(tmp_path)
    monkeypatch.delenv(CACHE_ENV)
    assert CollageOptions().cache_dir.endswith("torch_collage")


def test_options_are_frozen():
    with pytest.raises(AttributeError):
        CollageOptions().max_depth = 5  # type: ignore[misc]


def _gm_compile(gm: fx.GraphModule, example_inputs):
    return gm


def test_register_duplicate_unknown_and_scoped():
    with registered_backend("mm_only", compile=_gm_compile, supports=["aten.mm", "aten.addmm"]) as spec:
        assert spec.name in torch_collage.list_backends()
        assert torch_collage.list_backends()["mm_only"].available
        with pytest.raises(ValueError, match="already registered"):
            torch_collage.register_backend("mm_only", compile=_gm_compile)
        check_names(["mm_only"])  # a registered name is valid
    assert "mm_only" not in torch_collage.list_backends()
    with pytest.raises(ValueError, match="valid backends"):
        get_spec("mm_only")
    with pytest.raises(ValueError, match="registered backends"):
        torch_collage.unregister_backend("mm_only")


def test_unavailable_backend_has_reason():
    with registered_backend("never", compile=_gm_compile, available=lambda: (False, "needs a GPU")):
        info = torch_collage.list_backends()["never"]
        assert not info.available and info.reason == "needs a GPU"


def test_builtins_listed_with_specs():
    info = torch_collage.list_backends()
    assert {"eager", "inductor", "onnxruntime", "openvino"} <= set(info)
    assert info["eager"].available and info["eager"].version.startswith("torch")


def test_spec_rejects_mutation_for_non_eager():
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.ops.aten.add_.Tensor, (x, x))
    node.meta["val"] = torch.empty(2)
    graph.output(node)
    assert get_spec("eager").supports_node(node)
    assert not get_spec("inductor").supports_node(node)


_PLUGIN = """
import torch_collage

def spec():
    return torch_collage.BackendSpec(name="external", compile=lambda gm, inputs: gm, supports=["aten.mm"])
"""

_CHECK = """
import logging, torch_collage
logging.basicConfig(level=logging.WARNING)
info = torch_collage.list_backends()
print("external" in info, info["external"].available if "external" in info else None, "broken" in info)
"""


def test_entry_point_group_registers_external_backends(tmp_path):
    """A real installed distribution (a dist-info on the path) with two entry points in the group:
    one loads and is listed, the broken one is skipped with a warning naming it."""
    dist = tmp_path / "collage_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: collage-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[torch_collage.backends]\nexternal = collage_plugin:spec\nbroken = collage_plugin_missing:spec\n"
    )
    (tmp_path / "collage_plugin.py").write_text(_PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    out = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    assert out.stdout.split() == ["True", "True", "False"], out.stdout + out.stderr
    assert "'broken' not loaded" in out.stderr and "collage_plugin_missing" in out.stderr
