"""pytest plugin for tools/gpu_check.py: keep only the tests that need a GPU.

Loaded with ``-p gpu_select`` (tools/ on PYTHONPATH). Keeps an item when it is marked ``gpu`` or when
it is a CUDA twin of a CPU test: one of its parameters is the string ``"cuda"`` (e.g. the
``device`` of tests/torch_cp/test_merge_states.py, which lists "cuda" only when CUDA is there).
Every other item is deselected (and counted as such by pytest).
"""

from __future__ import annotations


def _needs_gpu(item) -> bool:
    if item.get_closest_marker("gpu") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(isinstance(v, str) and v == "cuda" for v in callspec.params.values())


def pytest_collection_modifyitems(config, items) -> None:
    keep = [item for item in items if _needs_gpu(item)]
    drop = [item for item in items if not _needs_gpu(item)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
