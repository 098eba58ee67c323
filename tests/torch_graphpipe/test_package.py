"""The package's shape: every module reachable under its own name, public names listed."""

import importlib
import pkgutil

import torch_graphpipe


def _modules():
    return [
        importlib.import_module(f"torch_graphpipe.{m.name}")
        for m in pkgutil.iter_modules(torch_graphpipe.__path__)
    ]


def test_no_public_name_shadows_a_module():
    """``import torch_graphpipe.x; torch_graphpipe.x`` is the module x (a re-exported function of the
    same name once hid ``torch_graphpipe.plan``, the module)."""
    for module in _modules():
        name = module.__name__.rpartition(".")[2]
        assert getattr(torch_graphpipe, name) is module, f"torch_graphpipe.{name} is not the module {name}"
    assert callable(torch_graphpipe.plan)


def test_every_module_lists_its_public_names():
    for module in _modules():
        names = getattr(module, "__all__", None)
        assert names is not None, f"{module.__name__} has no __all__"
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, f"{module.__name__}.__all__ names {missing}, which it does not define"
