"""Architecture registry: transformers `model_type` -> the family module that translates it.

A family module has `MODEL_TYPES`, `config_from_hf(hf_dict) -> ModelConfig` and
`weight_names(config) -> {hf_tensor_name: (param_path, shape)}`; the decoder is shared.
"""

from __future__ import annotations

from types import ModuleType

from fnlm.config import ModelConfig
from fnlm.errors import ConfigError, UnsupportedModelError
from fnlm.models import llama, mistral, qwen2, qwen3

FAMILIES: dict[str, ModuleType] = {
    t: m for m in (llama, mistral, qwen2, qwen3) for t in m.MODEL_TYPES
}


def family(model_type: str) -> ModuleType:
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
