"""The four real-size variants on the meta device: exact tensor names, shapes and parameter counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma4.config import variant_config
from gemma4.loader import checkpoint_name
from gemma4.modeling import Gemma4ForCausalLM

KEYS = Path(__file__).parent / "data" / "checkpoint-keys"
# Text parameters (tied head excluded), in billions, as the architecture reference gives them.
PUBLISHED_BILLIONS = {"E2B": 4.63, "E4B": 7.46, "26B-A4B": 25.23, "31B": 30.70}


def reference_keys(variant: str) -> dict[str, tuple[int, ...]]:
    """Tensor names/shapes of the real checkpoint (text decoder, towers and projectors), as transformers
    builds it from the real config (the tied LM head is not a tensor of its own)."""
    out = {}
    for file in (f"{variant}.txt", f"{variant}.towers.txt"):
        for line in (KEYS / file).read_text().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, shape = line.split("\t")
            if name.startswith("model."):
                out[name] = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
    return out


@pytest.mark.parametrize("variant", list(PUBLISHED_BILLIONS))
def test_meta_model_matches_real_checkpoint_layout(variant: str) -> None:
    config = variant_config(variant)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(config)
    ours = {checkpoint_name(config, name): tuple(t.shape) for name, t in model.state_dict().items()}
    assert ours == reference_keys(variant)

    params = sum(p.numel() for p in model.model.parameters())
    assert round(params / 1e9, 2) == PUBLISHED_BILLIONS[variant]
