"""Runs a test body on several real gloo processes (torch.multiprocessing spawn, a fresh port each time)."""

import datetime
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests._spawn import exit_after


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, body, args):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a hang fails the test instead of blocking it
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        body(rank, world, *args)
        # no rank tears its side of the group down while a peer still talks to it: gloo aborted a
        # process ("terminate called without an active exception") when one left first
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(body, world: int, *args) -> None:
    """Calls ``body(rank, world, *args)`` on ``world`` processes in one gloo group; re-raises failures.

    ``body`` must be a module-level function (it is pickled into the spawned processes).
    """
    mp.spawn(exit_after, args=(_entry, world, _free_port(), body, args), nprocs=world)
