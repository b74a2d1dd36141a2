"""The routed-experts op and the sync-free model forward: oracle parity, meta tensors, fullgraph compile, counters.

The whole step forward, MoE included, is compiled in tests/test_model_runner.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gemma4.backends import reference_ops
from gemma4.modeling import DenseAttention, Gemma4ForCausalLM, ScaledEmbedding
from gemma4.ops.moe import FORMULATIONS, formulation, moe_experts, moe_grouped
from engine_fixtures import small_config

E, K, H, I = 8, 2, 16, 8  # fp32 rows of 16 and 8 values keep _grouped_mm's 16-byte strides
VARIANTS = ("e2b", "e4b", "26b-a4b", "31b")


def loop_oracle(x, weights, experts, gate_up_proj, down_proj) -> torch.Tensor:
    """One token and one slot at a time, straight from the definition."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[n, j])
            gate, up = (gate_up_proj[e] @ x[n]).chunk(2)
            y = down_proj[e] @ (F.gelu(gate, approximate="tanh") * up)
            out[n] += (y * weights[n, j]).to(x.dtype)
    return out


def routed_inputs(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random tokens routed among experts 0..E-3 only (the last two stay unused; the rest repeat)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=gen)
    weights = torch.rand(n, K, generator=gen)
    experts = torch.randint(0, E - 2, (n, K), generator=gen)
    gate_up_proj = torch.randn(E, 2 * I, H, generator=gen) * 0.3
    down_proj = torch.randn(E, H, I, generator=gen) * 0.3
    return x, weights, experts, gate_up_proj, down_proj


@pytest.mark.parametrize("n", [1, 3, 4, 5, 37])  # N*k = 2 .. 74 against the gather limit E = 8
@pytest.mark.parametrize("kind", sorted(FORMULATIONS))
def test_every_formulation_equals_the_loop_oracle(kind: str, n: int) -> None:
    inputs = routed_inputs(n, seed=n)
    torch.testing.assert_close(FORMULATIONS[kind](*inputs), loop_oracle(*inputs), atol=1e-5, rtol=0)


def test_formulation_is_chosen_from_shapes_dtype_and_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert formulation(E, E, H, I, torch.float32, cpu) == "gather"
    assert formulation(E + 1, E, H, I, torch.float32, cpu) == "dense"
    assert formulation(E + 1, E, H, I, torch.bfloat16, cpu) == "dense"
    assert formulation(E, E, H, I, torch.bfloat16, cuda) == "gather"
    expected_cuda = "dense" if torch.version.hip else "grouped"
    assert formulation(E + 1, E, H, I, torch.bfloat16, cuda) == expected_cuda
    assert formulation(E + 1, E, H, I, torch.float32, cuda) == "dense"
    assert formulation(E + 1, E, H, I + 4, torch.bfloat16, cuda) == "dense"  # unaligned rows


@pytest.mark.parametrize("n", [1, 37])
def test_moe_experts_runs_on_meta_tensors(n: int) -> None:
    """Meta tensors hold no values: unique, nonzero or .tolist() would raise here."""
    meta = [t.to("meta") for t in routed_inputs(n, seed=0)]
    assert moe_experts(*meta).shape == (n, H)
    x, weights, experts, gate_up_proj, down_proj = meta
    bf16 = [t.to(torch.bfloat16) for t in (x, gate_up_proj, down_proj)]
    assert moe_grouped(bf16[0], weights, experts, bf16[1], bf16[2]).shape == (n, H)


@pytest.mark.parametrize("n", [2, 24])  # decode size (gather) and prefill size (dense)
def test_compiled_moe_experts_equals_eager(n: int) -> None:
    inputs = routed_inputs(n, seed=1)
    compiled = torch.compile(moe_experts, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(*inputs), moe_experts(*inputs), atol=1e-5, rtol=1e-5)


def random_model(variant: str, seed: int = 0) -> Gemma4ForCausalLM:
    """A small fp32 model with random weights (1-D weights around 1, like the reference tests)."""
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(small_config(variant))
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.copy_(torch.rand_like(tensor) + 0.5 if tensor.dim() == 1 else torch.randn_like(tensor) * 0.05)
    model.reset_buffers()
    return model.eval()


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 400, (batch, length), generator=torch.Generator().manual_seed(seed))


class HostTensorSpy(TorchDispatchMode):
    """Records every op that produces a tensor off the meta device (a host tensor, in a meta-device forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.host_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and not t.is_meta for t in tree_leaves(out)):
            self.host_ops.append(str(func))
        return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_forward_runs_on_meta_without_host_tensors(variant: str) -> None:
    """Meta tensors hold no values, so syncs fail; any tensor made off the device is a per-forward host tensor."""
    with torch.device("meta"):
        model = Gemma4ForCausalLM(small_config(variant))
    vocab = model.text_config.vocab_size
    for batch, length in ((4, 1), (2, 9)):  # decode (gather) and prefill (dense) on 26b-a4b
        with HostTensorSpy() as spy:
            logits = model(torch.zeros(batch, length, dtype=torch.long, device="meta"))
        assert logits.shape == (batch, length, vocab) and logits.is_meta
        assert spy.host_ops == []


def routed_experts(model: Gemma4ForCausalLM) -> dict[int, list[torch.Tensor]]:
    """Capture each MoE layer's router choices during the next forwards."""
    seen: dict[int, list[torch.Tensor]] = {}

    def recorder(index: int):
        def hook(_module, _args, out: tuple[torch.Tensor, torch.Tensor]) -> None:
            seen.setdefault(index, []).append(out[1].clone())

        return hook

    for i, layer in enumerate(model.model.layers):
        if layer.has_moe:
            layer.router.register_forward_hook(recorder(i))
    return seen


def test_expert_counts_skip_masked_tokens_and_equal_a_bincount() -> None:
    model = random_model("26b-a4b")
    seen = routed_experts(model)
    ids = token_ids(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    with torch.no_grad():
        masked_logits = model.hidden_states(ids, _positions(ids), _dense(ids), token_mask=mask)
        masked = model.expert_load()
        model.reset_buffers()
        logits = model.hidden_states(ids, _positions(ids), _dense(ids))
        unmasked = model.expert_load()
    torch.testing.assert_close(masked_logits, logits, atol=0, rtol=0)  # the mask only gates the counters
    num_experts = model.text_config.num_experts
    assert seen and len(masked) == len(seen)
    for layer, (masked_run, full_run) in seen.items():
        torch.testing.assert_close(masked_run, full_run, atol=0, rtol=0)
        assert masked[layer] == torch.bincount(masked_run[mask.flatten()].flatten(), minlength=num_experts).tolist()
        assert unmasked[layer] == torch.bincount(full_run.flatten(), minlength=num_experts).tolist()
        assert sum(unmasked[layer]) == ids.numel() * model.text_config.top_k_experts
        assert sum(masked[layer]) == int(mask.sum()) * model.text_config.top_k_experts


def test_embedding_scale_keeps_the_reference_rounding() -> None:
    """bf16 rounds sqrt(5376) to 73.5, as the reference does; fp32 keeps it."""
    embed = ScaledEmbedding(16, 8, 5376**0.5)
    ids = torch.tensor([[0, 3, 15]])
    torch.testing.assert_close(embed(ids), embed.weight[ids] * float(torch.tensor(5376**0.5)), atol=0, rtol=0)
    embed = embed.to(torch.bfloat16)
    torch.testing.assert_close(embed(ids), embed.weight[ids] * 73.5, atol=0, rtol=0)


def _positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1]).expand_as(ids)


def _dense(ids: torch.Tensor) -> DenseAttention:
    return DenseAttention(_positions(ids), reference_ops())
