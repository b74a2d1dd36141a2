"""Checkpoint loading failures: each names the tensor and file, and nothing is half-loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma4
import gemma4.loader
from gemma4.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError
from gemma4.config import ConfigError
from reference_models import build_reference, save_reference

PREFIX = "model.language_model."


@pytest.fixture(scope="module")
def reference_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An E2B-shaped multimodal checkpoint (single file and sharded) and a text-only one."""
    mm = build_reference("e2b", multimodal=True)
    text = build_reference("e2b", multimodal=False)
    return {
        "single": save_reference(mm, tmp_path_factory.mktemp("single"), sharded=False),
        "sharded": save_reference(mm, tmp_path_factory.mktemp("sharded"), sharded=True),
        "text": save_reference(text, tmp_path_factory.mktemp("text"), sharded=False),
    }


@pytest.fixture
def checkpoint(reference_dirs: dict[str, Path], tmp_path: Path):
    """Copy a reference checkpoint so a test can damage it."""

    def copy(kind: str = "single") -> Path:
        target = tmp_path / kind
        shutil.copytree(reference_dirs[kind], target)
        return target

    return copy


def rewrite(path: Path, edit) -> None:
    """Load model.safetensors, let `edit` change the dict, write it back."""
    tensors = load_file(path / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if any tensor data is read: problems must be found from the headers, before loading."""

    def forbidden(entries):
        raise AssertionError("tensor data was read before the checkpoint was validated")

    monkeypatch.setattr(gemma4.loader, "read_tensors", forbidden)


def test_missing_tensor(checkpoint, no_tensor_reads) -> None:
    path = checkpoint()
    name = PREFIX + "layers.3.mlp.up_proj.weight"
    rewrite(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}' \\(expected shape \\[96, 64\\]\\)"):
        gemma4.load_model(path)


def test_unexpected_tensor(checkpoint, no_tensor_reads) -> None:
    path = checkpoint()
    name = PREFIX + "layers.0.self_attn.v_norm.weight"
    rewrite(path, lambda t: t.__setitem__(name, torch.ones(32)))
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{name}' in model.safetensors"):
        gemma4.load_model(path)


def test_wrong_shape(checkpoint, no_tensor_reads) -> None:
    path = checkpoint()
    name = PREFIX + "layers.1.self_attn.q_proj.weight"
    rewrite(path, lambda t: t.__setitem__(name, t[name].T.contiguous()))
    with pytest.raises(CheckpointError, match=f"'{name}' in model.safetensors has shape \\[64, 128\\], expected \\[128, 64\\]"):
        gemma4.load_model(path)


def test_wrong_dtype(checkpoint, no_tensor_reads) -> None:
    path = checkpoint()
    name = PREFIX + "norm.weight"
    rewrite(path, lambda t: t.__setitem__(name, t[name].to(torch.int32)))
    with pytest.raises(CheckpointError, match=f"'{name}' in model.safetensors has dtype I32"):
        gemma4.load_model(path)


def test_unknown_model_type(checkpoint) -> None:
    path = checkpoint()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "gemma3"}))
    with pytest.raises(ConfigError, match="config.json: unknown model_type 'gemma3'"):
        gemma4.load_model(path)


def test_truncated_file(checkpoint, no_tensor_reads) -> None:
    path = checkpoint()
    file = path / SINGLE_FILE
    data = file.read_bytes()
    file.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="tensor '.+' in model.safetensors: truncated file"):
        gemma4.load_model(path)
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated file"):
        gemma4.load_model(path)


def test_missing_shard_and_wrong_index(checkpoint, no_tensor_reads) -> None:
    path = checkpoint("sharded")
    index = json.loads((path / INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (path / shard).rename(path / "moved.safetensors")
    with pytest.raises(CheckpointError, match=f"{shard}: listed in {INDEX_FILE} but not found"):
        gemma4.load_model(path)

    (path / "moved.safetensors").rename(path / shard)
    name = PREFIX + "norm.weight"
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = wrong
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"tensor '{name}': {INDEX_FILE} places it in {wrong}, which does not contain it"):
        gemma4.load_model(path)


def test_no_weights_at_all(checkpoint) -> None:
    path = checkpoint()
    (path / SINGLE_FILE).unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        gemma4.load_model(path)


def test_all_problems_are_reported_together(checkpoint, no_tensor_reads) -> None:
    path = checkpoint()

    def damage(t: dict) -> None:
        t.pop(PREFIX + "layers.0.layer_scalar")
        t[PREFIX + "bogus"] = torch.zeros(1)

    rewrite(path, damage)
    with pytest.raises(CheckpointError) as info:
        gemma4.load_model(path)
    assert len(info.value.problems) == 2
    assert "layer_scalar" in str(info.value) and "bogus" in str(info.value)


def test_kv_sharing_layers_unused_projections_are_ignored(checkpoint, reference_dirs) -> None:
    """Official E2B/E4B files still carry K/V projections for the KV-sharing layers: ignore exactly those."""
    path = checkpoint()
    shared = [6, 7, 8, 9]  # the tiny E2B-shaped config shares KV in its last four layers

    def add_unused(t: dict) -> None:
        for i in shared:
            width = 64 if i == 9 else 32
            t[PREFIX + f"layers.{i}.self_attn.k_proj.weight"] = torch.randn(width, 64)
            t[PREFIX + f"layers.{i}.self_attn.v_proj.weight"] = torch.randn(width, 64)
            t[PREFIX + f"layers.{i}.self_attn.k_norm.weight"] = torch.randn(width)

    rewrite(path, add_unused)
    ids = torch.randint(3, 400, (1, 20))
    with torch.no_grad():
        expected = gemma4.load_model(reference_dirs["single"], dtype=torch.float32)(ids)
        actual = gemma4.load_model(path, dtype=torch.float32)(ids)
    assert torch.equal(actual, expected)

    rewrite(path, lambda t: t.__setitem__(PREFIX + "layers.5.self_attn.k_proj.bias", torch.zeros(32)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.language_model.layers.5.self_attn.k_proj.bias'"):
        gemma4.load_model(path)


def test_tower_tensors_only_where_the_config_declares_towers(checkpoint) -> None:
    path = checkpoint("text")
    rewrite(path, lambda t: t.__setitem__("model.vision_tower.patch_embedder.input_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.vision_tower.patch_embedder.input_proj.weight'"):
        gemma4.load_model(path)


def test_dtype_and_device_of_the_loaded_model(reference_dirs) -> None:
    model = gemma4.load_model(reference_dirs["sharded"], dtype=torch.float16)
    assert {t.dtype for t in model.state_dict().values()} == {torch.float16}
    assert model.model.rotary["full_attention"].inv_freq.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
