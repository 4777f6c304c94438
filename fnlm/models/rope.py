"""Rotary position embedding tables: inverse frequencies per rope type, and per-token cos/sin.

`inverse_frequencies(config)` is computed once per (config, device) and reproduces transformers'
`ROPE_INIT_FUNCTIONS` for each `rope_type`; `rope_tables(config, positions)` turns explicit per-token
positions into the `[batch, seq, rotary_dim // 2]` fp32 cos/sin that `fnlm.kernels.apply_rope` takes.

Two rope types depend on the sequence, as transformers' `dynamic_rope_update` does: "dynamic" grows the
base once max(positions) + 1 passes the native length, "longrope" switches from the short to the long
factors there. transformers keeps the grown state on the module between calls; fnlm is pure, so each
call decides from its own positions (the same as a freshly loaded transformers model).
"""

from __future__ import annotations

import functools
import math

import torch

from fnlm.config import ModelConfig
from fnlm.errors import UnsupportedModelError


def _base_inverse_frequencies(theta: float, dim: int, device) -> torch.Tensor:
    # Same expression as transformers (int64 arange cast to fp32), so fp32 tables match bit for bit.
    return 1.0 / (
        theta
        ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim)
    )


def _linear(config: ModelConfig, rope: dict, device) -> tuple[torch.Tensor, float]:
    inv_freq = _base_inverse_frequencies(config.rope_theta, config.rotary_dim, device)
    return inv_freq / rope["factor"], 1.0


def _original_length(config: ModelConfig, rope: dict) -> int:
    # transformers fills a missing original_max_position_embeddings (llama3, yarn, longrope) with
    # max_position_embeddings, the checkpoint's own.
    return rope.get("original_max_position_embeddings") or config.rope_native_length


def _llama3(config: ModelConfig, rope: dict, device) -> tuple[torch.Tensor, float]:
    # Llama 3.1: long wavelengths divided by `factor`, short kept, a smooth blend between.
    inv_freq = _base_inverse_frequencies(config.rope_theta, config.rotary_dim, device)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = _original_length(config, rope)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _dynamic(config: ModelConfig, rope: dict, device) -> tuple[torch.Tensor, float]:
    # Dynamic NTK at its initial length behaves as the default rope; `rope_tables` rescales the base
    # when a sequence runs past the native length, as transformers' dynamic_rope_update does.
    return _base_inverse_frequencies(config.rope_theta, config.rotary_dim, device), 1.0


def _longrope_factors(config: ModelConfig, rope: dict, long: bool, device) -> torch.Tensor:
    # Phi-3's LongRoPE: one rescale factor per frequency, a "short" set within the original length and
    # a "long" set beyond it. Same expression as transformers, so fp32 tables match bit for bit.
    dim = config.rotary_dim
    factors = torch.tensor(
        rope["long_factor" if long else "short_factor"], dtype=torch.float32, device=device
    )
    if factors.shape != (dim // 2,):
        raise UnsupportedModelError(
            f"longrope {'long' if long else 'short'}_factor has {factors.numel()} entries; "
            f"expected rotary_dim / 2 = {dim // 2}"
        )
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (factors * config.rope_theta**exponent)


def _longrope(config: ModelConfig, rope: dict, device) -> tuple[torch.Tensor, float]:
    original = _original_length(config, rope)
    # Without an explicit factor the attention factor follows the context extension
    # max_position_embeddings / original (the checkpoint's own, not one raised by max_seq_length).
    factor = rope.get("factor") or config.rope_native_length / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    return _longrope_factors(config, rope, False, device), attention_factor


def _yarn(config: ModelConfig, rope: dict, device) -> tuple[torch.Tensor, float]:
    base, dim = config.rope_theta, config.rotary_dim
    original = _original_length(config, rope)
    factor = rope.get("factor") or config.rope_native_length / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = float(
                mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
            )
        else:
            attention_factor = mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(
        device
    )
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


ROPE_TYPES = {
    "default": lambda config, rope, device: (
        _base_inverse_frequencies(config.rope_theta, config.rotary_dim, device),
        1.0,
    ),
    "linear": _linear,
    "llama3": _llama3,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "longrope": _longrope,
}


@functools.lru_cache(maxsize=64)
def inverse_frequencies(config: ModelConfig, device: torch.device) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2] fp32, attention_scaling) for the config's rope type."""
    rope = config.rope
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {sorted(ROPE_TYPES)}"
        )
    return ROPE_TYPES[rope_type](config, rope, device)


@functools.lru_cache(maxsize=64)
def local_config(config: ModelConfig) -> ModelConfig:
    """The config whose global rope is `config`'s local one (Gemma3's sliding-window layers)."""
    return config.replace(
        rope_theta=config.local_rope_theta,
        rope_scaling=config.local_rope_scaling,
        local_rope_theta=None,
        local_rope_scaling=(),
    )


def rope_tables(
    config: ModelConfig, positions: torch.Tensor, *, local: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [batch, seq, rotary_dim // 2] (fp32) for integer `positions` [batch, seq].

    local: the tables of the sliding-window layers when they have their own rope
    (`config.local_rope(layer)`), else the global ones.
    """
    if local and config.local_rope_theta is not None:
        config = local_config(config)
    inv_freq, scaling = inverse_frequencies(config, positions.device)
    rope = config.rope
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type == "dynamic":
        inv_freq = _dynamic_rescale(config, rope, inv_freq, positions)
    elif rope_type == "longrope" and _longest(positions) > _original_length(config, rope):
        inv_freq = _longrope_factors(config, rope, True, positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos, sin


def _longest(positions: torch.Tensor) -> int:
    # transformers decides from max(position_ids) + 1 over the whole batch.
    return int(positions.max()) + 1 if positions.numel() else 0


def _dynamic_rescale(
    config: ModelConfig, rope: dict, inv_freq: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    # transformers grows the base once the longest sequence exceeds max_position_embeddings (the
    # checkpoint's), in fp32 tensor arithmetic; the same operations here keep the tables bit-equal.
    native = config.rope_native_length
    seq_len = _longest(positions)
    if seq_len <= native:
        return inv_freq
    dim, factor = config.rotary_dim, rope["factor"]
    length = torch.tensor(seq_len, dtype=torch.int64, device=positions.device)
    base = config.rope_theta * ((factor * length / native) - (factor - 1)) ** (dim / (dim - 2))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
    return 1.0 / (base**exponent)
