"""Reading a Hugging Face safetensors checkpoint directory: headers, shard index, integrity.

Only headers are read here (a few KB per file), so a whole checkpoint can be checked, every tensor
named with its file, before any weight is allocated. Tensor data is read later, one tensor at a
time, through `safetensors`' memory map (`read_tensors`): whole, or only the slices a rank of a
multi-device replica holds (`gemma4.parallel.sharding.Shard`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from gemma4.config import CAUSAL_LM_ARCHITECTURE, Gemma4Config

if TYPE_CHECKING:
    import torch

    from gemma4.parallel.sharding import Shard

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Bytes per element of the safetensors dtypes.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = ("BF16", "F16", "F32")

_MAX_HEADER_BYTES = 100 * 1024 * 1024

_TEXT_PREFIX = {CAUSAL_LM_ARCHITECTURE: "model."}
_MULTIMODAL_TEXT_PREFIX = "model.language_model."
TOWERS_PREFIX = "towers."  # our name of the vision/audio towers (`gemma4.towers`)


def checkpoint_name(config: Gemma4Config, model_name: str) -> str:
    """The checkpoint tensor name of one of our parameter/buffer names.

    The text decoder lives under `model.language_model.` in `Gemma4ForConditionalGeneration`
    checkpoints (the official ones) and under `model.` in `Gemma4ForCausalLM` checkpoints; our
    `towers.X` (the media towers) are the checkpoint's `model.X`.
    """
    if model_name.startswith("model."):
        return _TEXT_PREFIX.get(config.architecture, _MULTIMODAL_TEXT_PREFIX) + model_name.removeprefix("model.")
    if model_name.startswith(TOWERS_PREFIX):  # the media towers sit beside the text model
        return "model." + model_name.removeprefix(TOWERS_PREFIX)
    return model_name


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; `problems` lists each one, naming the tensor and file."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        text = "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(text if len(self.problems) == 1 else f"{len(self.problems)} problems:\n  {text}")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives and what its header says."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name!r} in {self.file.name}"


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors header and check that every tensor's bytes are really in the file."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file.name}: truncated file ({size} bytes, no safetensors header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{file.name}: truncated or not a safetensors file (header claims {header_len} bytes, "
                    f"file has {size})"
                )
            header = json.loads(fh.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file.name}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file.name}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    problems: list[str] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"tensor {name!r} in {file.name}: corrupt header entry {info!r}")
            continue
        itemsize = DTYPE_SIZES.get(dtype)
        if itemsize is None:
            problems.append(f"tensor {name!r} in {file.name}: unknown dtype {dtype!r}")
            continue
        if end - begin != math.prod(shape) * itemsize:
            problems.append(
                f"tensor {name!r} in {file.name}: header gives {end - begin} bytes for shape "
                f"{list(shape)} of {dtype}"
            )
        elif data_start + end > size:
            problems.append(
                f"tensor {name!r} in {file.name}: truncated file (tensor ends at byte {data_start + end}, "
                f"file has {size})"
            )
        entries[name] = TensorEntry(name, file, dtype, shape)
    if problems:
        raise CheckpointError(problems)
    return entries


def index_checkpoint(directory: str | Path) -> dict[str, TensorEntry]:
    """All tensors of a checkpoint directory (single file or sharded with an index), headers checked."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        return _index_shards(index_path)
    single = directory / SINGLE_FILE
    if single.is_file():
        return read_header(single)
    raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _index_shards(index_path: Path) -> dict[str, TensorEntry]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path.name}: not a valid shard index ({exc!r})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path.name}: weight_map must be an object")
    problems: list[str] = []
    headers: dict[str, dict[str, TensorEntry]] = {}
    for file_name in sorted(set(weight_map.values())):
        shard = index_path.parent / file_name
        if not shard.is_file():
            problems.append(f"{file_name}: listed in {index_path.name} but not found")
            continue
        try:
            headers[file_name] = read_header(shard)
        except CheckpointError as exc:
            problems.extend(exc.problems)
    entries: dict[str, TensorEntry] = {}
    for name, file_name in weight_map.items():
        if file_name not in headers:
            continue
        entry = headers[file_name].get(name)
        if entry is None:
            problems.append(f"tensor {name!r}: {index_path.name} places it in {file_name}, which does not contain it")
        else:
            entries[name] = entry
    if problems:
        raise CheckpointError(problems)
    return entries


def read_tensors(
    entries: list[TensorEntry], shards: Mapping[str, "Shard"] | None = None
) -> Iterator[tuple[TensorEntry, "torch.Tensor"]]:
    """Yield each tensor's data, one at a time, memory-mapped from its file (grouped by file).

    `shards` (by tensor name) gives the part of a tensor to read, through `get_slice`; a tensor
    without one is read whole.
    """
    from safetensors import safe_open

    by_file: dict[Path, list[TensorEntry]] = {}
    for entry in entries:
        by_file.setdefault(entry.file, []).append(entry)
    for file, group in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for entry in group:
                shard = (shards or {}).get(entry.name)
                if shard is None or shard.covers(entry.shape):
                    yield entry, handle.get_tensor(entry.name)
                else:
                    yield entry, _read_shard(handle.get_slice(entry.name), shard)


def _read_shard(view: Any, shard: "Shard") -> "torch.Tensor":
    """The shard's blocks read from a safetensors slice view and concatenated along each dimension."""
    import torch

    def block(prefix: tuple[slice, ...]) -> torch.Tensor:
        dim = len(prefix)
        if dim == len(shard.ranges):
            return view[prefix]
        parts = [block((*prefix, slice(start, stop))) for start, stop in shard.ranges[dim]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    return block(())
