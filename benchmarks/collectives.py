"""CPU collective timings of a multi-rank replica's step (gloo, 2 and 4 local processes).

    python benchmarks/collectives.py                     # 2 and 4 ranks, batches 1/16/64
    python benchmarks/collectives.py --world-sizes 2 --batches 1 --iters 5

A tensor-parallel step runs one all-reduce of the hidden states after each attention output
projection and one after each MLP (+ experts) block, one all-reduce per vocabulary-split embedding
lookup, and one all-gather of the logits' vocabulary shards. This times those collectives at the real
models' shapes (31B: hidden 5376, 26B-A4B: 2816, vocabulary 262,144) over gloo on this machine's CPU,
which is what the CPU tests run; GPU (NCCL) timings need a machine with several GPUs. One JSON report
on stdout: per world size, op, model and batch, the median and p90 in microseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from typing import Any

from bench_common import int_list, machine, percentile

HIDDEN = {"31b": 5376, "26b-a4b": 2816}
VOCAB = 262_144


class CollectiveTimer:
    """One rank: joins the gloo group and times collectives on request."""

    def __init__(self, world_size: int, rank: int, init_method: str) -> None:
        import torch

        from gemma4.parallel.comm import init_collectives

        torch.set_num_threads(1)
        self.torch = torch
        self.comm = init_collectives("gloo", init_method, world_size, rank)

    def time(self, op: str, shape: tuple[int, ...], dtype: str, iters: int, warmup: int = 2) -> list[float]:
        """Microseconds per call of `op` on a tensor of `shape`, after `warmup` calls (barrier before each)."""
        torch = self.torch
        x = torch.randn(shape).to(getattr(torch, dtype))
        run = self.comm.all_reduce if op == "all_reduce" else partial(self.comm.all_gather, dim=-1)
        times = []
        for i in range(warmup + iters):
            self.comm.barrier()
            start = time.perf_counter()
            run(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e6)
        return times


def _factory(world_size: int, rank: int, init_method: str) -> CollectiveTimer:
    return CollectiveTimer(world_size, rank, init_method)


def cases(batches: list[int], world_size: int) -> list[dict[str, Any]]:
    """The step's collectives: hidden-state all-reduces (bf16 and fp32) and the fp32 logits all-gather."""
    out = []
    for model, hidden in HIDDEN.items():
        for batch in batches:
            for dtype in ("bfloat16", "float32"):
                out.append({"op": "all_reduce", "model": model, "batch": batch, "shape": (batch, hidden), "dtype": dtype})
    for batch in batches:
        out.append({"op": "all_gather", "model": "logits", "batch": batch, "shape": (batch, VOCAB // world_size),
                    "dtype": "float32"})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int_list, default=[2, 4])
    parser.add_argument("--batches", type=int_list, default=[1, 16, 64])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)

    from gemma4.parallel.procs import RankProcesses

    results = []
    for world in args.world_sizes:
        ranks = RankProcesses(world, partial(_factory, world), env={"OMP_NUM_THREADS": "1"})
        try:
            for case in cases(args.batches, world):
                per_rank = ranks.call("time", case["op"], case["shape"], case["dtype"], args.iters)
                slowest = [max(step) for step in zip(*per_rank)]  # a collective ends when its last rank does
                results.append({
                    "world_size": world, **{k: v for k, v in case.items() if k != "shape"},
                    "shape": list(case["shape"]),
                    "median_us": round(statistics.median(slowest), 1), "p90_us": round(percentile(slowest, 90), 1),
                })
        finally:
            ranks.close()
    json.dump({"machine": machine(), "iters": args.iters, "results": results}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
