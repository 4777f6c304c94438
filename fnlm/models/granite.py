"""Granite (IBM): Llama with multipliers on the embeddings, the residual branches and the attention
scores, and logits divided by logits_scaling."""

from fnlm.config import ModelConfig
from fnlm.models.llama import translate, weight_names  # noqa: F401  (same tensor layout)

MODEL_TYPES = ("granite",)


def config_from_hf(hf: dict) -> ModelConfig:
    return translate(
        hf,
        embedding_scale=float(hf.get("embedding_multiplier", 1.0)),
        residual_scale=float(hf.get("residual_multiplier", 1.0)),
        attention_scale=float(hf.get("attention_multiplier", 1.0)),
        logit_scale=1.0 / float(hf.get("logits_scaling", 1.0)),
    )
