"""Offline throughput on the CPU: our engine vs transformers' `generate` vs vLLM's CPU build, same checkpoints.

    python benchmarks/cpu_engines.py                                  # all three engines (builds .venv-vllm)
    python benchmarks/cpu_engines.py --engines ours,transformers      # no vLLM
    python benchmarks/cpu_engines.py --variants 31b --batches 1,16 --output-len 32

For each variant a tiny text-only `Gemma4ForCausalLM` checkpoint (random weights, fp32, sizes of
`gemma4.tiny.tiny_config`) is written by transformers itself, so every engine loads the same file.
Each batch size B runs ceil(min_prompts / B) rounds of B prompts generated together (input_len in,
output_len out), greedy, EOS ignored, fp32, `--threads` threads; one warm-up generation per engine
first. Start-up (load, and vLLM's import and engine build) is reported apart. vLLM runs in its own
venv (`setup_vllm_cpu.sh`), one subprocess per checkpoint with every batch size inside it: this file
is also that subprocess (`--vllm-worker SPEC.json`), so it imports only the standard library at
the top. The report also says whether the engines' greedy tokens agree with the first engine's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench_common import int_list, machine, str_list

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("ours", "transformers", "vllm")
DEFAULT_VLLM_VENV = REPO / ".venv-vllm"

# One generation call: B prompts in, B lists of output token ids out.
Generate = Callable[[list[list[int]]], list[list[int]]]


def write_checkpoint(variant: str, directory: Path, *, vocab_size: int, seed: int) -> Path:
    """A text-only transformers checkpoint shaped like `gemma4.tiny.tiny_config(variant)` (fp32, random)."""
    import torch
    import transformers

    from gemma4.tiny import tiny_config

    text = tiny_config(variant, vocab_size=vocab_size).text
    torch.manual_seed(seed)
    model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**text.to_hf_dict()))
    model.eval().save_pretrained(directory)
    return directory


def _rounds(batch: int, min_prompts: int) -> int:
    return math.ceil(min_prompts / batch)


def time_batches(
    generate: Generate, prompts: list[list[int]], batches: list[int], min_prompts: int, output_len: int
) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
    """Throughput per batch size, and every prompt's tokens (keyed "batch:index") for the agreement check."""
    generate(prompts[:2])  # warm-up
    rows, tokens = [], {}
    for batch in batches:
        rounds = _rounds(batch, min_prompts)
        start = time.perf_counter()
        outputs = [out for r in range(rounds) for out in generate(prompts[r * batch : (r + 1) * batch])]
        elapsed = time.perf_counter() - start
        produced = sum(len(out) for out in outputs)
        if produced != rounds * batch * output_len:
            raise RuntimeError(f"batch {batch}: {produced} tokens, expected {rounds * batch * output_len}")
        rows.append({
            "batch": batch, "prompts": rounds * batch, "output_tokens": produced, "elapsed_s": round(elapsed, 3),
            "output_tok_s": round(produced / elapsed, 1),
        })
        tokens.update({f"{batch}:{i}": out for i, out in enumerate(outputs)})
    return rows, tokens


def ours_engine(checkpoint: Path, *, max_num_seqs: int, max_model_len: int, output_len: int) -> Generate:
    import torch

    from gemma4 import LLM, SamplingParams

    llm = LLM(
        checkpoint, dtype=torch.float32, device="cpu", max_num_seqs=max_num_seqs, max_num_batched_tokens=2048,
        max_model_len=max_model_len, enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    return lambda prompts: [list(out.token_ids) for out in llm.generate(prompts, params)]


def transformers_engine(checkpoint: Path, *, output_len: int) -> Generate:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        ids = torch.tensor(prompts, dtype=torch.long)  # equal lengths: no padding
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
                do_sample=False, eos_token_id=[], pad_token_id=0,
            )
        return out[:, ids.shape[1] :].tolist()

    return generate


def run_in_process(engine: str, checkpoint: Path, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    if engine == "ours":
        generate = ours_engine(
            checkpoint, max_num_seqs=max(args.batches), max_model_len=args.input_len + args.output_len,
            output_len=args.output_len,
        )
    else:
        generate = transformers_engine(checkpoint, output_len=args.output_len)
    startup = time.perf_counter() - start
    rows, tokens = time_batches(generate, prompts, args.batches, args.min_prompts, args.output_len)
    return {"startup_s": round(startup, 2), "rows": rows, "tokens": tokens}


# ---------------------------------------------------------------------------- vLLM


def ensure_vllm_venv(venv: Path) -> Path:
    """The vLLM venv's python, building the venv first when it is missing (about 7 minutes, 3.5 GB)."""
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run(["bash", str(REPO / "benchmarks" / "setup_vllm_cpu.sh"), str(venv)], check=True)
    return python


def run_vllm(checkpoint: Path, prompts: list[list[int]], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run this file as `--vllm-worker` in the vLLM venv; the worker writes its results next to its spec."""
    python = ensure_vllm_venv(args.vllm_venv)
    spec = {
        "checkpoint": str(checkpoint), "prompts": prompts, "batches": args.batches, "min_prompts": args.min_prompts,
        "output_len": args.output_len, "max_model_len": args.input_len + args.output_len,
        "enforce_eager": not args.vllm_compile, "result": str(workdir / f"{checkpoint.name}-vllm.json"),
    }
    spec_path = workdir / f"{checkpoint.name}-vllm-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
        "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO / "benchmarks"),
    }
    log = workdir / f"{checkpoint.name}-vllm.log"
    with log.open("w") as sink:
        command = [str(python), __file__, "--vllm-worker", str(spec_path)]
        done = subprocess.run(command, env=env, stdout=sink, stderr=sink)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM worker failed ({done.returncode}); its log: {log}\n{log.read_text()[-3000:]}")
    return json.loads(Path(spec["result"]).read_text())


def vllm_worker(spec_path: Path) -> None:
    """Inside the vLLM venv: build one `vllm.LLM`, time every batch size, write the results."""
    start = time.perf_counter()
    import vllm

    spec = json.loads(spec_path.read_text())
    llm = vllm.LLM(
        model=spec["checkpoint"], dtype="float32", max_num_seqs=max(spec["batches"]),
        max_model_len=spec["max_model_len"], max_num_batched_tokens=2048, enable_prefix_caching=False,
        enforce_eager=spec["enforce_eager"], skip_tokenizer_init=True, seed=0,
    )
    startup = time.perf_counter() - start
    params = vllm.SamplingParams(
        temperature=0.0, max_tokens=spec["output_len"], min_tokens=spec["output_len"], ignore_eos=True, detokenize=False
    )

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    rows, tokens = time_batches(generate, spec["prompts"], spec["batches"], spec["min_prompts"], spec["output_len"])
    Path(spec["result"]).write_text(json.dumps({"startup_s": round(startup, 2), "rows": rows, "tokens": tokens}))


# ---------------------------------------------------------------------------- report


def agreement(runs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per engine after the first: how many prompts' greedy tokens equal the first engine's."""
    names = list(runs)
    reference = runs[names[0]]["tokens"]
    out = {}
    for name in names[1:]:
        same = sum(runs[name]["tokens"].get(key) == tokens for key, tokens in reference.items())
        out[f"{name} vs {names[0]}"] = f"{same}/{len(reference)}"
    return out


def markdown(report: dict[str, Any]) -> str:
    """engine x batch -> output tok/s, one row per variant and engine."""
    batches = report["batches"]
    lines = [
        "| variant (tiny) | engine | start-up (s) | " + " | ".join(f"batch {b} tok/s" for b in batches) + " |",
        "|---|---|---|" + "---|" * len(batches),
    ]
    for variant in report["variants"]:
        for engine, run in variant["engines"].items():
            rates = {row["batch"]: row["output_tok_s"] for row in run["rows"]}
            cells = " | ".join(str(rates[b]) for b in batches)
            lines.append(f"| {variant['variant']} | {engine} | {run['startup_s']} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=str_list, default=list(ENGINES), help="subset of ours,transformers,vllm")
    parser.add_argument("--variants", type=str_list, default=["31b", "26b-a4b", "e2b"])
    parser.add_argument("--batches", type=int_list, default=[1, 16, 32])
    parser.add_argument("--min-prompts", type=int, default=4, help="prompts per batch size at least (whole rounds)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where checkpoints and vLLM logs go (default: a temp dir)")
    parser.add_argument("--vllm-venv", type=Path, default=DEFAULT_VLLM_VENV)
    parser.add_argument("--vllm-compile", action="store_true", help="let vLLM torch.compile (slower start-up)")
    parser.add_argument("--vllm-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_worker is not None:
        vllm_worker(args.vllm_worker)
        return
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")

    import torch

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    count = max(b * _rounds(b, args.min_prompts) for b in args.batches)
    prompts = torch.randint(3, args.vocab_size, (count, args.input_len), generator=gen).tolist()
    with tempfile.TemporaryDirectory(prefix="cpu-engines-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        variants = []
        for variant in args.variants:
            checkpoint = write_checkpoint(variant, workdir / variant, vocab_size=args.vocab_size, seed=args.seed)
            runs = {}
            for engine in args.engines:
                if engine == "vllm":
                    runs[engine] = run_vllm(checkpoint, prompts, args, workdir)
                else:
                    runs[engine] = run_in_process(engine, checkpoint, prompts, args)
                print(f"{variant} {engine}: {runs[engine]['rows']}", file=sys.stderr, flush=True)
            variants.append({
                "variant": variant, "agreement": agreement(runs),
                "engines": {name: {k: v for k, v in run.items() if k != "tokens"} for name, run in runs.items()},
            })
    report = {
        "benchmark": "cpu_engines", "machine": machine(), "torch": torch.__version__, "threads": args.threads,
        "dtype": "fp32", "input_len": args.input_len, "output_len": args.output_len, "batches": args.batches,
        "vocab_size": args.vocab_size, "variants": variants,
    }
    report["markdown"] = markdown(report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
