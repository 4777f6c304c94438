"""Gemma 2: Gemma plus pre- and post-norms around attention and MLP, attention-score and final-logit
soft-capping, query scale 1/sqrt(query_pre_attn_scalar), sliding window on alternate layers."""

from fnlm.config import ModelConfig
from fnlm.models import llama
from fnlm.models.gemma import gemma_fields

MODEL_TYPES = ("gemma2",)


def layer_types(hf: dict, pattern: int) -> tuple[str, ...]:
    """transformers' default: layer i slides unless (i + 1) is a multiple of `pattern`."""
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    return tuple(
        "sliding_attention" if (i + 1) % pattern else "full_attention"
        for i in range(hf["num_hidden_layers"])
    )


def config_from_hf(hf: dict) -> ModelConfig:
    config = llama.translate(
        hf,
        activation="silu",
        post_norms=True,
        attention_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
        attention_softcap=hf.get("attn_logit_softcapping", 50.0),
        final_softcap=hf.get("final_logit_softcapping", 30.0),
        sliding_window=hf.get("sliding_window", 4096),
        layer_types=layer_types(hf, 2),
        **gemma_fields(hf),
    )
    return config.replace(activation=hf.get("hidden_activation") or "gelu_pytorch_tanh")


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Llama's names, except that post_attention_layernorm norms the attention output and the MLP
    has its own pre_feedforward / post_feedforward norms."""
    names = llama.weight_names(config)
    h = (config.hidden_size,)
    for n in range(config.num_layers):
        pre = f"model.layers.{n}."
        names[pre + "post_attention_layernorm.weight"] = (("layers", n, "norm_attn_post"), h)
        names[pre + "pre_feedforward_layernorm.weight"] = (("layers", n, "norm_mlp"), h)
        names[pre + "post_feedforward_layernorm.weight"] = (("layers", n, "norm_mlp_post"), h)
    return names
