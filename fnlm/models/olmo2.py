"""OLMo 2: norms after attention and MLP instead of before, RMSNorm of q and k over all heads at once."""

from fnlm.config import ModelConfig
from fnlm.models import llama

MODEL_TYPES = ("olmo2",)


def config_from_hf(hf: dict) -> ModelConfig:
    return llama.translate(
        hf, qk_norm=True, qk_norm_across_heads=True, pre_norms=False, post_norms=True
    )


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    names = llama.weight_names(config)
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    for n in range(config.num_layers):
        pre = f"model.layers.{n}."
        del names[pre + "input_layernorm.weight"]
        names[pre + "post_attention_layernorm.weight"] = (("layers", n, "norm_attn_post"), (h,))
        names[pre + "post_feedforward_layernorm.weight"] = (("layers", n, "norm_mlp_post"), (h,))
        names[pre + "self_attn.q_norm.weight"] = (("layers", n, "attn", "q_norm"), (q,))
        names[pre + "self_attn.k_norm.weight"] = (("layers", n, "attn", "k_norm"), (kv,))
    return names
