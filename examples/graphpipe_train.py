"""Train a branchy model with GraphPipe: 4 pipeline stages forming a DAG, one process each (gloo, CPU).

    torchrun --standalone --nproc-per-node 4 examples/graphpipe_train.py
    python examples/graphpipe_train.py            # without torchrun: spawns the 4 local processes itself
    python examples/graphpipe_train.py --steps 20 --microbatches 8
    python examples/graphpipe_train.py --nproc 8 --data-parallel 2   # 4 stages x 2 replicas each

Rank 0 prints the plan (stages, stage edges, in-flight micro-batches, the schedule of stage 0), the
simulator's prediction, the loss of every step, and checks at the end that the gathered checkpoint
loads into the plain model and gives the same predictions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from torch_graphpipe import GraphPipe


class Branchy(nn.Module):
    """A stem, three parallel towers, a concat and a head: (B, 32) -> (B, 10) logits."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(32, width), nn.GELU())
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), act, nn.Linear(width, width), nn.LayerNorm(width))
            for act in (nn.ReLU(), nn.Tanh(), nn.SiLU())
        )
        self.head = nn.Sequential(nn.Linear(3 * width, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head(torch.cat([tower(s) for tower in self.towers], dim=-1))


def data(batch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy task, the same on every rank: the class is the argmax of 10 fixed projections."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(batch, 32, generator=g)
    w = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    return x, (x @ w).argmax(dim=-1)


def train(args: argparse.Namespace) -> None:
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Branchy()
    reference = Branchy()
    reference.load_state_dict(model.state_dict())
    x, y = data(args.batch, 0)
    gp = GraphPipe(
        model, example_inputs=(x,), loss_fn=F.cross_entropy, num_microbatches=args.microbatches,
        data_parallel=args.data_parallel,
    )  # fmt: skip
    del model  # this rank keeps only its stage's parameters (gp.parameters())
    if rank == 0:
        print(gp.plan)
        print("stage 0 runs:", " ".join(gp.plan.schedule.compute_order(0)))
        sim = gp.plan.simulate()
        print(f"simulated step: {sim.iteration_time:.2f} ms, bubbles {sim.bubble_fraction:.0%}, "
              f"peak in-flight per stage {sim.peak_in_flight}")  # fmt: skip
    params = list(gp.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3) if params else None
    for step in range(args.steps):
        x, y = data(args.batch, step)
        start = time.perf_counter()
        loss = gp.step(x, target=y)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        if rank == 0:
            print(f"step {step:3d}  loss {loss:.4f}  {1e3 * (time.perf_counter() - start):.1f} ms")
    check_checkpoint(gp, reference, args)


def check_checkpoint(gp: GraphPipe, plain: nn.Module, args: argparse.Namespace) -> None:
    x, y = data(args.batch, 10_000)
    gp.eval()
    logits = gp(x)  # inference through the pipeline, on every rank
    state = gp.state_dict()  # the full model, gathered on every rank
    if dist.get_rank() == 0:
        plain.load_state_dict(state)
        plain.eval()
        with torch.no_grad():
            same = torch.allclose(plain(x), logits, rtol=1e-5, atol=1e-6)
        accuracy = (logits.argmax(-1) == y).float().mean().item()
        print(f"held-out accuracy {accuracy:.1%}; checkpoint loads into the plain model: {same}")


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        train(args)
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--nproc", type=int, default=4, help="processes to spawn when not under torchrun")
    p.add_argument(
        "--data-parallel", type=int, default=1, help="replicas of every stage (processes = stages x this)"
    )
    args = p.parse_args()
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        try:
            train(args)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.nproc, port, args), nprocs=args.nproc)


if __name__ == "__main__":
    main()
