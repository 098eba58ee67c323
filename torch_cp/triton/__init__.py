"""Triton kernels of torch_cp: split-KV decode attention with log-sum-exp and the merge of splits.

Needs the ``triton`` package (``pip install triton``). On CPU tensors the kernels run only under the
Triton interpreter: set ``TRITON_INTERPRET=1`` before triton is first imported.
"""

from torch_cp.triton.launch import INTERPRETED, choose_splits, decode_partial, merge_partials
from torch_cp.triton.ops import decode_attention, merge_states, unsupported_reason

__all__ = [
    "INTERPRETED",
    "choose_splits",
    "decode_attention",
    "decode_partial",
    "merge_partials",
    "merge_states",
    "unsupported_reason",
]
