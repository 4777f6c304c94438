"""SmolLM3: Llama with no rotary embedding on every `no_rope_layer_interval`-th layer (NoPE), an
output-projection bias with the q/k/v ones, and optional sliding windows on the NoPE layers."""

from fnlm.config import ModelConfig
from fnlm.models.llama import translate, weight_names  # noqa: F401  (same tensor layout)

MODEL_TYPES = ("smollm3",)


def config_from_hf(hf: dict) -> ModelConfig:
    layers = hf["num_hidden_layers"]
    interval = hf.get("no_rope_layer_interval", 4)
    # transformers' no_rope_layers holds 1 for a layer WITH rope, 0 for a NoPE layer
    uses_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    layer_types = tuple(hf.get("layer_types") or ())
    if not layer_types:
        layer_types = tuple(
            "sliding_attention" if window is not None and not uses_rope[i] else "full_attention"
            for i in range(layers)
        )
    return translate(
        hf,
        nope_layers=tuple(i for i in range(layers) if not uses_rope[i]),
        sliding_window=window,
        layer_types=layer_types,
    )
