"""Falcon: LayerNorm with bias, attention and an ungated GELU MLP in parallel, one fused qkv weight
whose rows are grouped per kv head. The three layouts transformers handles are one rule here:
multi-query ([q heads, k, v]: one group), the original multi-head ([q, k, v] per head: a group per
head) and the new decoder architecture (Falcon-40B/180B: [q heads of the group, k, v] per kv group,
with separate attention and MLP norms)."""

from fnlm.config import ModelConfig, hf_text
from fnlm.errors import UnsupportedModelError
from fnlm.models import llama

MODEL_TYPES = ("falcon",)


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("alibi"):
        raise UnsupportedModelError(
            "falcon with alibi position biases (Falcon-RW) is not supported; fnlm implements rotary "
            "Falcon models (alibi: false)"
        )
    heads, hidden = llama.require(hf, "num_attention_heads"), llama.require(hf, "hidden_size")
    new_layout = bool(hf.get("new_decoder_architecture", False))
    if new_layout:
        kv_heads = hf.get("num_kv_heads") or heads
        if hf.get("num_ln_in_parallel_attn") == 1 and not hf.get("parallel_attn", True):
            raise UnsupportedModelError(
                "falcon with new_decoder_architecture, num_ln_in_parallel_attn=1 and "
                "parallel_attn=false has no MLP norm in transformers either; not supported"
            )
    elif hf.get("multi_query", True):
        kv_heads = 1
    else:
        kv_heads = heads
        if hf.get("num_kv_heads") not in (None, heads):
            raise UnsupportedModelError(
                f"falcon without multi_query stores one k, v per head; num_kv_heads "
                f"{hf['num_kv_heads']} != num_attention_heads {heads} is not supported"
            )
    bias = bool(hf.get("bias", False))
    return ModelConfig(
        model_type="falcon",
        vocab_size=llama.require(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=hf.get("ffn_hidden_size") or 4 * hidden,
        num_layers=llama.require(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        attention_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        fused_qkv_grouped=True,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_type="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        parallel_block=new_layout or bool(hf.get("parallel_attn", True)),
        activation=hf.get("activation", "gelu"),
        mlp_gated=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=llama.token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
        hf_config=hf_text(hf),
        **llama.rope_fields(hf),
    )


def layer_norm_names(config: ModelConfig) -> dict[str, str]:
    """HF norm module -> our norm name, for the layout the config describes."""
    hf = config.hf_dict()
    if hf.get("new_decoder_architecture") and hf.get("num_ln_in_parallel_attn") in (None, 2):
        return {"ln_attn": "norm_attn", "ln_mlp": "norm_mlp"}
    if config.parallel_block:
        return {"input_layernorm": "norm_attn"}
    return {"input_layernorm": "norm_attn", "post_attention_layernorm": "norm_mlp"}


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    qkv = (config.num_heads + 2 * config.num_kv_heads) * d
    names = {
        "transformer.word_embeddings.weight": (("embed",), (config.vocab_size, h)),
        "transformer.ln_f.weight": (("norm",), (h,)),
        "transformer.ln_f.bias": (("norm_bias",), (h,)),
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head",), (config.vocab_size, h))
    for n in range(config.num_layers):
        layer = {
            "self_attention.query_key_value.weight": (("attn", "qkv"), (qkv, h)),
            "self_attention.dense.weight": (("attn", "o"), (h, h)),
            "mlp.dense_h_to_4h.weight": (("mlp", "up"), (i, h)),
            "mlp.dense_4h_to_h.weight": (("mlp", "down"), (h, i)),
        }
        if config.attention_bias:
            layer["self_attention.query_key_value.bias"] = (("attn", "qkv_bias"), (qkv,))
            layer["self_attention.dense.bias"] = (("attn", "o_bias"), (h,))
            layer["mlp.dense_h_to_4h.bias"] = (("mlp", "up_bias"), (i,))
            layer["mlp.dense_4h_to_h.bias"] = (("mlp", "down_bias"), (h,))
        for hf_name, ours in layer_norm_names(config).items():
            layer[f"{hf_name}.weight"] = ((ours,), (h,))
            layer[f"{hf_name}.bias"] = ((ours + "_bias",), (h,))
        for name, (path, shape) in layer.items():
            names[f"transformer.h.{n}.{name}"] = (("layers", n, *path), shape)
    return names
