"""Real gloo process groups for the runtime tests: one process per rank, a fresh rendezvous each."""

from __future__ import annotations

import datetime
import os
import random
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests._spawn import exit_after

__all__ = ["init_gloo", "shared_seed", "spawn"]


def init_gloo(rank: int, world: int, init: str, timeout_s: float = 60.0) -> None:
    """Join the gloo group of a spawned test; the timeout makes a hang fail fast."""
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    torch.set_num_threads(1)


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, init, *args)`` in ``world`` processes; the rendezvous is a fresh file store
    (no TCP port to collide with other tests running on the machine)."""
    with tempfile.TemporaryDirectory(prefix="gp_test_") as tmp:
        init = "file://" + os.path.join(tmp, "store")
        mp.spawn(exit_after, args=(fn, world, init, *args), nprocs=world)


def shared_seed() -> int:
    """A fresh random seed drawn on rank 0, the same on every rank."""
    seed = [random.SystemRandom().randrange(2**31) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(seed, src=0)
    return int(seed[0])
