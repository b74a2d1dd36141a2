"""Per-token cost of structured outputs: decode steps at a batch of running requests, with and without a grammar
(CPU, tiny config, the tiny tokenizer at `--vocab-size`).

    python benchmarks/structured_output.py                          # e2b, 64 running, a JSON schema
    python benchmarks/structured_output.py --running 1,64 --vocab-size 262144 --steps 20

Each mode brings `running` requests into steady decode (sampled at temperature 1, seeded, ignore_eos so none
ends), then times `steps` decode steps. The grammar is a JSON schema whose answer is a long free string (the
string lexer runs on every token, as in a real JSON answer). Reported: step time per mode, the overhead per
step and per token (structured - plain), the background mask fill per step (it overlaps the forward) and how
long the step waited for it after the forward.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import Any

import torch

from bench_common import int_list, machine
from gemma4 import LLM, SamplingParams
from gemma4.engine import LLMEngine
from gemma4.engine.structured_output import state
from gemma4.engine.structured_output.params import StructuredOutputParams
from gemma4.tiny import tiny_config
from gemma4.tiny_tokenizer import build_tiny_tokenizer
from gemma4.tokenizer import Gemma4Tokenizer
from host_overhead import ForwardTimer, max_output_tokens

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 10**6}, "text": {"type": "string"}},
    "required": ["id", "text"],
    "additionalProperties": False,
}


def _median_ms(values_ns: list[int]) -> float:
    return round(statistics.median(values_ns) / 1e6, 4)


def time_decode(
    engine: LLMEngine, *, running: int, steps: int, warmup: int, prompt_len: int, batched_tokens: int,
    vocab_size: int, structured: StructuredOutputParams | None, timers: list[ForwardTimer],
) -> list[int]:
    """Wall nanoseconds of `steps` decode steps over `running` requests; `timers` count the timed steps only."""
    gen = torch.Generator().manual_seed(0)
    max_tokens = max_output_tokens(running, steps, warmup, prompt_len, batched_tokens)
    ids = [
        engine.add_request(
            torch.randint(3, vocab_size, (prompt_len,), generator=gen).tolist(),
            SamplingParams(max_tokens=max_tokens, seed=i, ignore_eos=True, structured=structured),
        )
        for i in range(running)
    ]
    started: set[str] = set()
    while len(started) < running:
        started.update(out.request_id for out in engine.step() if out.delta_token_ids)
    for _ in range(warmup):
        engine.step()
    for timer in timers:
        timer.ns = timer.calls = 0
    gc.collect()
    wall = []
    for _ in range(steps):
        start = time.perf_counter_ns()
        engine.step()
        wall.append(time.perf_counter_ns() - start)
    if engine.stats().num_running != running:
        raise RuntimeError("a request finished during the timed steps; raise max_tokens")
    for request_id in ids:
        engine.abort_request(request_id)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="e2b")
    parser.add_argument("--running", type=int_list, default=[64], help="running request counts")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batched_tokens = max(args.max_num_batched_tokens, args.prompt_len)
    max_tokens = max_output_tokens(max(args.running), args.steps, args.warmup, args.prompt_len, batched_tokens)
    tokenizer = Gemma4Tokenizer(build_tiny_tokenizer(args.vocab_size), variant=args.variant)
    llm = LLM(
        tiny_config(args.variant, vocab_size=args.vocab_size), tokenizer=tokenizer, dtype=torch.float32,
        max_num_seqs=max(args.running), max_num_batched_tokens=batched_tokens,
        max_model_len=args.prompt_len + max_tokens, enable_prefix_caching=False,
    )
    structured_outputs = llm.engine.executor.worker.structured
    fill, wait = ForwardTimer(), ForwardTimer()
    fill.wrap(structured_outputs, "masks")  # runs on the mask thread, beside the forward
    wait.wrap(state.MaskJob, "result")  # the main thread blocked on it after the forward
    constraint = StructuredOutputParams(json_schema=json.dumps(SCHEMA))
    results = []
    for running in args.running:
        walls = {
            mode: time_decode(
                llm.engine, running=running, steps=args.steps, warmup=args.warmup, prompt_len=args.prompt_len,
                batched_tokens=batched_tokens, vocab_size=args.vocab_size, structured=structured,
                timers=[fill, wait],
            )
            for mode, structured in (("plain", None), ("structured", constraint))
        }
        plain_ms, structured_ms = _median_ms(walls["plain"]), _median_ms(walls["structured"])
        row: dict[str, Any] = {
            "running": running,
            "steps": args.steps,
            "plain_step_ms": plain_ms,
            "structured_step_ms": structured_ms,
            "overhead_ms_per_step": round(structured_ms - plain_ms, 4),
            "overhead_ms_per_token": round((structured_ms - plain_ms) / running, 5),
            "mask_fill_ms_per_step": round(fill.ns / 1e6 / max(fill.calls, 1), 4),
            "mask_wait_ms_per_step": round(wait.ns / 1e6 / max(wait.calls, 1), 4),
        }
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    report = {
        "benchmark": "structured_output",
        "machine": machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "variant": f"{args.variant} (tiny)",
        "vocab_size": args.vocab_size,
        "schema": SCHEMA,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
