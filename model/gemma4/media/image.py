"""Image decoding and preprocessing, exact to transformers' `Gemma4ImageProcessorPil`.

Pillow and numpy only (the torchvision backend differs by up to two grey levels and its wheel does
not load next to the CPU torch build). Output is one unpadded `MediaFeatures`: the encoder pads
batches itself, so the prompt and the cache see only real patches.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image

from gemma4.media.inputs import MediaError, MediaFeatures, Modality, content_digest

ALLOWED_BUDGETS: tuple[int, ...] = (70, 140, 280, 560, 1120)
DEFAULT_IMAGE_BUDGET = 280

# Pillow's format names for what clients may send; anything else is refused before decoding.
_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF")


def decode_image(data: bytes, *, where: str, max_pixels: int) -> Image.Image:
    """Decode PNG/JPEG/WebP/GIF (first frame) bytes to RGB, compositing transparency onto white.

    The size is checked from the header before any pixel is decoded, so a small file that claims a
    huge canvas (a decompression bomb) costs nothing.
    """
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check replaces Pillow's warning-level bomb heuristic.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(_FORMATS))
    except Image.DecompressionBombError as exc:
        raise MediaError(where, f"image is too large (over the limit of {max_pixels} pixels): {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise MediaError(where, f"not a decodable image (accepted: PNG, JPEG, WebP, GIF): {exc}") from exc
    if image.format not in _FORMATS:
        raise MediaError(where, f"unsupported image format {image.format!r} (accepted: PNG, JPEG, WebP, GIF)")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise MediaError(where, f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise MediaError(where, f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    try:
        image.seek(0)
        image.load()
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise MediaError(where, f"corrupt or truncated {image.format} image: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the reference converts: any alpha band or palette transparency is composited on white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def target_size(height: int, width: int, budget: int, patch: int = 16, kernel: int = 3) -> tuple[int, int]:
    """The resized (height, width): the aspect-preserving size with at most `budget * kernel^2` patches,
    each side a multiple of `kernel * patch` (images are upscaled as well as downscaled).

    A side that rounds to zero becomes one pooling cell and the other takes the whole ratio, capped
    at `budget` cells. Raises ValueError when both sides round to zero.
    """
    side = kernel * patch
    factor = math.sqrt(budget * kernel**2 * patch**2 / (height * width))
    out_h = math.floor(factor * height / side) * side
    out_w = math.floor(factor * width / side) * side
    if out_h == 0 and out_w == 0:
        raise ValueError(f"a {height}x{width} image resizes to 0x0 at budget {budget}")
    longest = budget * side
    if out_h == 0:
        out_h, out_w = side, min(math.floor(width / height) * side, longest)
    elif out_w == 0:
        out_h, out_w = min(math.floor(height / width) * side, longest), side
    return out_h, out_w


def image_features(
    image: Image.Image,
    budget: int = DEFAULT_IMAGE_BUDGET,
    *,
    modality: Modality = "image",
    patch: int = 16,
    kernel: int = 3,
) -> MediaFeatures:
    """Resize (bicubic), rescale to [0, 1] and patchify one RGB image, without padding.

    A budget outside ALLOWED_BUDGETS is a MediaError whose `where` is the modality (the caller's
    request parameter, not one media part).
    """
    if budget not in ALLOWED_BUDGETS:
        raise MediaError(modality, f"image budget {budget} is not one of {ALLOWED_BUDGETS}")
    if image.mode != "RGB":
        image = _to_rgb(image)
    # An allowed budget always leaves a side of at least one pooling cell, so target_size cannot fail here.
    out_h, out_w = target_size(image.height, image.width, budget, patch, kernel)
    if (out_h, out_w) != (image.height, image.width):
        image = image.resize((out_w, out_h), resample=Image.Resampling.BICUBIC)
    # The reference rescales in float64 and casts once: the same rounding gives bit-equal values.
    pixels = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    rows, cols = out_h // patch, out_w // patch
    # [H, W, C] -> [rows, patch, cols, patch, C] -> [rows, cols, patch_row, patch_col, C]
    patches = pixels.reshape(rows, patch, cols, patch, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    grid_y, grid_x = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
    positions = np.stack([grid_x, grid_y], axis=-1)
    pixel_values = torch.from_numpy(np.ascontiguousarray(patches))
    position_ids = torch.from_numpy(positions)
    return MediaFeatures(
        modality=modality,
        num_tokens=rows * cols // kernel**2,
        content_hash=content_digest(modality, pixel_values, position_ids),
        pixel_values=pixel_values,
        position_ids=position_ids,
    )
