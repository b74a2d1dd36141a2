"""Offline throughput of the engine: N random prompts generated together, no timed assertions.

    python benchmarks/offline_throughput.py --variant e2b --tiny              # CPU, tiny random weights
    python benchmarks/offline_throughput.py --variant 31b --device cuda       # GPU, real size, random weights

Random weights are enough for throughput (the work per token does not depend on the values);
prefix caching is off and EOS is ignored so every request runs to its output length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gemma4 import LLM, SamplingParams
from gemma4.backends import backend_of
from gemma4.config import variant_config
from gemma4.tiny import tiny_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="e2b", choices=["e2b", "e4b", "26b-a4b", "31b"])
    parser.add_argument("--tiny", action="store_true", help="scale the variant down (CPU runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = tiny_config(args.variant, vocab_size=4096) if args.tiny else variant_config(args.variant)
    llm = LLM(
        config,
        dtype=DTYPES[args.dtype],
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.input_len + args.output_len,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        enable_prefix_caching=False,
        seed=args.seed,
    )
    gen = torch.Generator().manual_seed(args.seed)
    vocab = config.text.vocab_size
    prompts = [torch.randint(3, vocab, (args.input_len,), generator=gen).tolist() for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    backend_of(args.device).synchronize(args.device)
    elapsed = time.perf_counter() - start

    out_tokens = sum(len(o.token_ids) for o in outputs)
    ttfts = [o.metrics.time_to_first_token for o in outputs]
    gaps = [g for o in outputs for g in o.metrics.inter_token_times]
    result = {
        "variant": args.variant + (" (tiny)" if args.tiny else ""),
        "device": backend_of(args.device).device_name(args.device),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(outputs) / elapsed, 3),
        "output_tokens_per_s": round(out_tokens / elapsed, 1),
        "total_tokens_per_s": round((out_tokens + args.num_prompts * args.input_len) / elapsed, 1),
        "mean_ttft_s": round(statistics.mean(ttfts), 3),
        "mean_itl_ms": round(1000 * statistics.mean(gaps), 2) if gaps else None,
        "preemptions": llm.engine.stats().num_preemptions,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
