"""Llama (and SmolLM2, Llama 3.x): the base translation that Llama-like families extend."""

from __future__ import annotations

from typing import Any

from fnlm.config import ModelConfig, freeze, hf_text
from fnlm.errors import ConfigError

MODEL_TYPES = ("llama",)


def require(hf: dict, key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"config.json of model_type {hf.get('model_type')!r} has no {key!r}")
    return hf[key]


def rope_fields(hf: dict) -> dict:
    """rope_theta and the frozen scaling parameters, from transformers v5 `rope_parameters` or v4
    `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    params.pop("partial_rotary_factor", None)
    params = {**legacy, **params}
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    if params.get("rope_type", "default") == "default" and len(params) <= 1:
        params = {}
    return {"rope_theta": float(theta), "rope_scaling": freeze(params)}


def token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def translate(hf: dict, **overrides: Any) -> ModelConfig:
    """The fields every Llama-like config.json shares; families pass their extra flags."""
    hidden, heads = require(hf, "hidden_size"), require(hf, "num_attention_heads")
    fields = dict(
        model_type=hf["model_type"],
        vocab_size=require(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=require(hf, "intermediate_size"),
        num_layers=require(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        attention_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=hf.get("hidden_act", "silu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
        partial_rotary_factor=float(
            (hf.get("rope_parameters") or {}).get(
                "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)
            )
        ),
        hf_config=hf_text(hf),
        **rope_fields(hf),
    )
    fields.update(overrides)
    if fields["activation"] != "silu":
        raise ConfigError(
            f"hidden_act {fields['activation']!r} is not supported for {hf['model_type']}; expected 'silu'"
        )
    return ModelConfig(**fields)


def config_from_hf(hf: dict) -> ModelConfig:
    return translate(hf)


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """HF tensor name -> (our param path, expected shape), for the Llama layout."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    names = {
        "model.embed_tokens.weight": (("embed",), (config.vocab_size, h)),
        "model.norm.weight": (("norm",), (h,)),
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head",), (config.vocab_size, h))
    for n in range(config.num_layers):
        pre = f"model.layers.{n}."
        layer = {
            "input_layernorm.weight": (("norm_attn",), (h,)),
            "post_attention_layernorm.weight": (("norm_mlp",), (h,)),
            "self_attn.q_proj.weight": (("attn", "q"), (q, h)),
            "self_attn.k_proj.weight": (("attn", "k"), (kv, h)),
            "self_attn.v_proj.weight": (("attn", "v"), (kv, h)),
            "self_attn.o_proj.weight": (("attn", "o"), (h, q)),
            "mlp.gate_proj.weight": (("mlp", "gate"), (i, h)),
            "mlp.up_proj.weight": (("mlp", "up"), (i, h)),
            "mlp.down_proj.weight": (("mlp", "down"), (h, i)),
        }
        if config.attention_bias:
            layer["self_attn.q_proj.bias"] = (("attn", "q_bias"), (q,))
            layer["self_attn.k_proj.bias"] = (("attn", "k_bias"), (kv,))
            layer["self_attn.v_proj.bias"] = (("attn", "v_bias"), (kv,))
        if config.o_bias:
            layer["self_attn.o_proj.bias"] = (("attn", "o_bias"), (h,))
        if config.mlp_bias:
            layer["mlp.gate_proj.bias"] = (("mlp", "gate_bias"), (i,))
            layer["mlp.up_proj.bias"] = (("mlp", "up_bias"), (i,))
            layer["mlp.down_proj.bias"] = (("mlp", "down_bias"), (h,))
        if config.qk_norm:
            layer["self_attn.q_norm.weight"] = (("attn", "q_norm"), (d,))
            layer["self_attn.k_norm.weight"] = (("attn", "k_norm"), (d,))
        for name, (path, shape) in layer.items():
            names[pre + name] = (("layers", n, *path), shape)
    return names
