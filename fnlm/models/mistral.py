"""Mistral: Llama with a sliding attention window on every layer."""

from fnlm.config import ModelConfig
from fnlm.models.llama import translate, weight_names  # noqa: F401  (same tensor layout)

MODEL_TYPES = ("mistral",)


def config_from_hf(hf: dict) -> ModelConfig:
    return translate(
        hf, sliding_window=hf.get("sliding_window"), attention_bias=False, o_bias=False
    )
