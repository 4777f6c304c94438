"""Gated DeltaNet linear attention: the "linear_attention" layers of Qwen3.5 (transformers'
Qwen3_5GatedDeltaNet), run by the shared decoder in place of softmax attention.

One layer's params (under "attn", so LoRA paths read like attention's):
    in_qkv [2·Hk·dk + Hv·dv, hidden]   q, k, v before a depthwise causal conv1d ("conv") and SiLU
    in_z [Hv·dv, hidden]               the output gate of the gated RMSNorm ("norm" [dv])
    in_b, in_a [Hv, hidden]            beta = sigmoid(in_b x); decay g = -exp(A_log) softplus(in_a x + dt_bias)
    out [hidden, Hv·dv]
    conv [2·Hk·dk + Hv·dv, 1, K]       the depthwise conv1d's weight (never quantized: bitsandbytes
                                       leaves the Conv1d alone)
    A_log, dt_bias [Hv]

The delta rule itself is `fnlm.kernels.gated_delta_rule` (chunked; Triton scan on CUDA). Decoding
keeps per layer a conv state (the last K-1 inputs of the conv, [batch, conv_dim, K-1], params
dtype) and the recurrent state ([batch, Hv, dk, dv], fp32) in the generation cache ("conv",
"state": per layer, None on attention layers); a one-token step runs the recurrence directly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fnlm import kernels
from fnlm.config import ModelConfig
from fnlm.errors import ArgumentError
from fnlm.models import decoder

LINEAR = "linear_attention"


class Sizes(NamedTuple):
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    conv_kernel: int

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim


def sizes(config: ModelConfig) -> Sizes:
    return Sizes(*config.linear_attention)


def _linear(x: torch.Tensor, w) -> torch.Tensor:
    return decoder.linear(x, w)


# ----------------------------------------------------------------------------------------------
# What the decoder hands a linear-attention layer
# ----------------------------------------------------------------------------------------------


def layer_mask(
    config: ModelConfig,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None,
    segments: torch.Tensor | None,
    cache: dict | None,
    cache_slots: torch.Tensor | None,
) -> torch.Tensor | None:
    """The `mask` of every linear-attention layer of one forward: None (nothing to hide), a bool
    [batch, seq] (False = padding: its input is zeroed, as transformers' apply_mask_to_padding_states,
    so left padding leaves the state at zero), or for packed rows (`segments`) a long [documents,
    longest] index of each document's tokens in the flattened [batch·seq] (-1 past its end): each
    document then runs from a zero state, as if alone. A one-token decode step has no padding."""
    if LINEAR not in config.layer_types:
        return None
    if cache is not None:
        return None if tokens.shape[1] == 1 else cache["valid"][:, cache_slots]
    if segments is not None:
        return document_index(segments if attention_mask is None else segments * attention_mask)
    return None if attention_mask is None else attention_mask.bool()


def document_index(segments: torch.Tensor) -> torch.Tensor:
    """[documents, longest] positions in the flattened segments of each document's tokens (a
    document: a run of one nonzero segment id in a row), -1 after a document's end. Reads the
    lengths on the host (once per forward)."""
    flat = segments.reshape(-1)
    seq = segments.shape[1]
    idx = torch.arange(flat.numel(), device=flat.device)
    previous = torch.cat([flat.new_zeros(1), flat[:-1]])
    starts = (flat > 0) & ((flat != previous) | (idx % seq == 0))
    doc = starts.cumsum(0) - 1
    real = flat > 0
    count = int(starts.sum())
    if count == 0:
        return idx.new_full((0, 1), -1)
    lengths = torch.bincount(doc[real], minlength=count)
    first = idx[starts]
    longest = int(lengths.max())
    offsets = torch.arange(longest, device=flat.device)
    index = first[:, None] + offsets[None, :]
    return torch.where(offsets[None, :] < lengths[:, None], index, -1)


def state(cache: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv state, recurrent state) of one linear-attention layer in a generation cache."""
    return cache["conv"][layer], cache["state"][layer]


def init_state(config: ModelConfig, batch: int, device, dtype: torch.dtype) -> dict:
    """The cache entries of the linear-attention layers: {"conv": [per layer [batch, conv_dim,
    K-1] in `dtype`, or None], "state": [per layer [batch, Hv, dk, dv] fp32, or None]} (empty
    lists for a model without such layers)."""
    if LINEAR not in config.layer_types:
        return {"conv": [], "state": []}
    n = sizes(config)
    linear = [t == LINEAR for t in config.layer_types]
    conv = (batch, n.conv_dim, n.conv_kernel - 1)
    recurrent = (batch, n.value_heads, n.key_dim, n.value_dim)
    return {
        "conv": [torch.zeros(conv, dtype=dtype, device=device) if f else None for f in linear],
        "state": [
            torch.zeros(recurrent, dtype=torch.float32, device=device) if f else None
            for f in linear
        ],
    }


def reset(cache: dict) -> None:
    """Zero the recurrent and conv states (a prefill starts a new sequence in a reused cache)."""
    for t in (*cache.get("conv", ()), *cache.get("state", ())):
        if t is not None:
            t.zero_()


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------


def linear_attention(
    config: ModelConfig,
    p: dict,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One gated DeltaNet layer: x [batch, seq, hidden] -> [batch, seq, hidden].

    mask: as `layer_mask` builds it. kv: (conv state, recurrent state) when generating: read as
    the state before these tokens and overwritten (in place) with the state after them.
    """
    if mask is not None and mask.dtype != torch.bool:
        if kv is not None:
            raise ArgumentError("packed rows (segments) cannot run with a generation cache")
        return _per_document(config, p, x, mask)
    if mask is not None:
        x = (x * mask[:, :, None]).to(x.dtype)
    n = sizes(config)
    batch, seq, _ = x.shape
    mixed = _linear(x, p["in_qkv"]).transpose(1, 2)  # [batch, conv_dim, seq]
    z = _linear(x, p["in_z"]).reshape(batch, seq, n.value_heads, n.value_dim)
    beta = torch.sigmoid(_linear(x, p["in_b"]))
    # in fp32: in fp16, exp(A_log) times softplus may overflow (transformers does the same)
    g = -p["A_log"].float().exp() * F.softplus(_linear(x, p["in_a"]).float() + p["dt_bias"])

    weight = p["conv"].reshape(n.conv_dim, n.conv_kernel)
    if kv is None:
        previous = mixed.new_zeros(batch, n.conv_dim, n.conv_kernel - 1)
    else:
        previous = kv[0].to(mixed.dtype)
    window = torch.cat([previous, mixed], dim=-1).to(weight.dtype)
    if kv is not None:
        kv[0].copy_(window[..., window.shape[-1] - (n.conv_kernel - 1) :])
    mixed = F.conv1d(window, weight[:, None, :], groups=n.conv_dim)
    mixed = F.silu(mixed).to(x.dtype).transpose(1, 2)  # [batch, seq, conv_dim]
    key = n.key_heads * n.key_dim
    q, k, v = mixed.split([key, key, n.value_heads * n.value_dim], dim=-1)
    q = q.reshape(batch, seq, n.key_heads, n.key_dim)
    k = k.reshape(batch, seq, n.key_heads, n.key_dim)
    v = v.reshape(batch, seq, n.value_heads, n.value_dim)

    initial = None if kv is None else kv[1]
    if kv is not None and seq == 1:  # decode: one step of the recurrence
        out, final = kernels.gated_delta_rule_recurrent(q, k, v, g, beta, initial)
    else:
        out, final = kernels.gated_delta_rule(q, k, v, g, beta, initial)
    if kv is not None:
        kv[1].copy_(final)

    # gated RMSNorm: norm(out) rounded to the input dtype, times the weight, times silu(z) in fp32
    normed = kernels.rms_norm(out, p["norm"], config.norm_eps)
    out = (normed * F.silu(z.float())).to(x.dtype)
    return _linear(out.reshape(batch, seq, n.value_heads * n.value_dim), p["out"])


def _per_document(config: ModelConfig, p: dict, x: torch.Tensor, index: torch.Tensor):
    """The layer on packed rows: each document gathered into a row of its own (right padded,
    the padding masked), run from a zero state, and scattered back (padding tokens get zeros)."""
    batch, seq, hidden = x.shape
    flat = x.reshape(batch * seq, hidden)
    real = index >= 0
    docs = flat[index.clamp(min=0)] * real[..., None].to(x.dtype)
    y = linear_attention(config, p, docs, real)
    out = flat.new_zeros(batch * seq, y.shape[-1])
    out = out.index_put((index[real],), y[real])
    return out.reshape(batch, seq, -1)
