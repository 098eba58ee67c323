"""What every backend is: the ``Backend`` protocol and the one error a failed compile raises."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Backend", "BackendCompileError"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLASS_PREFIX = re.compile(r"^<class '[\w.]+'>: ")  # how torch.onnx's error summary starts its lines
_MAX_REASON_CHARS = 500


@runtime_checkable
class Backend(Protocol):
    """A runtime that can run a whole module (or, later, one partition of it) on this machine.

    ``compile`` takes an ``nn.Module`` or an ATen-level ``torch.fx.GraphModule`` and a tuple of
    example tensors; the callable it returns takes tensors of the same shapes, dtypes and devices
    positionally and returns what the module returns (a tensor, or a tuple/list of tensors).
    """

    @property
    def name(self) -> str:
        """The registry name, e.g. ``"onnxruntime"``."""
        ...

    def available(self) -> tuple[bool, str]:
        """``(True, "")``, or ``(False, why)`` with an install hint. Pure and cheap: imports nothing heavy."""
        ...

    def version(self) -> str:
        """The versions that decide what ``compile`` produces, e.g. ``"onnxruntime 1.32.0 (...)"``.

        Used as part of a cache key. Raises ``RuntimeError`` when the backend is not available.
        """
        ...

    def compile(self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
        """Compile ``module`` for ``example_inputs``; raise ``BackendCompileError`` when it cannot."""
        ...


class BackendCompileError(RuntimeError):
    """A backend could not compile a module.

    ``backend`` is the backend's name, ``op`` the ATen/ONNX/OpenVINO op that failed when the
    backend's message names one (else ``None``), ``reason`` a one-line summary. The original
    exception is chained as ``__cause__``.
    """

    def __init__(self, backend: str, reason: str, op: str | None = None) -> None:
        self.backend = backend
        self.op = op
        self.reason = reason
        where = f"op {op}: " if op else ""
        super().__init__(f"{backend} could not compile the model: {where}{reason}")

    @classmethod
    def from_exception(
        cls, backend: str, exc: BaseException, op_patterns: Sequence[re.Pattern[str]] = ()
    ) -> BackendCompileError:
        """Summarise ``exc``: the first line that matches one of ``op_patterns`` becomes the reason and
        names the op (the pattern's groups joined by "."); else the exception's first line."""
        text = _ANSI.sub("", str(exc))
        lines = [_CLASS_PREFIX.sub("", line.strip()) for line in text.splitlines() if line.strip()]
        for pattern in op_patterns:
            for line in lines:
                match = pattern.search(line)
                if match:
                    return cls(
                        backend, _clip(line), op=_normalise_op(".".join(g for g in match.groups() if g))
                    )
        first = lines[0] if lines else ""
        return cls(backend, _clip(f"{type(exc).__name__}: {first}"))


def _normalise_op(op: str) -> str:
    """``aten::relu`` (TorchScript spelling) -> ``aten.relu``; ``aten.relu.default`` unchanged."""
    return op.strip().rstrip(",").replace("::", ".")


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."
