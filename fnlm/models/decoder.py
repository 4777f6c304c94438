"""The one decoder: embedding, attention, MLP, norms, residuals and lm head as plain functions.

Every supported architecture is this code driven by a `ModelConfig`; a family needing new
behaviour adds one config field and one branch here. Weights arrive as a `Params` pytree whose
linear leaves may be dense tensors, quantized leaves (`fnlm.quant`) or LoRA-adapted leaves
(`fnlm.lora`): `linear` dispatches on the leaf type, so the decoder never knows the precision.

Shapes: x [batch, seq, hidden]; q [batch, seq, heads, head_dim]; masks [batch, 1, q_len, k_len].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fnlm import kernels, quant
from fnlm.config import ModelConfig
from fnlm.errors import ArgumentError
from fnlm.models.rope import rope_tables
from fnlm.params import Params


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) for any weight leaf: dense tensor, quantized leaf or adapted leaf."""
    if hasattr(w, "linear"):  # LoRA-adapted leaves carry their own fused forward
        return w.linear(x, bias)
    return quant.linear(x, w, bias)


def embedding(tokens: torch.Tensor, w) -> torch.Tensor:
    """Row lookup for a dense or adapted embedding leaf."""
    if hasattr(w, "embedding"):
        return w.embedding(tokens)
    return F.embedding(tokens, quant.dequantize(w))


def norm(config: ModelConfig, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return kernels.rms_norm(x, w, config.norm_eps)


def attention(
    config: ModelConfig,
    p: dict,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Self-attention of one layer. `mask` None means plain causal (lets SDPA pick flash)."""
    batch, seq, _ = x.shape
    q = linear(x, p["q"], p.get("q_bias")).view(batch, seq, config.num_heads, config.head_dim)
    k = linear(x, p["k"], p.get("k_bias")).view(batch, seq, config.num_kv_heads, config.head_dim)
    v = linear(x, p["v"], p.get("v_bias")).view(batch, seq, config.num_kv_heads, config.head_dim)
    if config.qk_norm:  # Qwen3: RMSNorm over each head before RoPE
        q = kernels.rms_norm(q, p["q_norm"], config.norm_eps)
        k = kernels.rms_norm(k, p["k_norm"], config.norm_eps)
    q, k = kernels.apply_rope(q, k, cos, sin)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=mask is None and seq > 1,
        enable_gqa=config.num_kv_heads != config.num_heads,
    )
    out = out.transpose(1, 2).reshape(batch, seq, config.num_heads * config.head_dim)
    return linear(out, p["o"], p.get("o_bias"))


def mlp(config: ModelConfig, p: dict, x: torch.Tensor) -> torch.Tensor:
    gate = linear(x, p["gate"], p.get("gate_bias"))
    up = linear(x, p["up"], p.get("up_bias"))
    return linear(kernels.swiglu(gate, up), p["down"], p.get("down_bias"))


def layer_forward(
    config: ModelConfig,
    p: dict,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """One pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.)). Pure; compile/checkpoint unit."""
    x = x + attention(config, p["attn"], norm(config, p["norm_attn"], x), cos, sin, mask)
    return x + mlp(config, p["mlp"], norm(config, p["norm_mlp"], x))


def default_positions(tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """0..seq-1 per row, or, with a padding mask, counting only real tokens (left padding)."""
    if attention_mask is None:
        return torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_mask(
    positions: torch.Tensor,
    padding: torch.Tensor | None,
    segments: torch.Tensor | None,
    window: int | None,
) -> torch.Tensor | None:
    """Boolean [batch, 1, seq, seq] mask (True = may attend), or None for plain causal attention.

    Causality and the window use the token index; `segments` (packed examples, one id per example)
    keep attention inside each example; `padding` [batch, seq] (1 = real token) hides pad keys.
    Every query may see itself, so rows of pad queries stay finite (their outputs are ignored).
    """
    seq = positions.shape[1]
    if padding is None and segments is None and (window is None or window >= seq):
        return None
    idx = torch.arange(seq, device=positions.device)
    mask = idx[None, :] <= idx[:, None]
    if window is not None:
        mask = mask & (idx[:, None] - idx[None, :] < window)
    mask = mask[None, None]
    if segments is not None:
        mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
    if padding is not None:
        mask = mask & padding.bool()[:, None, None, :]
    return mask | torch.eye(seq, dtype=torch.bool, device=positions.device)


def hidden_states(
    params: Params,
    tokens: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    layer_fn=layer_forward,
) -> torch.Tensor:
    """The final-normed hidden states [batch, seq, hidden]; `layer_fn` lets training wrap each layer
    (activation checkpointing, torch.compile) without changing the math."""
    config = params.config
    if positions is None:
        positions = default_positions(tokens, attention_mask)
    x = embedding(tokens, params["embed"])
    cos, sin = rope_tables(config, positions)
    masks: dict[int | None, torch.Tensor | None] = {}
    for i, layer in enumerate(params["layers"]):
        window = config.window(i)
        if window not in masks:
            masks[window] = build_mask(positions, attention_mask, segments, window)
        x = layer_fn(config, layer, x, cos, sin, masks[window])
    return norm(config, params["norm"], x)


def logits_from_hidden(params: Params, x: torch.Tensor) -> torch.Tensor:
    return linear(x, params["lm_head"])


def forward(
    params: Params,
    tokens: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    lora=None,
) -> torch.Tensor:
    """Logits [batch, seq, vocab] for `tokens` [batch, seq]. Pure: no state is read or written.

    positions: explicit per-token positions (packed sequences restart at 0); default 0..seq-1, or
        counted over real tokens when `attention_mask` is given (left padding).
    attention_mask: [batch, seq], 1 for real tokens, 0 for padding.
    segments: [batch, seq] example ids for packed rows; attention stays within an example.
    lora: an adapter pytree from `fnlm.lora.init` / `fnlm.lora.load`, applied unmerged.

    Raises ArgumentError for tokens that are not a 2-D integer tensor or lie outside the vocabulary.
    """
    check_tokens(params.config, tokens)
    if lora is not None:
        from fnlm.lora import attach

        params = attach(params, lora)
    x = hidden_states(
        params, tokens, positions=positions, attention_mask=attention_mask, segments=segments
    )
    return logits_from_hidden(params, x)


def check_tokens(config: ModelConfig, tokens: torch.Tensor) -> None:
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.dim() != 2
        or tokens.dtype not in (torch.int32, torch.int64)
    ):
        got = (
            f"{tuple(tokens.shape)} {tokens.dtype}"
            if isinstance(tokens, torch.Tensor)
            else type(tokens).__name__
        )
        raise ArgumentError(f"tokens must be an integer tensor [batch, seq]; got {got}")
    if tokens.numel() and not torch.compiler.is_compiling():
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= config.vocab_size:
            raise ArgumentError(
                f"token ids must lie in [0, {config.vocab_size}) for this model; got ids from {low} to {high}"
            )
