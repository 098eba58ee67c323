"""A zoo of benchmark models in plain PyTorch with random weights: `get_model(name).build(size)`."""

from torch_collage.zoo.registry import get_model, list_models
from torch_collage.zoo.spec import Size, Task, ZooModel

__all__ = ["Size", "Task", "ZooModel", "get_model", "list_models"]
