"""Which train-mode operators make pipeline training differ from single-process training.

[Note: train-mode differences]
A pipeline runs the model once per micro-batch. Two kinds of train-mode operators then compute
something else than one single-process step on the whole batch, and GraphPipe says so with a
WARNING when it is built (documented, not silently different):
- Dropout (p > 0) draws its masks per stage and micro-batch from that rank's generator, so the
  masks, and so the losses, differ from the single-process run's (both are valid dropout; with the
  same seed on every rank the run is reproducible). Matching them would need every stage to replay
  the whole single-process sequence of random draws.
- BatchNorm normalises each micro-batch with that micro-batch's statistics and updates its running
  statistics once per micro-batch, as gradient accumulation over micro-batches does; the whole-batch
  statistics of the single-process step would need every micro-batch's forward before any could go
  on, which is no pipeline.
In eval mode both behave as in single-process inference. With dropout off (p = 0) and no BatchNorm,
losses and gradients equal single-process training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["mode_dependent_ops", "train_mode_differences"]

_DROPOUT_OPS = ("dropout", "native_dropout", "feature_dropout", "alpha_dropout")
_BATCH_NORM_OPS = (
    "batch_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_functional",
    "native_batch_norm",
)


def train_mode_differences(module: torch.nn.Module, gm: fx.GraphModule) -> list[str]:
    """What in ``module`` (and its captured graph ``gm``) will differ from single-process training;
    see [Note: train-mode differences]. Empty in eval mode."""
    if not module.training:
        return []
    out = []
    dropout = [
        n for n, m in module.named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
    ]
    dropout += [n.name for n in gm.graph.nodes if _is_op(n, _DROPOUT_OPS) and _dropout_p(n) > 0]
    if dropout:
        out.append(f"dropout ({_names(dropout)}) draws other masks than single-process training")
    norms = [n for n, m in module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    norms += [n.name for n in gm.graph.nodes if _is_op(n, _BATCH_NORM_OPS)]
    if norms:
        out.append(f"BatchNorm ({_names(norms)}) uses per-micro-batch statistics")
    return out


def mode_dependent_ops(gm: fx.GraphModule) -> list[str]:
    """The dropout and BatchNorm operators of an ATen graph (whose train / eval behaviour was fixed
    when it was captured; see [Note: export capture])."""
    dropout = [n.name for n in gm.graph.nodes if _is_op(n, _DROPOUT_OPS) and _dropout_p(n, any_mode=True) > 0]
    return dropout + [n.name for n in gm.graph.nodes if _is_op(n, _BATCH_NORM_OPS)]


def _is_op(node: fx.Node, names: tuple[str, ...]) -> bool:
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return name in names


def _dropout_p(node: fx.Node, any_mode: bool = False) -> float:
    """The drop probability of a functional or ATen dropout call (0.5, F.dropout's default, if unknown);
    0 for a call in eval mode unless ``any_mode``."""
    train: Any = node.kwargs.get(
        "train", node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    )
    if train is False and not any_mode:
        return 0.0
    p: Any = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    return float(p) if isinstance(p, (int, float)) else 0.5


def _names(names: list[str], limit: int = 3) -> str:
    names = list(dict.fromkeys(names))
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
