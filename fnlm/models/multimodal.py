"""Multimodal checkpoints loaded for their text tower: Gemma 3 4B-27B (`gemma3` -> gemma3_text),
Mistral Small 3.x / Magistral (`mistral3` -> mistral), Gemma 4 (`gemma4` -> gemma4_text; its
audio tower is skipped with the vision tower), Qwen3.5 / Qwen3.5-MoE (`qwen3_5` -> qwen3_5_text,
`qwen3_5_moe` -> qwen3_5_moe_text; their multi-token-prediction `mtp.*` tensors are skipped too).

The config translates `text_config` with the text family, so the params, the LoRA adapters and a
merged export are those of the text model (transformers loads the export as Gemma3ForCausalLM /
MistralForCausalLM). Loading renames the language model's tensors to the text model's names
(`text_name`) and skips the vision tower and projector, saying so in one line.
"""

from __future__ import annotations

from fnlm.config import ModelConfig
from fnlm.errors import ConfigError

# multimodal model_type -> the model_type of its text tower when text_config does not name it
TEXT_TYPES = {
    "gemma3": "gemma3_text",
    "mistral3": "mistral",
    "gemma4": "gemma4_text",
    "qwen3_5": "qwen3_5_text",
    "qwen3_5_moe": "qwen3_5_moe_text",
}
MODEL_TYPES = tuple(TEXT_TYPES)

# checkpoint prefix -> text model prefix: transformers 4's layout (what the hub holds and what
# transformers 5 still writes) and transformers 5's in-memory one
_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)

# keys of the multimodal config that are the text model's when text_config lacks them
_INHERITED = ("bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype")


def text_config(hf: dict) -> dict:
    """The text model's config.json: `text_config`, with the multimodal config's word-embedding
    tying (transformers ties by the outer flag, default True) and special tokens."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"config.json of model_type {hf['model_type']!r} has no 'text_config'")
    text = dict(text)
    text.setdefault("model_type", TEXT_TYPES[hf["model_type"]])
    text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    for key in _INHERITED:
        if key in hf and text.get(key) is None:
            text[key] = hf[key]
    return text


def config_from_hf(hf: dict) -> ModelConfig:
    from fnlm.models import family

    text = text_config(hf)
    if text["model_type"] in TEXT_TYPES:
        raise ConfigError(f"text_config of {hf['model_type']!r} names a multimodal model_type")
    config = family(text["model_type"]).config_from_hf(text)
    return config.replace(text_tower_of=hf["model_type"])


def text_name(name: str) -> str | None:
    """The text model's name of a multimodal checkpoint's tensor; None for the vision tower's and
    the projector's (and anything else outside the language model)."""
    for prefix, text_prefix in _PREFIXES:
        if name.startswith(prefix):
            return text_prefix + name[len(prefix) :]
    return None


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """The text model's names (config.model_type is the text tower's); loading maps the
    checkpoint's names onto them with `text_name`."""
    from fnlm.models import family

    return family(config.model_type).weight_names(config)
