"""Qwen3: RMSNorm over each head of q and k before RoPE; attention_bias as configured."""

from fnlm.config import ModelConfig
from fnlm.models.llama import translate, weight_names  # noqa: F401  (same tensor layout)
from fnlm.models.qwen2 import sliding_fields

MODEL_TYPES = ("qwen3",)


def config_from_hf(hf: dict) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return translate(hf, qk_norm=True, attention_bias=bias, o_bias=bias, **sliding_fields(hf))
