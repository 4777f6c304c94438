"""OLMo 3: OLMo 2's block (norms after attention and MLP, q/k RMSNorm over all heads) with three
sliding-window layers per full one, each layer type with its own rope parameters (the long-context
scaling applies to the full layers only)."""

from fnlm.config import ModelConfig
from fnlm.models import gemma2, gemma3, olmo2

MODEL_TYPES = ("olmo3",)

DEFAULT_THETA = 500000.0  # transformers' Olmo3Config.default_theta


def config_from_hf(hf: dict) -> ModelConfig:
    theta = hf.get("rope_theta", DEFAULT_THETA)
    # Gemma 3's per-layer-type rope: v5's rope_parameters per type, or v4's rope_theta for both
    # types and rope_scaling for the full layers
    rope = gemma3.rope_fields({**hf, "rope_theta": theta, "rope_local_base_freq": theta})
    window = hf.get("sliding_window", 4096)
    return olmo2.config_from_hf(hf).replace(
        sliding_window=window,
        layer_types=gemma2.layer_types(hf, 4) if window is not None else (),
        **rope,
    )


weight_names = olmo2.weight_names
