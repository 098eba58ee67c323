"""A zoo of benchmark models in plain PyTorch with random weights: `get_model(name).build(size)`."""

from torch_zoo.model import Size, Task, ZooModel
from torch_zoo.registry import get_model, list_models

__all__ = ["Size", "Task", "ZooModel", "get_model", "list_models"]
