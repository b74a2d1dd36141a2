"""Soft tokens in the text model, exact to transformers: placeholders embedded as <pad>, encoder outputs
scattered into their rows unscaled, PLE fed the pad ids and the merged embeddings, and bidirectional
blocks on the sliding layers of the vision-bidirectional variants (`mm_token_type_ids`)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import gemma4
from gemma4.modeling import SoftTokens
from reference_models import MM_TOKEN_IDS, build_reference, save_reference

SEQ_LEN = 40
IMAGE, VIDEO = MM_TOKEN_IDS["image_token_id"], MM_TOKEN_IDS["video_token_id"]
BOI, EOI = MM_TOKEN_IDS["boi_token_id"], MM_TOKEN_IDS["eoi_token_id"]
# (start, length, kind) of each media run per batch row: kind 1 image, 2 video frame (the reference's types).
RUNS = [[(3, 4, 1), (12, 6, 2), (19, 6, 2)], [(8, 9, 1)]]


def _inputs(hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (len(RUNS), SEQ_LEN), generator=gen)
    types = torch.zeros_like(ids)
    images, frames = [], []
    for row, runs in enumerate(RUNS):
        for start, length, kind in runs:
            ids[row, start - 1], ids[row, start + length] = BOI, EOI
            ids[row, start : start + length] = IMAGE if kind == 1 else VIDEO
            types[row, start : start + length] = kind
            (images if kind == 1 else frames).append(torch.randn(length, hidden, generator=gen))
    return ids, types, images, frames


def _ours(ids: torch.Tensor, types: torch.Tensor, images: list[torch.Tensor], frames: list[torch.Tensor]):
    """Our inputs for the same batch: flat rows per item in the reference's order (images, then video), and
    span ids numbering each run."""
    flat = types.reshape(-1)
    rows = torch.cat([torch.nonzero(flat == 1).flatten(), torch.nonzero(flat == 2).flatten()])
    embeds = torch.cat(images + frames)
    span_ids = torch.full_like(ids, -1)
    span = 0
    for row, runs in enumerate(RUNS):
        for start, length, _ in runs:
            span_ids[row, start : start + length] = span
            span += 1
    return SoftTokens(rows, embeds), span_ids


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    out = {}
    for i, variant in enumerate(("e2b", "31b")):
        ref = build_reference(variant, multimodal=True, seed=10 + i)
        with torch.no_grad():  # a nonzero <pad> row, so that embedding placeholders as <pad> shows
            ref.model.language_model.embed_tokens.weight[0].normal_()
        out[variant] = (ref, save_reference(ref, tmp_path_factory.mktemp(variant), sharded=False))
    return out


@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_scattered_soft_tokens_match_transformers(models, variant: str) -> None:
    ref, path = models[variant]
    model = gemma4.load_model(path, dtype=torch.float32)
    ids, types, images, frames = _inputs(model.text_config.hidden_size, seed=3)
    soft, span_ids = _ours(ids, types, images, frames)
    encoded = {"image": SimpleNamespace(pooler_output=images), "video": SimpleNamespace(pooler_output=frames)}
    with torch.no_grad():
        expected = ref(input_ids=ids, mm_token_type_ids=types, mm_encoder_outputs=encoded).logits
        actual = model(ids, soft_tokens=soft, span_ids=span_ids)
        causal = model(ids, soft_tokens=soft)
        no_media = model(ids)
    assert expected.std() > 0.1
    assert (actual - expected).abs().max().item() <= 2e-4
    # Every term matters: without the soft tokens the logits differ, and so they do without the blocks
    # exactly where the model is bidirectional.
    assert (no_media - expected).abs().max().item() > 1e-2
    if model.text_config.use_bidirectional_attention == "vision":
        assert (causal - expected).abs().max().item() > 1e-3
    else:
        assert torch.equal(causal, actual)
