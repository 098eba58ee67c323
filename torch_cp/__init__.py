"""torch_cp: cache-parallel decode attention.

The KV cache of one long sequence is sharded along the sequence axis over ranks; each rank attends
to its shard and returns a partial output with its log-sum-exp (natural log, float32), and the
partial states are merged exactly with :func:`merge_states`.
"""

from torch_cp.merge import merge_states
from torch_cp.reference import merge_states_reference

__all__ = ["merge_states", "merge_states_reference"]
