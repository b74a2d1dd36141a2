"""Media through the engine: greedy outputs of batches mixing text, images and audio equal transformers'
greedy generation; media items are never split across steps and stay within the encoder budget; the
encoder cache and the prefix cache reuse the same content and never mix different content."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma4.engine import LLM, SamplingParams
from gemma4.media.audio import audio_features
from gemma4.media.image import image_features
from gemma4.media.inputs import MediaFeatures, MediaPlaceholder, MultimodalPrompt, VideoFeatures, encoder_items
from gemma4.media.prompt import expand_prompt
from multimodal_reference import (
    IDS,
    marker_prompt,
    random_image,
    random_video,
    reference_inputs,
    saved_references,
    tone,
)

NEW_TOKENS = 5
ENGINE = dict(block_size=4, max_num_seqs=4, max_num_batched_tokens=96, max_model_len=512)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    return saved_references(tmp_path_factory.mktemp("references"))


def _images() -> list[MediaFeatures]:
    return [image_features(random_image(96, 200, 0), 70), image_features(random_image(150, 150, 1), 70)]


BATCHES = {
    # PLE and audio; an image and a clip in one prompt; video frames; 10 ms of audio (no soft token).
    "e2b": lambda images, clip, video: [
        [], [images[0]], [clip], [images[1], clip], [video], [audio_features(tone(0.01, 440.0))]
    ],
    # Bidirectional image blocks (and one per video frame) on the sliding layers; two images need two chunks.
    "31b": lambda images, clip, video: [[], [images[0]], [images[0], images[1]], [video, images[1]]],
}


def _reference_greedy(ref: torch.nn.Module, prompt: MultimodalPrompt, items=None) -> list[int]:
    """transformers' greedy continuation; `items` as given to `_prompt` (default: the prompt's own media)."""
    inputs = reference_inputs(prompt.token_ids, items or [p.features for p in prompt.media])
    with torch.no_grad():
        out = ref.generate(
            **inputs, attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=NEW_TOKENS,
            do_sample=False, eos_token_id=[], pad_token_id=0,
        )
    return out[0, len(prompt.token_ids):].tolist()


def _prompt(items: list[MediaFeatures | VideoFeatures], seed: int) -> MultimodalPrompt:
    return expand_prompt(marker_prompt(items, seed), encoder_items(items), IDS)


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _mixed_batch(variant: str) -> list[list[MediaFeatures | VideoFeatures]]:
    return BATCHES[variant](_images(), audio_features(tone(1.37, 440.0)), random_video(3, 90, 160, 5))


# (variant, kernels, tensor-parallel ranks, which prompts of the batch): the Triton attention kernel's
# spans (through the interpreter: one prompt of two images), and towers replicated on the ranks of a
# two-rank replica over gloo.
RUNS = {"e2b": ("e2b", "torch", 1, None), "31b": ("31b", "torch", 1, None), "31b-triton": ("31b", "triton", 1, [2]),
        "e2b-tp2": ("e2b", "torch", 2, None)}


@pytest.mark.parametrize("run", list(RUNS))
def test_greedy_outputs_of_a_mixed_batch_equal_transformers(checkpoints, run: str) -> None:
    variant, kernels, ranks, chosen = RUNS[run]
    ref, path = checkpoints[variant]
    batch = _mixed_batch(variant)
    prompts = [_prompt(items, seed=10 + i) for i, items in enumerate(batch)]
    if chosen is not None:
        batch, prompts = [batch[i] for i in chosen], [prompts[i] for i in chosen]
    llm = LLM(path, dtype=torch.float32, kernels=kernels, tensor_parallel_size=ranks, **ENGINE)
    try:
        outputs = llm.generate(prompts, GREEDY)
        stats = llm.engine.stats()
    finally:
        llm.shutdown()
    assert [o.token_ids for o in outputs] == [_reference_greedy(ref, p, items) for p, items in zip(prompts, batch)]
    for output, prompt in zip(outputs, prompts):
        usage = output.usage
        modalities = ("image", "audio", "video")
        counts = {m: sum(p.length for p in prompt.media if p.features.modality == m) for m in modalities}
        assert (usage.image_tokens, usage.audio_tokens, usage.video_tokens) == tuple(counts.values())
    assert any(o.usage.video_tokens for o in outputs) or chosen is not None
    assert stats.media_requests_total == sum(1 for p in prompts if p.media)
    assert stats.encoder_seconds_total > 0


def test_steps_never_split_an_item_and_keep_to_the_encoder_budget(checkpoints) -> None:
    _, path = checkpoints["31b"]
    llm = LLM(path, dtype=torch.float32, **ENGINE, max_num_encoder_tokens=80)
    images = _images()
    prompts = [_prompt([images[0], images[1]], seed=3), _prompt([images[1]], seed=4)]
    engine = llm.engine
    for prompt in prompts:
        engine.add_request(prompt, GREEDY)
    schedule = engine.scheduler.schedule
    seen: list[tuple[int, int]] = []

    def checked_schedule():
        batch = schedule()
        encoded = sum(r.media[i].length for r, i in batch.encoder_inputs)
        assert encoded <= 80
        for request, n in zip(batch.requests, batch.num_tokens):
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            for item in request.media:
                assert not (item.offset < end < item.end), "a chunk ended inside a media item"
            seen.append((start, end))
        return batch

    engine.scheduler.schedule = checked_schedule
    while engine.has_unfinished_requests():
        engine.step()
    assert len(seen) > 2 * NEW_TOKENS  # the prompts took several chunks


def test_the_same_image_reuses_kv_and_encoder_outputs_and_different_images_never_share(checkpoints) -> None:
    ref, path = checkpoints["e2b"]
    llm = LLM(path, dtype=torch.float32, **ENGINE)
    engine = llm.engine
    image, other = image_features(random_image(96, 200, 0), 70), image_features(random_image(96, 200, 5), 70)
    assert image.num_tokens == other.num_tokens and image.content_hash != other.content_hash
    first = _prompt([image], seed=1)
    (again,) = llm.generate([first], GREEDY)
    (repeat,) = llm.generate([first], GREEDY)
    assert repeat.token_ids == again.token_ids == _reference_greedy(ref, first)
    assert repeat.usage.cached_prompt_tokens > first.media[0].end  # the image's KV came from the prefix cache
    encoded = engine.stats().encoder_items_total["image"]
    assert encoded == 1

    # The same image after different text: no prefix to share, but its soft tokens are cached.
    moved = _prompt([image], seed=2)
    hits = engine.stats().encoder_cache_hits_total
    (out,) = llm.generate([moved], GREEDY)
    assert out.token_ids == _reference_greedy(ref, moved)
    assert engine.stats().encoder_cache_hits_total == hits + 1
    assert engine.stats().encoder_items_total["image"] == encoded

    # A different image of the same size in the same text: identical token ids, but no KV is shared past it.
    swapped = expand_prompt(marker_prompt([other], seed=1), [other], IDS)
    assert swapped.token_ids == first.token_ids
    (out,) = llm.generate([swapped], GREEDY)
    assert out.usage.cached_prompt_tokens <= swapped.media[0].offset
    assert out.token_ids == _reference_greedy(ref, swapped)
    assert engine.stats().encoder_items_total["image"] == encoded + 1


def test_malformed_media_is_refused_before_anything_runs(checkpoints) -> None:
    _, path = checkpoints["31b"]
    llm = LLM(path, dtype=torch.float32, **ENGINE)
    image = _images()[0]
    good = _prompt([image], seed=1)
    placed = good.media[0]
    cases = {
        "no encoder for audio": MultimodalPrompt(
            good.token_ids, (MediaPlaceholder(placed.offset, audio_features(tone(0.5, 200.0))),)
        ),
        "must hold the image placeholder": MultimodalPrompt(
            good.token_ids, (MediaPlaceholder(placed.offset - 1, image),)
        ),
        "outside every media item": MultimodalPrompt(good.token_ids, ()),
        "its features give": MultimodalPrompt(
            good.token_ids,
            (MediaPlaceholder(placed.offset, MediaFeatures(
                "image", image.num_tokens + 1, image.content_hash, image.pixel_values, image.position_ids
            )),),
        ),
    }
    for message, prompt in cases.items():
        with pytest.raises(ValueError, match=message):
            llm.generate([prompt], GREEDY)
    # A chunk of the item's length must fit beside a decode of every other sequence the engine may run.
    tight = LLM(path, dtype=torch.float32, **{**ENGINE, "max_num_batched_tokens": image.num_tokens + 2})
    with pytest.raises(ValueError, match=r"prompt.media\[0\].*exceeds what one step"):
        tight.generate([good], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_a_prefix_hit_that_ends_inside_an_image_computes_the_rest_of_it_exactly(checkpoints) -> None:
    """The cached blocks of an image's first part were computed with the whole image in one step; the rest
    is computed in one chunk from the cached soft tokens' slice, its block still bidirectional."""
    ref, path = checkpoints["31b"]
    llm = LLM(path, dtype=torch.float32, **ENGINE)
    engine = llm.engine
    prompt = _prompt([_images()[0]], seed=6)
    (first,) = llm.generate([prompt], GREEDY)
    item = prompt.media[0]
    inside = (item.offset // 4 + 3) * 4  # a block boundary well inside the image
    assert item.offset < inside < item.end
    cached = engine.kv.find_cached_prefix
    engine.kv.find_cached_prefix = lambda tokens, salt=None, media=(): min(cached(tokens, salt, media), inside)
    hits = engine.stats().encoder_cache_hits_total
    (again,) = llm.generate([prompt], GREEDY)
    assert again.usage.cached_prompt_tokens == inside
    assert again.token_ids == first.token_ids == _reference_greedy(ref, prompt)
    assert engine.stats().encoder_cache_hits_total == hits + 1
