"""`ModelConfig`: one frozen description of every supported decoder.

A family file (`fnlm/models/llama.py`, ...) translates a transformers `config.json` into this; the
decoder reads nothing else. Fields are grouped: sizes, attention, rope, norms/MLP, special tokens.
Adding a behaviour means adding one named field here and one branch in `fnlm/models/decoder.py`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from fnlm.errors import ConfigError


def _freeze(value: Any) -> Any:
    """Dicts and lists from JSON into hashable tuples, so the config can key caches and compile."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value
    ):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only transformer; hashable, so it is a compile-time constant."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    # attention
    attention_bias: bool = False  # biases on q, k, v (Qwen2)
    o_bias: bool = False  # bias on the output projection
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # a query sees keys with q_pos - k_pos < window
    layer_types: tuple[
        str, ...
    ] = ()  # per layer "full_attention" | "sliding_attention"; () = all full

    # rope
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # frozen HF rope parameters beyond theta (rope_type, factor, ...)
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048

    # norms, MLP, embeddings
    norm_eps: float = 1e-6
    activation: str = "silu"  # silu -> SwiGLU
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    # special tokens (from config.json; the tokenizer has the final word)
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    # the checkpoint's own dtype name ("bfloat16", ...), kept for export
    torch_dtype: str | None = None
    # the original config.json, frozen, so exports can write it back
    hf_config: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope(self) -> dict:
        """The rope parameters as a dict (rope_type, factor, ...), without rope_theta."""
        return _thaw(self.rope_scaling) if self.rope_scaling else {}

    def window(self, layer: int) -> int | None:
        """The sliding window of one layer, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def hf_dict(self) -> dict:
        """The original transformers config.json as a dict."""
        return _thaw(self.hf_config) if self.hf_config else {}

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)


def freeze(value: Any) -> tuple:
    """Public alias for family files: freeze a JSON value (dict/list) into a hashable tuple."""
    return _freeze(value)
