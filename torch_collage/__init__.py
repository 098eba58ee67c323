"""torch_collage: run every subgraph of a model on the backend measured fastest for it.

Subpackages: ``torch_collage.backends`` (the runners), ``torch_collage.zoo`` (benchmark models with
random weights), ``torch_collage.timing`` (the timing core shared by the cost model and benchmarks).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
