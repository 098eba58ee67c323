"""Collage in one screen: compile a zoo model with backend="collage", show its placement and its speed
beside each single backend.

    python examples/collage_demo.py [--model mlp] [--size tiny] [--backends eager,inductor,onnxruntime]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import torch_collage
from torch_collage.backends import get_backend
from torch_collage.timing import measure
from torch_zoo import get_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp")
    p.add_argument("--size", default="tiny", choices=("tiny", "full"))
    p.add_argument("--backends", default="eager,inductor,onnxruntime")
    p.add_argument("--cache-dir", default=tempfile.mkdtemp(prefix="collage_demo_"))
    args = p.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    zoo = get_model(args.model)
    model, inputs = zoo.build(args.size), zoo.example_inputs(args.size)
    report = torch_collage.explain(model, *inputs, backends=backends, cache_dir=args.cache_dir, max_depth=2)
    print(report.to_markdown())
    compiled = torch.compile(
        model, backend="collage", options={"backends": backends, "cache_dir": args.cache_dir, "max_depth": 2}
    )
    with torch.no_grad():
        calls = {"collage": lambda: compiled(*inputs)}
        for name in backends:
            fn = get_backend(name).compile(model, inputs)
            calls[name] = lambda fn=fn: fn(*inputs)
        for name, call in calls.items():
            print(f"{name:>12}: {measure(call, warmup=3, repeats=30).median_ms:.3f} ms (median)")


if __name__ == "__main__":
    main()
