"""The benchmark scripts run (tiny settings) and report what RESULTS.md records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_json(args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a benchmark script with the repository's model package first; its stdout is one JSON report."""
    env = env or {**os.environ, "PYTHONPATH": str(REPO / "model")}
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("variant", ["e2b", "26b-a4b"])
def test_offline_throughput_script(variant: str) -> None:
    result = _run_json([
        "benchmarks/offline_throughput.py", "--variant", variant, "--tiny", "--dtype", "fp32",
        "--num-prompts", "3", "--input-len", "20", "--output-len", "4",
    ])
    assert result["num_prompts"] == 3 and result["output_tokens_per_s"] > 0
    assert result["variant"] == f"{variant} (tiny)"


def test_platform_load_script() -> None:
    cmd = [
        sys.executable, "benchmarks/platform_load.py", "--concurrency", "2", "--requests-per-level", "3",
        "--input-len", "8", "--output-len", "3",
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'model'}:{REPO / 'platform'}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout[out.stdout.index("{\n"):])
    for side in ("engine", "stack"):
        assert report[side][0]["requests"] == 3 and report[side][0]["output_tokens_per_s"] > 0


def test_host_overhead_script() -> None:
    report = _run_json([
        "benchmarks/host_overhead.py", "--variants", "e2b,26b-a4b", "--running", "1,3", "--steps", "3",
        "--warmup", "1", "--max-num-seqs", "4", "--vocab-size", "512", "--threads", "1",
        "--prompt-len", "12", "--max-num-batched-tokens", "16",  # 3 x 12 prompt tokens: prefill over 3 steps
    ])
    rows = report["results"]
    assert [(r["variant"], r["running"]) for r in rows] == [
        ("e2b (tiny)", 1), ("e2b (tiny)", 3), ("26b-a4b (tiny)", 1), ("26b-a4b (tiny)", 3)
    ]
    for row in rows:
        assert row["steps"] == 3
        assert row["forward_ms"]["median"] > 0 and row["host_ms"]["median"] > 0
        assert row["host_ms"]["median"] < row["step_ms"]["median"]  # the forward was subtracted
        assert row["host_ms"]["p90"] >= row["host_ms"]["median"]
    assert [r["goal_host_ms"] for r in rows[:2]] == [0.3, None]


def test_cpu_engines_script_without_vllm(tmp_path: Path) -> None:
    venv = tmp_path / "no-vllm-venv"
    report = _run_json([
        "benchmarks/cpu_engines.py", "--engines", "ours,transformers", "--variants", "26b-a4b", "--batches", "1,2",
        "--min-prompts", "2", "--input-len", "12", "--output-len", "3", "--vocab-size", "512", "--threads", "1",
        "--workdir", str(tmp_path / "work"), "--vllm-venv", str(venv),
    ])
    assert not venv.exists()  # vLLM was not asked for, so its venv was not built
    (variant,) = report["variants"]
    assert variant["variant"] == "26b-a4b" and list(variant["engines"]) == ["ours", "transformers"]
    for run in variant["engines"].values():
        assert [(r["batch"], r["prompts"], r["output_tokens"]) for r in run["rows"]] == [(1, 2, 6), (2, 2, 6)]
        assert all(r["output_tok_s"] > 0 for r in run["rows"]) and run["startup_s"] > 0
    assert variant["agreement"] == {"transformers vs ours": "4/4"}  # fp32 greedy: same tokens
    assert "| 26b-a4b | transformers |" in report["markdown"]


def test_gpu_decode_script_on_cpu() -> None:
    """Tiny settings on the CPU: the kernels (microbenchmarks and the `kernels` mode) run through the interpreter."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "model"), "TRITON_INTERPRET": "1"}
    report = _run_json([
        "benchmarks/gpu_decode.py", "--device", "cpu", "--tiny", "--dtype", "fp32", "--variants", "e2b",
        "--batches", "1,2", "--input-len", "16", "--output-len", "3", "--hf-batches", "1",
        "--peak-bandwidth-gbs", "50", "--vocab-size", "512",
    ], env)
    rows = {(r["engine"], r["batch"]): r for r in report["rows"]}
    assert report["skipped"] == []
    assert set(rows) == {(f"ours ({m})", b) for m in ("graphs", "kernels") for b in (1, 2)} | {("transformers", 1)}
    for row in rows.values():
        assert row["output_len"] == 3 and row["output_tok_s"] > 0 and row["ttft_ms_p50"] > 0
        assert 0 < row["itl_ms_p50"] <= row["itl_ms_p99"] and row["roofline_pct"] > 0
        assert row["peak_gib"] is None  # no CUDA memory on the CPU
    assert all(rows[k]["predicted_gib"] > 0 for k in rows if k[0] != "transformers")
    kernels = report["kernels"]
    assert {r["kernel"] for r in kernels} == {"attention", "moe", "residual_rms_norm", "sample_draw"}
    for row in kernels:
        assert row["triton_us"] > 0 and row["torch_us"] > 0 and row["bytes_read"] > 0 and row["peak_pct"] > 0
    assert report["peak_bandwidth_gbs"] == 50 and report["device"] == "cpu"


def test_collectives_script() -> None:
    """Two gloo ranks time the step's all-reduces and the logits all-gather at the real models' shapes."""
    result = _run_json([
        "benchmarks/collectives.py", "--world-sizes", "2", "--batches", "1", "--iters", "2",
    ], env={**os.environ, "PYTHONPATH": f"{REPO / 'model'}:{REPO / 'benchmarks'}"})
    ops = {(r["op"], r["model"], r["dtype"]) for r in result["results"]}
    assert ("all_gather", "logits", "float32") in ops and ("all_reduce", "31b", "bfloat16") in ops
    assert all(r["world_size"] == 2 and r["median_us"] > 0 for r in result["results"])


def test_spec_decode_script() -> None:
    """Rows per method and batch: speculation off, n-gram and a tiny random assistant drafter."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'model'}:{REPO / 'benchmarks'}"}
    out = subprocess.run([
        sys.executable, "benchmarks/spec_decode.py", "--variants", "e2b", "--methods", "off,ngram,assistant",
        "--batches", "1,2", "--input-len", "24", "--output-len", "6", "--repeat-period", "8",
    ], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["method"], r["batch"]) for r in rows] == [
        (method, batch) for method in ("off", "ngram", "assistant") for batch in (1, 2)
    ]
    for row in rows:
        assert row["output_tokens"] == 6 * row["batch"] and row["output_tok_s"] > 0
        if row["method"] == "off":
            assert (row["num_speculative_tokens"], row["drafts"], row["acceptance_length"]) == (0, 0, None)
            assert row["speedup"] == 1.0
        else:  # E2B's default k, drafted at every decode step for the assistant
            assert row["num_speculative_tokens"] == 2
            assert row["acceptance_length"] >= 1 if row["drafts"] else row["acceptance_length"] is None
    assert all(r["drafts"] > 0 for r in rows if r["method"] == "assistant")
    bad = subprocess.run([sys.executable, "benchmarks/spec_decode.py", "--methods", "eagle"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--methods: unknown eagle" in bad.stderr


def test_structured_output_script() -> None:
    """Plain and grammar-constrained decode steps at a batch of running requests, and the mask fill's cost."""
    result = _run_json([
        "benchmarks/structured_output.py", "--running", "2", "--steps", "3", "--warmup", "1", "--vocab-size", "1024",
    ], env={**os.environ, "PYTHONPATH": f"{REPO / 'model'}:{REPO / 'benchmarks'}"})
    [row] = result["results"]
    assert (row["running"], row["steps"]) == (2, 3)
    assert row["plain_step_ms"] > 0 and row["structured_step_ms"] > 0 and row["mask_fill_ms_per_step"] > 0
