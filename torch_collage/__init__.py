"""torch_collage: run every subgraph of a model on the backend measured fastest for it.

``torch.compile(model, backend="collage", options={...})`` (registered through the
``torch_dynamo_backends`` entry point, no import needed); ``torch_collage.explain(model, *inputs)``
to see the placement; ``torch_collage.compile_exported(model, *inputs)`` for a placed model called
without dynamo (captured by ``torch.export``); ``torch_collage.register_backend(...)`` to add a backend.

Subpackages: ``torch_collage.backends`` (each backend's spec and runner; the registry),
``torch_collage.timing`` (the timing core shared by the cost model and benchmarks). Benchmark models
with random weights live in the separate package ``torch_zoo``.
Pipeline modules, in the order data flows: ``entry`` (dynamo backend) and ``options``;
``backends`` (each backend's ``BackendSpec``: what it can run, in ``backends.base``; the one registry,
``backends.registry``); ``graph`` (units, bitsets,
reachability); ``candidates``; ``subgraph`` (cutting a candidate out, canonical keys); ``cost`` and
``cache`` (measured, persistent); ``measure`` (which candidates, under the budget); ``search`` (exact
cover search, merging) and ``refine`` (measured local search); ``endtoend`` and ``choose`` (assembled
placements timed side by side, checked against eager); ``place`` (the stages for one graph);
``assembly``; ``report``, ``explain`` and ``render``.
"""

from torch_collage.backends.base import BackendInfo, BackendSpec, OpRule
from torch_collage.backends.registry import (
    list_backends,
    register_backend,
    registered_backend,
    unregister_backend,
)
from torch_collage.entry import collage_backend
from torch_collage.explain import ExplainReport, explain
from torch_collage.exported import ExportedCollage, compile_exported
from torch_collage.freeze import refresh
from torch_collage.options import CollageOptions
from torch_collage.place import measurement_count

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "BackendSpec",
    "CollageOptions",
    "ExplainReport",
    "ExportedCollage",
    "OpRule",
    "__version__",
    "collage_backend",
    "compile_exported",
    "explain",
    "list_backends",
    "measurement_count",
    "refresh",
    "register_backend",
    "registered_backend",
    "unregister_backend",
]
