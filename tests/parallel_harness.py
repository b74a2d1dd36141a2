"""A gloo rank of the parallel-model tests' process pool (built in spawned processes, so importable).

The pool has four ranks; a 2-rank case runs on ranks 0-1 over a subgroup made once at start, and
ranks outside a case answer None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from gemma4.loader import load_model
from gemma4.modeling import Gemma4ForCausalLM
from gemma4.parallel.comm import Collectives
from gemma4.parallel.layout import ParallelLayout
from gemma4.parallel.placement import ExpertPlacement

POOL_SIZE = 4


class ModelRank:
    """One rank: loads a shard of a checkpoint for a layout and runs dense-attention forwards."""

    def __init__(self, rank: int, init_method: str) -> None:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init_method, world_size=POOL_SIZE, rank=rank)
        self.rank = rank
        self.pair = dist.new_group([0, 1])  # every rank takes part in creating a group
        self.model: Gemma4ForCausalLM | None = None

    def _collectives(self, tp: int) -> Collectives | None:
        if tp == POOL_SIZE:
            return Collectives(POOL_SIZE, self.rank, dist.group.WORLD)
        if tp == 2:
            return Collectives(2, self.rank, self.pair) if self.rank < 2 else None
        raise ValueError(f"the pool runs tp 2 or {POOL_SIZE}, not {tp}")

    def load(self, checkpoint: Path, tp: int, ep: int, redundant: int = 0) -> int | None:
        """Load this rank's shard in fp32; its persistent bytes (None outside the case)."""
        comm = self._collectives(tp)
        if comm is None:
            self.model = None
            return None
        layout = ParallelLayout(tp, ep, self.rank, redundant)
        self.model = load_model(checkpoint, dtype=torch.float32, device="cpu", layout=layout, comm=comm)
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        if self.model is None:
            return None
        with torch.inference_mode():
            return self.model(input_ids)

    def expert_load(self) -> dict[int, list[int]] | None:
        return None if self.model is None else self.model.expert_load()

    def expert_placements(self) -> dict[int, ExpertPlacement] | None:
        return None if self.model is None else self.model.expert_placements()

    def set_expert_placements(self, placements: Mapping[int, ExpertPlacement], checkpoint: Path) -> None:
        if self.model is not None:
            self.model.set_expert_placements(placements, checkpoint)

    def shutdown(self) -> None:
        dist.destroy_process_group()
