"""Elementwise and per-row ops of the decoder (torch reference ops): norms, QK-norm + RoPE, the normed KV
write, the Per-Layer-Embedding inputs, the gated GELU and the final logit softcap.

Each op reproduces the model's math bit for bit: the same dtype casts in the same order (norms in
fp32 and cast back, every other op in the input dtype, rounded after each step as torch rounds).
They are the CPU and XLA path and the oracle of the Triton kernels in `gemma4.kernels.norms` and
`gemma4.kernels.kv_write`, which have the same signatures.

This module imports nothing of `gemma4.modeling`, so the model can be built on top of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemma4.ops.paged_attention import write_kv
from gemma4.ops.rope import apply_rope


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`x * rsqrt(mean(x^2) + eps) * weight` over the last dim, in fp32, cast back to x's dtype.

    `weight=None` is the weightless norm (attention values, the MoE router input).
    """
    h = x.float()
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        h = h * weight.float()
    return h.type_as(x)


def residual_rms_norm(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sandwich norm's residual add `residual + rms_norm(x)`, then `* scale` (the `[1]` layer scalar).

    The add and the multiply run in the dtype (the norm is cast first), as the decoder layer rounds.
    """
    out = residual + rms_norm(x, weight, eps)
    if scale is not None:
        out = out * scale
    return out


def norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    """QK-norm then RoPE: `x [T, heads, D]`, `cos/sin [T, D]` in x's dtype -> `[T, heads, D]`.

    Any leading dims work as long as cos/sin have x's leading dims (the model's `[B, T, heads, D]` with
    `[B, T, D]` too). Proportional RoPE is cos = 1, sin = 0 on the unrotated pairs.
    """
    return apply_rope(rms_norm(x, weight, eps), cos, sin)


def write_kv_normed(
    k_raw: torch.Tensor,
    v_raw: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    key_cache: torch.Tensor | None,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    token_mask: torch.Tensor,
) -> None:
    """Norm a layer's raw keys/values `[T, kv_heads, D]` and store them at their cache slots.

    Keys are `norm_rope(k_raw, k_weight)`, values the weightless norm of `v_raw`, or of `k_raw` on
    K-as-V layers (`v_raw=None`). `key_cache=None` stores values only (K-as-V caches). Caches are
    `[rows, block_size, kv_heads, D]`, `slot_mapping [T]` flat slots; padded tokens (`token_mask`
    zero) write zeros, as `write_kv` does.
    """
    values = rms_norm(k_raw if v_raw is None else v_raw, None, eps)
    write_kv(value_cache, slot_mapping, values, token_mask)
    if key_cache is not None:
        write_kv(key_cache, slot_mapping, norm_rope(k_raw, k_weight, cos, sin, eps), token_mask)


def per_layer_inputs(
    ids: torch.Tensor,
    context: torch.Tensor,
    table: torch.Tensor,
    norm_weight: torch.Tensor,
    *,
    num_layers: int,
    eps: float,
    token_scale: float,
    context_scale: float,
) -> torch.Tensor:
    """The PLE inputs `[T, L, p]` from `ids [T]` and the projected embedding `context [T, L*p]`.

    `table [Vp, L*p]` is `embed_tokens_per_layer.weight`, `token_scale` its scale rounded to the dtype
    (sqrt(p)), `context_scale` `hidden_size**-0.5`. Ids >= Vp read row 0. Any leading dims of ids work.
    """
    p = table.shape[1] // num_layers
    shape = (*ids.shape, num_layers, p)
    ids = torch.where(ids < table.shape[0], ids, 0)
    token_part = (F.embedding(ids, table) * token_scale).reshape(shape)
    context = rms_norm((context * context_scale).reshape(shape), norm_weight, eps)
    return (context + token_part) * 2.0**-0.5


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh(gate) * up` in the input dtype (the dense MLP and the PLE gate)."""
    return F.gelu(gate, approximate="tanh") * up


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`tanh(logits / cap) * cap` in the logits' dtype, returned as fp32 (`cap=None`: just fp32)."""
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()
