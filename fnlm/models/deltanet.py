"""Gated DeltaNet linear attention: the "linear_attention" layers of Qwen3.5 (transformers'
Qwen3_5GatedDeltaNet), run by the shared decoder in place of softmax attention.

One layer's params (under "attn", so LoRA paths read like attention's):
    in_qkv [2·Hk·dk + Hv·dv, hidden]   q, k, v before a depthwise causal conv1d ("conv") and SiLU
    in_z [Hv·dv, hidden]               the output gate of the gated RMSNorm ("norm" [dv])
    in_b, in_a [Hv, hidden]            beta = sigmoid(in_b x); decay g = -exp(A_log) softplus(in_a x + dt_bias)
    (Qwen3-Next: in_qkvz [2·Hk·dk + 2·Hv·dv, hidden] and in_ba [2·Hv, hidden] instead, fused and
    grouped per key head; see `_project`)
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
from fnlm.models import decoder  # imports this module back: see its import of it

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
    so left padding leaves the state at zero), or for packed rows (`segments`) a long [batch, seq]
    of each token's position in its document (`document_positions`; -1 on padding): each document
    then runs from a zero state and conv window, as if alone. A one-token decode step has no
    padding."""
    if LINEAR not in config.layer_types:
        return None
    if cache is not None:
        return None if tokens.shape[1] == 1 else cache["valid"][:, cache_slots]
    if segments is not None:
        return document_positions(segments if attention_mask is None else segments * attention_mask)
    return None if attention_mask is None else attention_mask.bool()


def document_positions(segments: torch.Tensor) -> torch.Tensor:
    """Each token's position in its document, long [batch, seq], -1 where segments is 0 (a
    document: a run of one nonzero segment id in a row). Device ops on [batch, seq] only (no host
    read, no data-dependent shape), so a CUDA graph can capture it."""
    seq = segments.shape[1]
    previous = F.pad(segments[:, :-1], (1, 0))  # 0 before each row's first token
    starts = (segments > 0) & (segments != previous)
    idx = torch.arange(seq, device=segments.device).expand_as(segments)
    first = torch.where(starts, idx, 0).cummax(dim=1).values
    return torch.where(segments > 0, idx - first, -1)


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
    doc_pos = None  # packed rows: the position of each token in its document (-1: padding)
    if mask is not None and mask.dtype != torch.bool:
        if kv is not None:
            raise ArgumentError("packed rows (segments) cannot run with a generation cache")
        doc_pos, mask = mask, mask >= 0
    if mask is not None:
        x = (x * mask[:, :, None]).to(x.dtype)
    n = sizes(config)
    batch, seq, _ = x.shape
    mixed, z, b, a = _project(n, p, x)
    mixed = mixed.transpose(1, 2)  # [batch, conv_dim, seq]
    z = z.reshape(batch, seq, n.value_heads, n.value_dim)
    beta = torch.sigmoid(b)
    # in fp32: in fp16, exp(A_log) times softplus may overflow (transformers does the same)
    g = -p["A_log"].float().exp() * F.softplus(a.float() + p["dt_bias"])

    weight = p["conv"].reshape(n.conv_dim, n.conv_kernel)
    if kv is None:
        previous = mixed.new_zeros(batch, n.conv_dim, n.conv_kernel - 1)
    else:
        previous = kv[0].to(mixed.dtype)
    window = torch.cat([previous, mixed], dim=-1).to(weight.dtype)
    if kv is not None:
        kv[0].copy_(window[..., window.shape[-1] - (n.conv_kernel - 1) :])
    if doc_pos is None:
        mixed = F.conv1d(window, weight[:, None, :], groups=n.conv_dim)
    else:
        mixed = _document_conv(window, weight, doc_pos)
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
        reset = None if doc_pos is None else doc_pos == 0
        out, final = kernels.gated_delta_rule(q, k, v, g, beta, initial, reset=reset)
    if kv is not None:
        kv[1].copy_(final)

    # gated RMSNorm: norm(out) rounded to the input dtype, times the weight, times silu(z) in fp32
    normed = kernels.rms_norm(out, p["norm"], config.norm_eps)
    out = (normed * F.silu(z.float())).to(x.dtype)
    out = decoder.linear(out.reshape(batch, seq, n.value_heads * n.value_dim), p["out"])
    if doc_pos is not None:  # padding between and after packed documents gives zeros
        out = out * mask[:, :, None].to(out.dtype)
    return out


def _project(n: Sizes, p: dict, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(q, k, v before the conv [batch, seq, conv_dim], z [batch, seq, Hv·dv], b, a [batch, seq,
    Hv]) of x. Qwen3-Next fuses the projections into "in_qkvz" and "in_ba" grouped per key head,
    as transformers' fix_query_key_value_ordering reads them (per key head: q, k, then its
    r = Hv/Hk value heads' v, then their z; and its r b, then its r a); they stay fused, as peft
    adapts them, and are regrouped here."""
    if "in_qkvz" not in p:
        return tuple(decoder.linear(x, p[name]) for name in ("in_qkv", "in_z", "in_b", "in_a"))
    batch, seq, _ = x.shape
    r = n.value_heads // n.key_heads
    qkvz = decoder.linear(x, p["in_qkvz"]).reshape(batch, seq, n.key_heads, -1)
    q, k, v, z = qkvz.split([n.key_dim, n.key_dim, r * n.value_dim, r * n.value_dim], dim=-1)
    ba = decoder.linear(x, p["in_ba"]).reshape(batch, seq, n.key_heads, 2 * r)
    b, a = ba.split([r, r], dim=-1)
    mixed = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
    return mixed, z.flatten(2), b.flatten(2), a.flatten(2)


def _document_conv(window: torch.Tensor, weight: torch.Tensor, doc_pos: torch.Tensor):
    """The depthwise causal conv of packed rows: window [batch, conv_dim, K-1 + seq] (K-1 zeros
    first), weight [conv_dim, K], doc_pos [batch, seq] (`document_positions`). The tap `lag`
    tokens back is dropped where it reaches before the token's document start (lag > doc_pos), so
    each document sees zeros before it, as alone. Accumulated in fp32 (F.conv1d's accumulation),
    rounded to the window's dtype."""
    k = weight.shape[1]
    seq = doc_pos.shape[1]
    acc = torch.promote_types(window.dtype, torch.float32)
    out = None
    for lag in range(k):
        shifted = window[..., k - 1 - lag : k - 1 - lag + seq].to(acc)
        keep = (doc_pos >= lag)[:, None, :]
        term = shifted * weight[:, k - 1 - lag, None].to(acc) * keep
        out = term if out is None else out + term
    return out.to(window.dtype)
