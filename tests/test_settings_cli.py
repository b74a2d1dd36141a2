"""Platform settings and the CLI's config output: validation with clear errors, KubeRay Serve config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gemma4_platform.cli import load_settings, serve_config
from gemma4_platform.grpc_registration import SERVICER_FUNCTION
from gemma4_platform.metrics import MetricsHub, merge_expositions
from gemma4_platform.settings import API_KEYS_ENV, PlatformSettings

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides(tmp_path: Path) -> None:
    file = tmp_path / "settings.yaml"
    file.write_text("engine:\n  max_num_seqs: 8\nreplica:\n  autoscaling: {max_replicas: 3}\n")
    settings = load_settings(str(file), ["replica.num_gpus=1", "model.name=gemma-prod"], checkpoint="/models/x")
    assert settings.engine.max_num_seqs == 8
    assert settings.replica.autoscaling.max_replicas == 3 and settings.replica.num_gpus == 1
    assert settings.model.path == "/models/x" and settings.model.name == "gemma-prod"
    assert settings.model.modalities == "all"  # whatever the checkpoint takes
    chosen = load_settings(None, ["model.modalities=[text, audio]"], None)
    assert chosen.model.modalities == ("text", "audio")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["engine.max_num_seqs=0"], "engine.max_num_seqs: Input should be greater than or equal to 1"),
        (["engine.nonsense=1"], "engine.nonsense: Extra inputs are not permitted"),
        (["replica.autoscaling.min_replicas=3"], "min_replicas \\(3\\) exceeds max_replicas \\(1\\)"),
        (["model.dtype=int4"], "model.dtype: Input should be 'bfloat16', 'float16' or 'float32'"),
        (["server.tls_cert_file=/nope.pem"], "tls_cert_file and tls_key_file must be given together"),
        (["oops"], "--set expects section.field=value"),
        (["engine.tensor_parallel_size=0"], "engine.tensor_parallel_size: Input should be greater than or equal to 1"),
        (["engine.tensor_parallel_size=3"], "tensor_parallel_size=3.*does not divide the attention heads \\(4\\)"),
        (["engine.expert_parallel_size=2"], "expert_parallel_size \\(2\\) must divide tensor_parallel_size \\(1\\)"),
        (
            ["engine.tensor_parallel_size=2", "engine.expert_parallel_size=2"],
            "expert_parallel applies to the MoE variant",
        ),
        (
            ["model.tiny_variant=26b-a4b", "engine.tensor_parallel_size=2", "engine.expert_parallel_size=2",
             "engine.redundant_experts=1"],
            "redundant_experts \\(1\\) must be a multiple of expert_parallel_size \\(2\\)",
        ),
        (["engine.expert_rebalance_interval=10"], "need expert_parallel_size > 1"),
        (
            ["engine.tensor_parallel_size=2", "engine.expert_parallel_size=2", "engine.redundant_experts=2"],
            "expert_parallel applies to the MoE variant",
        ),
        (["engine.expert_rebalance_interval=-1"], "engine.expert_rebalance_interval: Input should be greater"),
        (
            ["engine.tensor_parallel_size=2", "replica.num_gpus=1"],
            "replica.num_gpus \\(1\\) must equal engine.tensor_parallel_size \\(2\\)",
        ),
        (["engine.tensor_parallel_size=2", "model.device=xla"], "'xla' \\(xla\\) has no collectives"),
        (["model.modalities=[text, smell]"], "model.modalities"),
        (["model.modalities=[image, image]"], "model.modalities: Value error, give 'all' or a non-empty list"),
        (["model.modalities=[]"], "model.modalities: Value error, give 'all' or a non-empty list"),
        (["model.modalities=image"], "model.modalities"),
        (["engine.speculative.num_tokens=2"], "engine.speculative: Value error, num_tokens needs model"),
        (["engine.speculative.model=ngram", "engine.speculative.num_tokens=0"],
         "engine.speculative.num_tokens: Input should be greater than or equal to 1"),
        (["engine.speculative.model=' '"], "engine.speculative.model: Value error, give 'ngram'"),
        (["engine.speculative.method=ngram"], "engine.speculative.method: Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_exit_with_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        load_settings(None, overrides, None)


def test_parallel_settings_fit_the_model_they_serve(tmp_path: Path) -> None:
    """MoE layouts the tiny 26B-A4B splits are accepted; a checkpoint's own config is what is checked;
    a checkpoint that is not readable here (a path on the cluster) is left to the replica to check."""
    settings = load_settings(
        None,
        ["model.tiny_variant=26b-a4b", "engine.tensor_parallel_size=4", "engine.expert_parallel_size=2",
         "engine.redundant_experts=2", "engine.expert_rebalance_interval=100"],
        None,
    )
    engine = settings.engine
    assert (engine.tensor_parallel_size, engine.expert_parallel_size, engine.redundant_experts) == (4, 2, 2)
    assert engine.expert_rebalance_interval == 100
    from gemma4.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, variant="e2b", seed=0)
    with pytest.raises(SystemExit, match="expert_parallel applies to the MoE variant"):
        load_settings(None, ["engine.tensor_parallel_size=2", "engine.expert_parallel_size=2"], str(tmp_path))
    remote = load_settings(None, ["engine.tensor_parallel_size=3"], "/models/elsewhere")
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        remote.check_model(PlatformSettings().model_text_config())


def test_speculative_settings_reach_the_engine_args(tmp_path: Path) -> None:
    from gemma4.engine.args import EngineArgs
    from gemma4.tiny import tiny_assistant_config, tiny_config

    ngram = load_settings(None, ["engine.speculative.model=ngram", "engine.speculative.num_tokens=3"], None)
    args = EngineArgs(**ngram.engine.engine_args())
    assert (args.speculative_model, args.num_speculative_tokens) == ("ngram", 3)
    assert args.speculative_tokens(tiny_config("e2b").text) == 3
    off = EngineArgs(**PlatformSettings().engine.engine_args())
    assert off.speculative_model is None and off.speculative_tokens(tiny_config("e2b").text) == 0
    # A drafter readable here must be the served model's own: its backbone width is checked.
    hidden = tiny_config("e2b").text.hidden_size
    config = tiny_assistant_config(tiny_config("e2b")).to_hf_dict()
    assert config["backbone_hidden_size"] == hidden
    (tmp_path / "config.json").write_text(json.dumps(config))
    fits = load_settings(None, [f"engine.speculative.model={tmp_path}"], None)
    assert fits.engine.engine_args()["speculative_model"] == str(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "backbone_hidden_size": hidden + 8}))
    with pytest.raises(SystemExit, match=f"drafts for a model of hidden size {hidden + 8}, but the served"):
        load_settings(None, [f"engine.speculative.model={tmp_path}"], None)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gemma4_text"}))
    with pytest.raises(SystemExit, match="engine.speculative.model: .*expected 'gemma4_assistant'"):
        load_settings(None, [f"engine.speculative.model={tmp_path}"], None)
    # A directory on the cluster is left to the replica.
    assert load_settings(None, ["engine.speculative.model=/models/assistant"], None).engine.speculative.model


def test_api_keys_from_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    assert PlatformSettings().api_key_entries() == []
    keys = tmp_path / "keys"
    keys.write_text("# comment\nalpha name=a priority=0..3\n\nbeta\n")
    monkeypatch.setenv(API_KEYS_ENV, "gamma, delta rate=2\nepsilon")
    settings = PlatformSettings.model_validate({"gateway": {"api_keys_file": str(keys)}})
    assert settings.api_key_entries() == ["alpha name=a priority=0..3", "beta", "gamma", "delta rate=2", "epsilon"]
    with pytest.raises(ValidationError):
        PlatformSettings.model_validate({"gateway": {"max_pending_requests": -1}})


def test_config_command_writes_a_serve_config_that_round_trips() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gemma4_platform.cli", "config", "--set", "replica.num_gpus=1"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
        env={"PYTHONPATH": f"{REPO / 'platform'}:{REPO / 'model'}", "PATH": "/usr/bin:/bin"},
    )
    config = yaml.safe_load(out.stdout)
    app = config["applications"][0]
    assert app["import_path"] == "gemma4_platform.graph:build_app"
    assert config["grpc_options"]["grpc_servicer_functions"] == [SERVICER_FUNCTION]
    assert PlatformSettings.model_validate(app["args"]).replica.num_gpus == 1
    assert config["grpc_options"]["enable_reflection"] is False
    assert serve_config(PlatformSettings())["http_options"]["port"] == 8000
    json.dumps(config)  # a RayService's serveConfigV2 is plain data


def test_config_command_carries_the_parallel_settings() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gemma4_platform.cli", "config", "--set", "engine.tensor_parallel_size=2",
         "--set", "replica.num_gpus=2"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
        env={"PYTHONPATH": f"{REPO / 'platform'}:{REPO / 'model'}", "PATH": "/usr/bin:/bin"},
    )
    engine = yaml.safe_load(out.stdout)["applications"][0]["args"]["engine"]
    assert engine["tensor_parallel_size"] == 2 and engine["expert_parallel_size"] == 1
    assert engine["redundant_experts"] == 0 and engine["expert_rebalance_interval"] == 0
    refused = subprocess.run(
        [sys.executable, "-m", "gemma4_platform.cli", "config", "--set", "engine.tensor_parallel_size=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={"PYTHONPATH": f"{REPO / 'platform'}:{REPO / 'model'}", "PATH": "/usr/bin:/bin"},
    )
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "tensor_parallel_size=3" in refused.stderr and "does not divide the attention heads (4)" in refused.stderr


def test_config_env_prints_the_proxy_environment() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gemma4_platform.cli", "config", "--env", "--set", "limits.max_request_bytes=65536"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
        env={"PYTHONPATH": f"{REPO / 'platform'}:{REPO / 'model'}", "PATH": "/usr/bin:/bin"},
    )
    env = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "gemma4_platform.proxy_setup.configure_proxy"
    assert env["GEMMA4_MAX_REQUEST_BYTES"] == "65536" and env["GEMMA4_GRPC_HOST"] == "127.0.0.1"


def test_serve_refuses_to_expose_without_keys() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gemma4_platform.cli", "serve", "--set", "server.host=0.0.0.0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": f"{REPO / 'platform'}:{REPO / 'model'}", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode != 0
    assert "allow_unauthenticated" in out.stderr and "Traceback" not in out.stderr


def test_metrics_of_several_replicas_merge_into_one_exposition() -> None:
    from gemma4_platform.metrics import ReplicaMetrics, ReplicaReport

    hub = MetricsHub()
    for name, ready in (("r1", True), ("r2", False)):
        metrics = ReplicaMetrics("tiny", name)
        metrics.running.labels(model_name="tiny", replica=name).set(3)
        hub.publish(name, ReplicaReport(metrics.render(), ready=ready, expert_load={0: [1, 2]}))
    assert hub.ready_replicas() == 1 and hub.expert_load() == {"r1": {0: [1, 2]}, "r2": {0: [1, 2]}}
    text = merge_expositions(hub.texts()).decode()
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1
    assert 'vllm:num_requests_running{model_name="tiny",replica="r1"} 3.0' in text
    assert 'vllm:num_requests_running{model_name="tiny",replica="r2"} 3.0' in text
    hub.forget("r1")
    assert len(hub.texts()) == 1
