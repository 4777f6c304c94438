"""The `Lora` pytree and its static `LoraConfig`: adapters at the params' paths.

lora["layers"][i]["attn"]["q"] = {"a": [r, in], "b": [out, r]}     # adapted linear
lora["embed"] = {"a": [r, vocab], "b": [hidden, r]}                # PEFT's lora_embedding_A/B
lora["lm_head"] = tensor                                            # modules_to_save: a full copy
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from fnlm.config import ModelConfig
from fnlm.params import register_pytree

# Every linear of attention and MLP; "qkv" and "gate_up" are the fused leaves of Phi-3 / Falcon.
ALL_LINEAR = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
BIAS_MODES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class LoraConfig:
    """Static description of an adapter (PEFT's LoraConfig fields, in fnlm's names).

    targets: module names as given (fnlm leaf names like "q", HF names like "q_proj", full names,
    or PEFT's regex string); informational once the adapter exists, the tensors say what is
    adapted. rank_pattern / alpha_pattern: (pattern, value) pairs matched as PEFT does (a pattern
    matches a module whose name, fnlm path "layers.0.attn.q" or HF "model.layers.0.self_attn.q_proj",
    ends with it as a regex); the first match wins, else r / alpha.
    """

    r: int = 16
    alpha: float = 16
    targets: tuple[str, ...] | str = ALL_LINEAR
    dropout: float = 0.0
    bias: str = "none"
    rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    base_model_name_or_path: str | None = None

    def scale(self, r: int, names: tuple[str, ...]) -> float:
        """The factor on B·A of a module of rank r: alpha/r, or alpha/sqrt(r) with rslora."""
        alpha = pattern_value(self.alpha_pattern, names, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r


@register_pytree(static=("config", "model_config", "training"))
class Lora(dict):
    """Adapters at the params' paths, with the static `LoraConfig`, the `ModelConfig` they were
    made for (for names when saving) and `training` (dropout on the adapter inputs when True)."""

    def __init__(
        self, tree: dict, config: LoraConfig, model_config: ModelConfig, training: bool = False
    ):
        super().__init__(tree)
        self.config = config
        self.model_config = model_config
        self.training = training

    def __repr__(self) -> str:
        adapted = sum(1 for _, node in entries(self) if isinstance(node, dict))
        n = sum(t.numel() for t in pytree.tree_leaves(self))
        mode = ", training" if self.training else ""
        return (
            f"Lora(r={self.config.r}, alpha={self.config.alpha}, {adapted} adapted modules, "
            f"{n:,} trainable elements{mode})"
        )


def train_mode(lora: Lora, enabled: bool = True) -> Lora:
    """The same adapters (no copies) with dropout on (`enabled`) or off. forward/loss stay pure:
    the mode is part of their input. `fnlm.loss(params, batch, lora=train_mode(lora))`."""
    return Lora(lora, lora.config, lora.model_config, training=enabled)


def parameters(lora: Lora) -> list[torch.Tensor]:
    """The trainable tensors, in a stable order: `torch.optim.AdamW(fnlm.lora.parameters(lora))`."""
    return pytree.tree_leaves(lora)


def pattern_value(pattern: tuple[tuple[str, Any], ...], names: tuple[str, ...], default: Any):
    """PEFT's get_pattern_key: the first key that regex-matches the end of a module name."""
    for key, value in pattern:
        if any(re.match(rf"(.*\.)?({key})$", name) for name in names):
            return value
    return default


def is_adapter(node) -> bool:
    return isinstance(node, dict) and set(node) == {"a", "b"}


def entries(lora) -> list[tuple[tuple, Any]]:
    """(path, adapter dict or replacement tensor) of every entry of a lora tree."""
    out = []

    def walk(node, path):
        if is_adapter(node) or isinstance(node, torch.Tensor):
            out.append((path, node))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(lora, ())
    return out
