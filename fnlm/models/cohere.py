"""Cohere Command-R: LayerNorm without bias, attention and MLP in parallel from one norm, rotary on
interleaved pairs, logits times logit_scale, optional per-head LayerNorm of q and k."""

from fnlm.config import ModelConfig
from fnlm.models import llama

MODEL_TYPES = ("cohere",)


def config_from_hf(hf: dict) -> ModelConfig:
    return llama.translate(
        hf,
        norm_type="layer",
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        parallel_block=True,
        rope_interleaved=True,
        logit_scale=float(hf.get("logit_scale", 0.0625)),
        qk_norm=bool(hf.get("use_qk_norm", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **llama.rope_fields(
            {**hf, "rope_theta": hf.get("rope_theta", 500000.0)}
        ),  # Cohere's default base
    )


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Llama's names without the second norm; q/k norm weights are per head [heads, head_dim]."""
    names = llama.weight_names(config)
    d = config.head_dim
    for n in range(config.num_layers):
        pre = f"model.layers.{n}."
        del names[pre + "post_attention_layernorm.weight"]
        if config.qk_norm:
            q_norm, k_norm = ("layers", n, "attn", "q_norm"), ("layers", n, "attn", "k_norm")
            names[pre + "self_attn.q_norm.weight"] = (q_norm, (config.num_heads, d))
            names[pre + "self_attn.k_norm.weight"] = (k_norm, (config.num_kv_heads, d))
    return names
