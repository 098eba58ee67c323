"""Decode with a KV cache sharded over ranks (cache parallelism), checked against one-rank attention.

    torchrun --nproc-per-node 2 examples/cp_decode.py [--context 16384] [--steps 8]

Every rank holds about 1/P of the cache (block-cyclic); each decode step attends the new token to
the whole cache exactly: partial attention per shard, merged across ranks with its log-sum-exp.
Runs on CPU with gloo (one thread per rank); on GPUs use backend nccl.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

import torch_cp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=16384, help="tokens prefilled before decoding")
    parser.add_argument("--steps", type=int, default=8, help="decode steps")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)  # the same tokens on every rank, as under replicated weights
    total = args.context + args.steps
    shape_kv = (1, args.kv_heads, total, args.head_dim)
    k_all, v_all = torch.randn(shape_kv, generator=g), torch.randn(shape_kv, generator=g)
    q_all = torch.randn(1, args.q_heads, total, args.head_dim, generator=g)
    cache = torch_cp.ShardedKVCache(1, group=dist.group.WORLD, block_size=64)
    cache.update(0, k_all[:, :, : args.context], v_all[:, :, : args.context])
    outs, times = [], []
    for t in range(args.context, total):
        dist.barrier()
        start = time.perf_counter()
        outs.append(cache.attend(0, q_all[:, :, t : t + 1], k_all[:, :, t : t + 1], v_all[:, :, t : t + 1]))
        times.append(time.perf_counter() - start)
    worst = 0.0
    for t, out in zip(range(args.context, total), outs):
        ref, _ = torch_cp.attention_reference(
            q_all[:, :, t : t + 1], k_all[:, :, : t + 1], v_all[:, :, : t + 1]
        )
        worst = max(worst, (out.double() - ref).abs().max().item())
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([cache.local_len(0)]))
    if rank == 0:
        mib = 2 * cache.local_len(0) * args.kv_heads * args.head_dim * 4 / 2**20
        print(
            f"cache parallelism over {world} ranks (gloo, CPU): {total} tokens, Hq {args.q_heads}, "
            f"Hkv {args.kv_heads}, D {args.head_dim}, fp32"
        )
        print(f"  tokens per rank: {[int(s) for s in sizes]}  ({mib:.0f} MiB of K+V on rank 0)")
        print(f"  decode step (median of {len(times)}): {sorted(times)[len(times) // 2] * 1e3:.2f} ms")
        print(f"  max |error| vs unsharded float64 attention: {worst:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
