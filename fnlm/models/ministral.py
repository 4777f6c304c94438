"""Ministral: Mistral with a per-layer choice of sliding or full attention (`layer_types`)."""

from fnlm.config import ModelConfig
from fnlm.models.llama import translate, weight_names  # noqa: F401  (same tensor layout)

MODEL_TYPES = ("ministral",)


def config_from_hf(hf: dict) -> ModelConfig:
    window = hf.get("sliding_window")
    layer_types = tuple(hf.get("layer_types") or ())
    if not layer_types:
        kind = "sliding_attention" if window is not None else "full_attention"
        layer_types = (kind,) * hf["num_hidden_layers"]
    return translate(
        hf, sliding_window=window, layer_types=layer_types, attention_bias=False, o_bias=False
    )
