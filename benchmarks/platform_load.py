"""Throughput and TTFT through the whole stack (gRPC -> Ray Serve gateway -> replica -> engine) against
the bare engine (AsyncEngine in-process), at several concurrencies. Bounded: a fixed number of requests.

    python benchmarks/platform_load.py --concurrency 1 4 16 --requests-per-level 32

Both sides run the same checkpoint (a tiny random-weight model unless --checkpoint is given), the same
engine settings and the same token-id prompts; greedy, EOS ignored, so both do identical work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import time
from typing import Any

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [[2] + torch.randint(3, vocab, (length - 1,), generator=gen).tolist() for _ in range(n)]


def _summary(level: int, ttfts: list[float], tokens: int, elapsed: float) -> dict[str, Any]:
    return {
        "concurrency": level,
        "requests": len(ttfts),
        "output_tokens_per_s": round(tokens / elapsed, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_max_ms": round(1000 * max(ttfts), 1),
    }


async def _bounded(level: int, jobs: list[Any], run) -> list[tuple[float, int]]:
    semaphore = asyncio.Semaphore(level)

    async def one(job: Any) -> tuple[float, int]:
        async with semaphore:
            return await run(job)

    return await asyncio.gather(*(one(job) for job in jobs))


def bench_stack(settings: Any, prompts: list[list[int]], levels: list[int], output_len: int) -> list[dict[str, Any]]:
    import grpc
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from gemma4_platform.api.v1 import serving_pb2 as pb
    from gemma4_platform.api.v1 import serving_pb2_grpc as pb_grpc
    from gemma4_platform.graph import build_app
    from gemma4_platform.grpc_registration import SERVICER_FUNCTION

    grpc_port = _free_port()
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=_free_port()),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION]))
    serve.run(build_app(settings.model_dump()), name="bench", route_prefix="/")
    results = []
    try:
        async def main() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = pb_grpc.Gemma4ServingStub(channel)
                sampling = pb.SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

                async def run(prompt: list[int]) -> tuple[float, int]:
                    start, first, tokens = time.perf_counter(), None, 0
                    async for message in stub.GenerateStream(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling)):
                        first = first or time.perf_counter() - start
                        tokens += len(message.delta_token_ids)
                    return first or 0.0, tokens

                await _bounded(1, prompts[:2], run)  # warm-up
                for level in levels:
                    start = time.perf_counter()
                    done = await _bounded(level, prompts, run)
                    results.append(_summary(level, [d[0] for d in done], sum(d[1] for d in done), time.perf_counter() - start))

        asyncio.run(main())
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def bench_engine(settings: Any, checkpoint: str, prompts: list[list[int]], levels: list[int], output_len: int) -> list[dict[str, Any]]:
    from gemma4 import LLM, AsyncEngine, SamplingParams

    llm = LLM(checkpoint, dtype=getattr(torch, settings.model.dtype), device="cpu", **settings.engine.engine_args())
    engine = AsyncEngine(llm.engine)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    results = []

    async def run(prompt: list[int]) -> tuple[float, int]:
        start, first, tokens = time.perf_counter(), None, 0
        async for output in await engine.add_request(prompt, params):
            first = first or time.perf_counter() - start
            tokens += len(output.delta_token_ids)
        return first or 0.0, tokens

    async def main() -> None:
        await _bounded(1, prompts[:2], run)
        for level in levels:
            start = time.perf_counter()
            done = await _bounded(level, prompts, run)
            results.append(_summary(level, [d[0] for d in done], sum(d[1] for d in done), time.perf_counter() - start))

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from gemma4.config import load_config
    from gemma4_platform.graph import resolve_checkpoint
    from gemma4_platform.settings import PlatformSettings

    settings = PlatformSettings.model_validate({
        "model": {"path": args.checkpoint, "dtype": "float32", "device": "cpu"},
        "engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 512, "enable_prefix_caching": False},
        "replica": {"num_cpus": 0},
        "gateway": {"prefix_affinity": False},
    })
    checkpoint = resolve_checkpoint(settings)
    prompts = _prompts(args.requests_per_level, args.input_len, load_config(checkpoint).text.vocab_size)
    report = {
        "engine": bench_engine(settings, checkpoint, prompts, args.concurrency, args.output_len),
        "stack": bench_stack(settings, prompts, args.concurrency, args.output_len),
        "input_len": args.input_len,
        "output_len": args.output_len,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
