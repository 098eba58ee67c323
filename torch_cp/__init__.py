"""torch_cp: cache-parallel decode attention.

The KV cache of one long sequence is sharded along the sequence axis over ranks; each rank attends
to its shard and returns a partial output with its log-sum-exp (natural log, float32), and the
partial states are merged exactly with :func:`merge_states`.
"""

from torch_cp.attention import attention, attention_state
from torch_cp.cache import ShardedKVCache
from torch_cp.distributed import merge_across_ranks
from torch_cp.merge import merge_states
from torch_cp.reference import attention_reference, merge_states_reference

__all__ = [
    "ShardedKVCache",
    "attention",
    "attention_reference",
    "attention_state",
    "merge_across_ranks",
    "merge_states",
    "merge_states_reference",
]
