"""Gemma: RMSNorm scaled by (1 + w), embeddings times sqrt(hidden), GeGLU with tanh GELU, tied head."""

from fnlm.config import ModelConfig
from fnlm.models.llama import translate, weight_names  # noqa: F401  (same tensor layout)

MODEL_TYPES = ("gemma",)


def activation(hf: dict) -> str:
    # transformers maps Gemma's legacy hidden_act "gelu" to the tanh approximation it was trained
    # with (Gemma 2 and 3 read hidden_activation as written).
    act = hf.get("hidden_act") or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if act == "gelu" else act


def gemma_fields(hf: dict) -> dict:
    """What every Gemma generation shares: norm offset 1, scaled embeddings, tied head by default."""
    return dict(
        norm_offset=1.0,
        embedding_scale=hf["hidden_size"] ** 0.5,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def config_from_hf(hf: dict) -> ModelConfig:
    # llama.translate accepts only silu; the activation is set after the shared translation.
    config = translate(hf, activation="silu", **gemma_fields(hf))
    return config.replace(activation=activation(hf))
