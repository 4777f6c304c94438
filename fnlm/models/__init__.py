"""Architecture registry: transformers `model_type` -> the family module that translates it.

A family module has `MODEL_TYPES`, `config_from_hf(hf_dict) -> ModelConfig` and
`weight_names(config) -> {hf_tensor_name: (param_path, shape)}`; the decoder is shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import torch

from fnlm.config import ModelConfig
from fnlm.errors import ConfigError, UnsupportedModelError
from fnlm.models import (
    cohere,
    deepseek_v3,
    falcon,
    gemma,
    gemma2,
    gemma3,
    gemma4,
    glm4_moe,
    gpt_oss,
    granite,
    llama,
    ministral,
    mistral,
    mixtral,
    multimodal,
    olmo2,
    olmo3,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_5,
    qwen3_5_moe,
    qwen3_moe,
    qwen3_next,
    smollm3,
    starcoder2,
)

FAMILIES: dict[str, ModuleType] = {
    t: m
    for m in (
        llama,
        mistral,
        qwen2,
        qwen3,
        gemma,
        gemma2,
        gemma3,
        phi3,
        granite,
        cohere,
        starcoder2,
        olmo2,
        falcon,
        mixtral,
        qwen3_moe,
        qwen2_moe,
        multimodal,
        smollm3,
        olmo3,
        ministral,
        gpt_oss,
        qwen3_5,
        qwen3_5_moe,
        gemma4,
        glm4_moe,
        qwen3_next,
        deepseek_v3,
    )  # fmt: skip
    for t in m.MODEL_TYPES
}

# Architectures people ask for that fnlm does not run, with the reason (shown in the error and the
# README support table) instead of an approximate implementation.
UNSUPPORTED: dict[str, str] = {
    "cohere2": "Command R7B interleaves sliding-window layers without rotary embeddings on the "
    "global ones; not implemented yet",
    "phimoe": "Phi-3.5-MoE's sparsemixer router is not implemented",
}


def family(model_type: str) -> ModuleType:
    """The family module of a transformers model_type; UnsupportedModelError names the reason."""
    if model_type in UNSUPPORTED:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported: {UNSUPPORTED[model_type]}"
        )
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Translate a transformers config dict; errors name `source`."""
    if "model_type" not in hf:
        raise ConfigError(
            f"{source} has no 'model_type'; expected one of: {', '.join(sorted(FAMILIES))}"
        )
    try:
        return family(hf["model_type"]).config_from_hf(hf)
    except ConfigError as e:
        raise type(e)(f"{source}: {e}") from None


def checkpoint_name(config: ModelConfig, name: str) -> str | None:
    """The name `weight_names(config)` knows a checkpoint tensor by: `name` itself, or for the text
    tower of a multimodal checkpoint its text-model name, None for the vision tower's tensors."""
    if config.text_tower_of is None:
        return name
    return multimodal.text_name(name)


def checkpoint_stream(config: ModelConfig, stream: Iterator) -> Iterator:
    """The loader's (name, tensor, file) stream with the family's packed tensors unpacked (gpt-oss's
    MXFP4 expert pairs dequantized, gemma4's shared-KV layers' k/v dropped); the stream itself for
    other families."""
    unpack = getattr(family(config.model_type), "checkpoint_stream", None)
    return stream if unpack is None else unpack(stream, config)


def to_params(config: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor (its `weight_names` name) in the params' layout; most are the same."""
    convert = getattr(family(config.model_type), "to_params", None)
    return tensor if convert is None else convert(name, tensor)


def to_checkpoint(config: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_params`: a params tensor in the checkpoint's layout, for export."""
    convert = getattr(family(config.model_type), "to_checkpoint", None)
    return tensor if convert is None else convert(name, tensor)
