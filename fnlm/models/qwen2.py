"""Qwen2 / Qwen2.5: biases on q, k, v (not o); optional sliding window on the upper layers."""

from fnlm.config import ModelConfig
from fnlm.models.llama import translate, weight_names  # noqa: F401  (same tensor layout)

MODEL_TYPES = ("qwen2",)


def sliding_fields(hf: dict) -> dict:
    """transformers: layers at index >= max_window_layers slide when use_sliding_window is set."""
    layers = hf["num_hidden_layers"]
    if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        return {"sliding_window": None, "layer_types": ()}
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", layers) else "full_attention"
        for i in range(layers)
    ]
    return {"sliding_window": hf["sliding_window"], "layer_types": tuple(types)}


def config_from_hf(hf: dict) -> ModelConfig:
    return translate(hf, attention_bias=True, o_bias=False, **sliding_fields(hf))
