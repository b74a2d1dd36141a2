"""Decode on one GPU: kernel microbenchmarks, then real-size configs with random weights (torch ops vs Triton
kernels, eager vs CUDA graphs) against transformers' `generate`.

    python benchmarks/gpu_decode.py --out gpu_decode.json               # H100/H200, under 8 minutes on an H200
    TRITON_INTERPRET=1 python benchmarks/gpu_decode.py --device cpu --tiny --dtype fp32 \
        --variants e2b --batches 1,2 --input-len 16 --output-len 4 --hf-batches 1 --peak-bandwidth-gbs 50

First the kernel microbenchmarks (`kernel_micro.py`: attention per layer type and context length, MoE
per batch size, the sandwich norm, sampling; each Triton kernel against its torch reference op, with
the achieved bandwidth against the device's peak; `--no-micro` skips them). Then, for each variant
(E2B, E4B, 26B-A4B; 31B when the device has >= 120 GiB) and each engine mode (`eager`: torch ops, no
CUDA graphs; `graphs`: torch ops, CUDA graphs; `kernels`: Triton kernels and CUDA graphs; optional
`kernels+compile`),
every batch size B runs B prompts of input_len tokens to output_len new tokens (greedy, EOS
ignored, prefix caching off), and transformers' `generate` runs the same prompts at `--hf-batches`.
Each row prints output tok/s, TTFT (from submission to the first token), ITL p50/p99 (gaps between
a request's tokens), the peak `torch.cuda.max_memory_allocated` against the memory model's
prediction (weights + the KV pools this run sizes + step activations + graph pools, from
`gemma4.memory`) and the share of the bandwidth roofline: (weights read per decode step + KV read)
/ peak bandwidth, over the measured ITL p50. Modes the engine cannot express (an `EngineArgs`
without the switch the mode turns on) are reported as skipped. `--budget-s` (360 s) starts no
new variant, mode or transformers run once that much time has gone, so 31B, last, still ends within
8 minutes; every result is printed as it arrives and `--out` is rewritten after each, so a cut-off
run still leaves its rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import kernel_micro
from bench_common import int_list, machine, percentile, str_list
from gemma4 import memory
from gemma4.backends import backend_of
from gemma4.config import Gemma4Config, variant_config
from gemma4.engine import EngineArgs, LLMEngine, SamplingParams, random_weights_model
from gemma4.tiny import tiny_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Peak HBM bandwidth (bytes/s) by device name: NVIDIA's H100 SXM and H200 figures (performance anchors s3).
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}
# Output tokens per variant unless --output-len says otherwise: fewer for the big ones, to fit 8 minutes.
OUTPUT_LEN = {"e2b": 256, "e4b": 256, "26b-a4b": 128, "31b": 64}
BIG_DEVICE_BYTES = 120 * 2**30  # 31B bf16 (62 GB of weights) plus its KV at batch 64 needs an H200
# Engine switches per mode; a mode whose enabled switch EngineArgs lacks is skipped. Default: graphs, kernels.
MODES: dict[str, dict[str, Any]] = {
    "eager": {"cuda_graphs": False, "torch_compile": False, "kernels": "torch"},
    "graphs": {"cuda_graphs": True, "torch_compile": False, "kernels": "torch"},
    "kernels": {"cuda_graphs": True, "torch_compile": False, "kernels": "triton"},
    "kernels+compile": {"cuda_graphs": True, "torch_compile": True, "kernels": "triton"},
}


@dataclasses.dataclass(frozen=True)
class Setup:
    """One variant's run: its config and the engine sizing every mode shares."""

    variant: str
    config: Gemma4Config
    batches: list[int]
    input_len: int
    output_len: int
    max_num_batched_tokens: int
    block_size: int

    @property
    def max_model_len(self) -> int:
        return self.input_len + self.output_len

    @property
    def max_num_seqs(self) -> int:
        return max(self.batches)


def kv_pool_bytes(setup: Setup, kv_width: int) -> int:
    """Bytes of KV pools that hold `max_num_seqs` sequences of max_model_len (what `split_kv_budget` reserves)."""
    total = 0
    for group in memory.rank_cache_groups(setup.config.text):
        per_seq = group.peak_blocks_per_sequence(setup.block_size, setup.max_model_len, setup.max_num_batched_tokens)
        total += group.pool_bytes(setup.max_num_seqs * per_seq, setup.block_size, kv_width)
    return total


def predicted_memory(setup: Setup, dtype: str, kv_bytes: int, cuda_graphs: bool) -> dict[str, int]:
    """What `gemma4.memory` says the engine allocates: weights, KV pools, step activations, graph pools."""
    config, width = setup.config, DTYPES[dtype].itemsize
    weights = sum(memory.weight_bytes_per_gpu(config, weight_dtype=dtype, ple_on_device=True).values())
    activations = memory.activation_bytes(
        config, tokens=setup.max_num_batched_tokens,
        sampled_rows=min(setup.max_num_seqs, setup.max_num_batched_tokens), activation_width=width,
    )
    graphs = 0
    if cuda_graphs:
        graphs = memory.cuda_graph_bytes(config, max_num_seqs=setup.max_num_seqs, activation_width=width)
    parts = {"weights": weights, "kv_cache": kv_bytes, "activations": activations, "cuda_graphs": graphs}
    return {**parts, "total": sum(parts.values())}


def decode_step_bytes(config: Gemma4Config, dtype: str, batch: int, context_len: int) -> int:
    """Bytes one decode step must read: the weights it touches (experts: the expected distinct ones under
    uniform routing) plus every sequence's KV at `context_len` (sliding layers only their window)."""
    text = config.text
    weights = memory.weight_bytes_per_gpu(config, weight_dtype=dtype, ple_on_device=False)
    read = weights["embedding"] + weights["decoder"]  # the PLE table is gathered row by row: not streamed
    if text.enable_moe_block:
        assert text.num_experts is not None and text.top_k_experts is not None
        touched = 1 - (1 - text.top_k_experts / text.num_experts) ** batch
        read += weights["experts"] * touched
    kv = memory.kv_bytes_per_sequence(text, context_len, dtype)
    return int(read + batch * kv)


def _engine_args(setup: Setup, mode: str, kv_bytes: int, seed: int) -> EngineArgs | None:
    """EngineArgs for `mode`, or None when this engine lacks a switch the mode turns on."""
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    if any(on and name not in known for name, on in MODES[mode].items()):
        return None
    switches = {name: on for name, on in MODES[mode].items() if name in known}
    return EngineArgs(
        block_size=setup.block_size, max_num_seqs=setup.max_num_seqs,
        max_num_batched_tokens=setup.max_num_batched_tokens, max_model_len=setup.max_model_len,
        kv_cache_memory_bytes=kv_bytes, enable_prefix_caching=False, seed=seed, **switches,
    )


def _sync(device: torch.device) -> None:
    backend_of(device).synchronize(device)


def _peak_bytes(device: torch.device) -> int | None:
    return backend_of(device).peak_memory_bytes(device)


def _latency_fields(start: float, first: list[float], gaps: list[float], tokens: int, end: float) -> dict[str, Any]:
    return {
        "output_tok_s": round(tokens / (end - start), 1),
        "ttft_ms_p50": round(1000 * (statistics.median(first) - start), 2),
        "itl_ms_p50": round(1000 * percentile(gaps, 50), 3) if gaps else None,
        "itl_ms_p99": round(1000 * percentile(gaps, 99), 3) if gaps else None,
    }


def run_engine(engine: LLMEngine, prompts: list[list[int]], output_len: int, device: torch.device) -> dict[str, Any]:
    """Submit every prompt at once and step until all finish, timing each request's tokens as they come."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    _sync(device)
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    last: dict[str, float] = {}
    first: dict[str, float] = {}
    gaps: list[float] = []
    tokens = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if not out.delta_token_ids:
                continue
            tokens += len(out.delta_token_ids)
            if out.request_id in last:
                gaps.append(now - last[out.request_id])
            else:
                first[out.request_id] = now
            last[out.request_id] = now
    _sync(device)
    end = time.perf_counter()
    if tokens != len(ids) * output_len:
        raise RuntimeError(f"engine produced {tokens} tokens, expected {len(ids) * output_len}")
    return _latency_fields(start, [first[i] for i in ids], gaps, tokens, end)


def run_transformers(model: Any, prompts: list[list[int]], output_len: int, device: torch.device) -> dict[str, Any]:
    """transformers' greedy `generate` over the batch; a stopping criterion timestamps every step."""
    import transformers

    stamps: list[float] = []

    class Stamp(transformers.StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            stamps.append(time.perf_counter())  # generate has already synced this step (its finished check)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
            do_sample=False, eos_token_id=[], pad_token_id=0,
            stopping_criteria=transformers.StoppingCriteriaList([Stamp()]),
        )
    _sync(device)
    end = time.perf_counter()
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return _latency_fields(start, [stamps[0]] * len(prompts), gaps, tokens, end)


def build_transformers(config: Gemma4Config, dtype: torch.dtype, device: torch.device, seed: int) -> Any:
    """transformers' text-only Gemma 4 with random weights, initialised directly on the device."""
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.Gemma4TextConfig(**config.text.to_hf_dict())
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.eval()


class Report:
    """Rows as they arrive: printed one per line on stderr and the whole report rewritten to `--out`."""

    def __init__(self, header: dict[str, Any], out: Path | None) -> None:
        self.data = {**header, "kernels": [], "rows": [], "skipped": []}
        self.out = out

    def add(self, key: str, item: dict[str, Any]) -> None:
        self.data[key].append(item)
        print(json.dumps(item), file=sys.stderr, flush=True)
        if self.out is not None:
            self.out.write_text(json.dumps(self.data, indent=2))


def _over_budget(report: Report, deadline: float, what: dict[str, str]) -> bool:
    """Past the deadline: record `what` as skipped and say so."""
    if time.perf_counter() <= deadline:
        return False
    report.add("skipped", {**what, "why": "over --budget-s"})
    return True


def _roofline_pct(setup: Setup, dtype: str, batch: int, itl_ms: float | None, bandwidth: float | None) -> float | None:
    if itl_ms is None or bandwidth is None:
        return None
    step = decode_step_bytes(setup.config, dtype, batch, setup.input_len + setup.output_len // 2)
    return float(f"{100 * step / bandwidth / (itl_ms / 1000):.3g}")  # 3 significant digits: tiny CPU runs stay > 0


def run_variant(setup: Setup, args: argparse.Namespace, device: torch.device, report: Report, deadline: float) -> None:
    dtype, kv_width = args.dtype, DTYPES[args.dtype].itemsize
    kv_bytes = kv_pool_bytes(setup, kv_width)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = setup.config.text.vocab_size
    prompts = torch.randint(3, vocab, (setup.max_num_seqs, setup.input_len), generator=gen).tolist()
    model = random_weights_model(setup.config, dtype=DTYPES[dtype], device=device, seed=args.seed)
    for mode in args.modes:
        if _over_budget(report, deadline, {"variant": setup.variant, "mode": mode}):
            continue
        engine_args = _engine_args(setup, mode, kv_bytes, args.seed)
        if engine_args is None:
            report.add("skipped", {"variant": setup.variant, "mode": mode, "why": "EngineArgs lacks the mode's switch"})
            continue
        backend_of(device).reset_peak_memory(device)
        start = time.perf_counter()
        engine = LLMEngine(model, None, engine_args)
        startup = time.perf_counter() - start
        graphs = backend_of(device).cuda_graphs and bool(getattr(engine_args, "cuda_graphs", False))
        predicted = predicted_memory(setup, dtype, kv_bytes, graphs)
        run_engine(engine, prompts[:2], 2, device)  # warm-up: first kernels, allocator
        for batch in setup.batches:
            row = run_engine(engine, prompts[:batch], setup.output_len, device)
            peak = _peak_bytes(device)
            report.add("rows", {
                "variant": setup.variant, "engine": f"ours ({mode})", "batch": batch, "input_len": setup.input_len,
                "output_len": setup.output_len, **row, "startup_s": round(startup, 2),
                "peak_gib": round(peak / 2**30, 2) if peak is not None else None,
                "predicted_gib": round(predicted["total"] / 2**30, 2),
                "roofline_pct": _roofline_pct(setup, dtype, batch, row["itl_ms_p50"], args.bandwidth),
            })
        del engine
        _release(device)
    del model
    _release(device)
    if not args.hf_batches or _over_budget(report, deadline, {"variant": setup.variant, "mode": "transformers"}):
        return
    backend_of(device).reset_peak_memory(device)
    hf = build_transformers(setup.config, DTYPES[dtype], device, args.seed)
    hf.generate(torch.tensor(prompts[:1], device=device), max_new_tokens=2, do_sample=False, pad_token_id=0)
    for batch in args.hf_batches:
        if batch > len(prompts):
            report.add("skipped", {"variant": setup.variant, "mode": "transformers", "batch": batch,
                                   "why": "larger than the batches that fit the device"})
            continue
        row = run_transformers(hf, prompts[:batch], setup.output_len, device)
        peak = _peak_bytes(device)
        report.add("rows", {
            "variant": setup.variant, "engine": "transformers", "batch": batch, "input_len": setup.input_len,
            "output_len": setup.output_len, **row, "peak_gib": round(peak / 2**30, 2) if peak is not None else None,
            "predicted_gib": None,
            "roofline_pct": _roofline_pct(setup, dtype, batch, row["itl_ms_p50"], args.bandwidth),
        })
    del hf
    _release(device)


def _release(device: torch.device) -> None:
    gc.collect()
    backend_of(device).release_cached_memory()


def plan_setup(variant: str, args: argparse.Namespace, device_bytes: int | None) -> tuple[Setup | None, str | None]:
    """The variant's run sized to the device: batches whose predicted memory does not fit are dropped."""
    config = tiny_config(variant, vocab_size=args.vocab_size) if args.tiny else variant_config(variant)
    if not args.tiny and variant == "31b" and device_bytes is not None and device_bytes < BIG_DEVICE_BYTES:
        return None, f"31B needs >= {BIG_DEVICE_BYTES // 2**30} GiB of device memory"
    output_len = args.output_len or OUTPUT_LEN[variant]
    batches = sorted(args.batches)
    while batches:
        setup = Setup(
            variant, config, batches, args.input_len, output_len, args.max_num_batched_tokens, args.block_size
        )
        need = predicted_memory(setup, args.dtype, kv_pool_bytes(setup, DTYPES[args.dtype].itemsize), True)["total"]
        if device_bytes is None or need <= 0.9 * device_bytes:
            return setup, None
        batches = batches[:-1]
    return None, "even batch 1 does not fit the device"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke runs)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--variants", type=str_list, default=["e2b", "e4b", "26b-a4b", "31b"])
    parser.add_argument("--batches", type=int_list, default=[1, 8, 32, 64])
    parser.add_argument("--modes", type=str_list, default=["graphs", "kernels"], help=", ".join(MODES))
    parser.add_argument("--no-micro", action="store_true", help="skip the kernel microbenchmarks")
    parser.add_argument("--hf-batches", type=int_list, default=[1, 32], help="transformers' generate ('' for none)")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=0, help="0: per variant (256 small, 128 26B-A4B, 64 31B)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the --tiny configs")
    parser.add_argument("--budget-s", type=float, default=360.0, help="start nothing new after this many seconds")
    parser.add_argument("--peak-bandwidth-gbs", type=float, help="override the device's peak bandwidth (GB/s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON report, rewritten after every row")
    args = parser.parse_args()
    bad = sorted(set(args.modes) - set(MODES))
    if bad:
        parser.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    began = time.perf_counter()
    device = torch.device(args.device)
    backend = backend_of(device)
    name, device_bytes = backend.device_name(device), backend.device_memory_bytes(device)
    if args.peak_bandwidth_gbs is not None:
        args.bandwidth = args.peak_bandwidth_gbs * 1e9
    else:
        args.bandwidth = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
    report = Report({
        "benchmark": "gpu_decode", "device": name, "machine": machine(), "torch": torch.__version__,
        "dtype": args.dtype, "tiny": args.tiny, "peak_bandwidth_gbs": args.bandwidth and args.bandwidth / 1e9,
        "budget_s": args.budget_s,
    }, args.out)
    deadline = began + args.budget_s
    if not args.no_micro:
        for row in kernel_micro.run(device, DTYPES[args.dtype], args.tiny, args.bandwidth):
            report.add("kernels", row)
    for variant in args.variants:
        if _over_budget(report, deadline, {"variant": variant}):
            continue
        setup, why = plan_setup(variant, args, device_bytes)
        if setup is None:
            report.add("skipped", {"variant": variant, "why": why})
            continue
        run_variant(setup, args, device, report, deadline)
    report.data["elapsed_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(report.data, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(report.data, indent=2))


if __name__ == "__main__":
    main()
