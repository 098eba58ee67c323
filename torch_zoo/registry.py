"""The zoo's registry: every `ZooModel` by name, with listing and lookup."""

from __future__ import annotations

from torch_zoo.candle_uno import UNO_ZOO
from torch_zoo.dcgan import DCGAN_ZOO
from torch_zoo.dlrm import DLRM_ZOO
from torch_zoo.mlp import MLP_ZOO
from torch_zoo.mmt import MMT_ZOO
from torch_zoo.mobilenet import MOBILENET_ZOO
from torch_zoo.model import Task, ZooModel
from torch_zoo.nasnet import NASNET_ZOO
from torch_zoo.resnets import RESNET_ZOO
from torch_zoo.transformers import TRANSFORMER_ZOO

__all__ = ["get_model", "list_models"]


def _index(models: tuple[ZooModel, ...]) -> dict[str, ZooModel]:
    index: dict[str, ZooModel] = {}
    for model in models:
        if model.name in index:
            raise ValueError(f"duplicate zoo model name {model.name!r}")
        index[model.name] = model
    return index


_MODELS = _index(
    (
        *MLP_ZOO,
        *RESNET_ZOO,
        *MOBILENET_ZOO,
        *TRANSFORMER_ZOO,
        *DCGAN_ZOO,
        *NASNET_ZOO,
        *MMT_ZOO,
        *DLRM_ZOO,
        *UNO_ZOO,
    )
)


def list_models(task: Task | None = None) -> list[str]:
    """Names of the zoo models, in registration order; only those of `task` when given."""
    if task not in (None, "inference", "training"):
        raise ValueError(f"invalid task {task!r}; valid tasks: inference, training")
    return [name for name, model in _MODELS.items() if task is None or model.task == task]


def get_model(name: str) -> ZooModel:
    """The zoo model called `name`; `ValueError` listing the valid names otherwise."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(_MODELS)}") from None
