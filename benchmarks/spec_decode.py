"""Speculative decoding: output tokens/s and acceptance with speculation off, n-gram drafting and the assistant drafter.

    python benchmarks/spec_decode.py                                   # CPU: tiny random target and drafter
    python benchmarks/spec_decode.py --device cuda --real-size --dtype bf16 --out spec_decode.jsonl

For each variant, method (`off`, `ngram`, `assistant`) and batch size (1 and 16), B prompts run to
output_len new tokens (greedy, EOS ignored, prefix caching off) through the public engine API
(`gemma4.LLM(..., speculative_model=...)`). The target has random weights (`--real-size`: the
variant's real shapes; else `gemma4.tiny.tiny_config`) and so does the drafter, a gemma4_assistant
checkpoint written by `gemma4.tiny.write_tiny_assistant` for that target: 64 wide even for a real-size
target, so its draft steps cost less than the published drafters' would. Random weights settle the
cost of drafting and verifying, not how often a trained drafter is right: their acceptance is no
forecast of real traffic. Prompts repeat a random segment of `--repeat-period` tokens, the kind of
text prompt lookup (`ngram`) finds matches in.

Each row is one JSON line (also appended to `--out`): output tok/s, the speed-up over `off` at the
same batch, and from the engine's speculative counters (`EngineStats.spec_*`, deltas over the timed
run) the drafts, draft and accepted tokens, the acceptance rate (accepted / draft tokens) and the
mean acceptance length (1 + accepted / drafts: tokens per verification step and request).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench_common import int_list, machine, str_list
from gemma4 import LLM, SamplingParams
from gemma4.backends import backend_of
from gemma4.config import DEFAULT_SPECULATIVE_TOKENS, Gemma4Config, variant_config
from gemma4.tiny import tiny_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = ("off", "ngram", "assistant")
SPEC_COUNTERS = ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens")


def target_config(variant: str, real_size: bool) -> Gemma4Config:
    return variant_config(variant) if real_size else tiny_config(variant)


def speculative_model(method: str, target: Gemma4Config, workdir: Path, variant: str) -> str | None:
    """EngineArgs.speculative_model for `method`: None, 'ngram', or a random drafter written for `target`."""
    if method == "off":
        return None
    if method == "ngram":
        return "ngram"
    from gemma4.tiny import write_tiny_assistant  # the drafter's writer (gemma4.assistant) loads only when asked

    return str(write_tiny_assistant(workdir / f"{variant}-assistant", target, seed=0))


def prompts(batch: int, length: int, period: int, vocab: int, seed: int) -> list[list[int]]:
    """`batch` prompts of `length` tokens, each a random segment of `period` tokens repeated (0: no repeats)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        segment = torch.randint(3, vocab, (period or length,), generator=gen).tolist()
        out.append((segment * (length // len(segment) + 1))[:length])
    return out


def spec_totals(llm: LLM) -> dict[str, int]:
    stats = llm.engine.stats()
    return {name: getattr(stats, name) for name in SPEC_COUNTERS}


def run_method(args: argparse.Namespace, variant: str, method: str, workdir: Path) -> list[dict[str, Any]]:
    """One engine for (variant, method); a row per batch size."""
    config = target_config(variant, args.real_size)
    llm = LLM(
        config, dtype=DTYPES[args.dtype], device=args.device, max_num_seqs=max(args.batches),
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.input_len + args.output_len,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30), enable_prefix_caching=False, seed=args.seed,
        speculative_model=speculative_model(method, config, workdir, variant),
        num_speculative_tokens=args.num_speculative_tokens,
    )
    vocab = config.text.vocab_size
    k = llm.engine.args.speculative_tokens(config.text)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts(1, args.input_len, args.repeat_period, vocab, args.seed + 1),
                 SamplingParams(temperature=0.0, max_tokens=min(4, args.output_len), ignore_eos=True))  # warm-up
    rows = []
    for batch in args.batches:
        batch_prompts = prompts(batch, args.input_len, args.repeat_period, vocab, args.seed)
        before = spec_totals(llm)
        start = time.perf_counter()
        outputs = llm.generate(batch_prompts, params)
        backend_of(args.device).synchronize(args.device)
        elapsed = time.perf_counter() - start
        spec = {name: total - before[name] for name, total in spec_totals(llm).items()}
        drafts, draft_tokens, accepted = (spec[name] for name in SPEC_COUNTERS)
        out_tokens = sum(len(o.token_ids) for o in outputs)
        rows.append({
            "variant": variant + ("" if args.real_size else " (tiny)"),
            "method": method,
            "batch": batch,
            "num_speculative_tokens": k,
            "output_tokens": out_tokens,
            "elapsed_s": round(elapsed, 3),
            "output_tok_s": round(out_tokens / elapsed, 1),
            "drafts": drafts,
            "draft_tokens": draft_tokens,
            "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / draft_tokens, 3) if draft_tokens else None,
            "acceptance_length": round(1 + accepted / drafts, 3) if drafts else None,
        })
    llm.shutdown()
    del llm
    gc.collect()
    backend_of(args.device).release_cached_memory()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", type=str_list, default=["e2b", "e4b", "26b-a4b", "31b"])
    parser.add_argument("--methods", type=str_list, default=list(METHODS), help=f"of {', '.join(METHODS)}")
    parser.add_argument("--batches", type=int_list, default=[1, 16])
    parser.add_argument("--real-size", action="store_true", help="the variants' real shapes (GPU), else tiny ones")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeat-period", type=int, default=16, help="prompt tokens before they repeat (0: never)")
    parser.add_argument("--num-speculative-tokens", type=int,
                        help="drafts per step (default: the variant's, " + ", ".join(
                            f"{v} {n}" for v, n in DEFAULT_SPECULATIVE_TOKENS.items()) + ")")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")

    header = {"device": backend_of(args.device).device_name(args.device), "dtype": args.dtype, **machine()}
    with tempfile.TemporaryDirectory(prefix="spec-decode-") as tmp:
        for variant in args.variants:
            baseline: dict[int, float] = {}
            for method in args.methods:
                for row in run_method(args, variant, method, Path(tmp)):
                    if method == "off":
                        baseline[row["batch"]] = row["output_tok_s"]
                    base = baseline.get(row["batch"])
                    row["speedup"] = round(row["output_tok_s"] / base, 3) if base else None
                    line = json.dumps({**row, **header})
                    print(line, flush=True)
                    if args.out:
                        with args.out.open("a") as f:
                            f.write(line + "\n")


if __name__ == "__main__":
    main()
