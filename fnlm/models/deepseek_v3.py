"""DeepSeek-V3 / R1 and Kimi-K2 (transformers' deepseek_v3): multi-head latent attention
(fnlm/models/mla.py: low-rank q and a compressed kv expanded per head, rotary on a separate rope
part of q and k, v heads narrower than q/k heads), dense SwiGLU MLPs on the first
`first_k_dense_replace` layers and mixtures of experts on the rest.

ModelConfig's head_dim is q/k's nope + rope width, num_kv_heads the heads (kv_b_proj makes a key
and a value per head); `latent_attention` holds the MLA sizes and sets rotary_dim to the rope
part. Sparse layers route as DeepseekV3TopkRouter: sigmoid scores plus the router's correction
bias choose experts in group-limited top-k, weighted by the uncorrected scores (renormalized with
norm_topk_prob) times routed_scaling_factor; the n_shared_experts shared experts run as one
ungated MLP beside them (fnlm.models.moe). The softmax scale is head_dim^-1/2, times
mscale(factor, mscale_all_dim)^2 when the rope is scaled (transformers' yarn_apply_mscale).
Multi-token-prediction layers past num_hidden_layers (DeepSeek-V3's "model.layers.61.*") are
skipped on load, as transformers ignores them.
"""

from __future__ import annotations

import math

from fnlm.config import ModelConfig, hf_text
from fnlm.errors import ConfigError, UnsupportedModelError
from fnlm.models import glm4_moe, llama
from fnlm.models.mla import cache_width, sizes
from fnlm.models.qwen3_moe import QWEN_EXPERTS

MODEL_TYPES = ("deepseek_v3",)

# Read by fnlm.lora: the order transformers creates a layer's modules in (peft draws initial
# adapters in it): DeepseekV3Attention's q_proj or q_a_proj, q_b_proj, then kv_a_proj_with_mqa,
# kv_b_proj, o_proj; then the MLP.
PEFT_LAYER_ORDER = (
    "attn", "mlp", "q", "q_a", "q_b", "kv_a", "kv_b", "o",
    "experts", "router", "shared", "gate", "up", "down",
)  # fmt: skip
# transformers maps deepseek_v3 to the qwen2_moe conversion pattern, so peft 0.21 rewrites the
# MLP targets (gate_proj, up_proj, down_proj) into target_parameters on the fused experts and then
# reaches neither the shared experts nor the dense MLPs (all-dense configs too); DeepseekV3MoE
# creates its experts before its router.
PEFT_EXPERT_NAMES = QWEN_EXPERTS
PEFT_PARAMETER_ORDER = ("gate_up", "down", "router")
LEGACY_EXPERTS = ("mlp", QWEN_EXPERTS)


# transformers' DeepseekV3Config defaults for the router keys a config.json may leave out
ROUTER_DEFAULTS = {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}


def mscale(factor: float, scale: float) -> float:
    """YaRN's attention-temperature factor (transformers' yarn_get_mscale)."""
    return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0


def config_from_hf(hf: dict) -> ModelConfig:
    method = (hf.get("quantization_config") or {}).get("quant_method")
    if method is not None:
        raise UnsupportedModelError(
            f"deepseek_v3 checkpoints quantized with {method!r} (quantization_config; DeepSeek-V3, "
            "R1 and Kimi-K2 ship FP8 weights with *.weight_scale_inv block scales) are not "
            "supported: dequantize them to bf16 first (DeepSeek's inference/fp8_cast_bf16.py), "
            "then fnlm.load(quant='nf4') quantizes on loading"
        )
    heads = llama.require(hf, "num_attention_heads")
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise ConfigError(
            f"num_key_value_heads ({kv_heads}) must equal num_attention_heads ({heads}) for "
            "deepseek_v3: kv_b_proj expands the latent into a key and a value for every head"
        )
    latent = (
        hf.get("q_lora_rank", 1536) or 0,  # null: a plain q projection; absent: the default
        llama.require(hf, "kv_lora_rank"),
        llama.require(hf, "qk_nope_head_dim"),
        llama.require(hf, "qk_rope_head_dim"),
        llama.require(hf, "v_head_dim"),
    )
    layers = llama.require(hf, "num_hidden_layers")
    first_sparse = hf.get("first_k_dense_replace", 3)
    sparse = tuple(range(first_sparse, layers))
    moe = glm4_moe.moe_fields(hf, sparse, ROUTER_DEFAULTS) if first_sparse < layers else {}
    head_dim = latent[2] + latent[3]
    config = llama.translate(
        {**hf, "head_dim": head_dim},
        num_kv_heads=heads,
        latent_attention=latent,
        rope_interleaved=bool(hf.get("rope_interleave", True)),
        hf_config=hf_text(hf),  # exports write transformers' head_dim (the rope part's) back
        **moe,
    )
    scale = head_dim**-0.5
    rope = config.rope
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        scale *= mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
    return config.replace(attention_scale=scale)


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """GLM-4.5's names (fnlm.models.glm4_moe: Llama's, and on the sparse layers the router with
    its e_score_correction_bias, per-expert matrices and shared_experts — DeepSeek-V3's layout,
    which GLM-4.5 took over) with MLA's projections (fnlm/models/mla.py) in place of q/k/v/o."""
    names = {k: v for k, v in glm4_moe.weight_names(config).items() if ".self_attn." not in k}
    n, h, heads = sizes(config), config.hidden_size, config.num_heads
    q_rows = heads * (n.nope + n.rope)
    for i in range(config.num_layers):
        layer = {
            "kv_a_proj_with_mqa.weight": ("kv_a", (n.kv_rank + n.rope, h)),
            "kv_a_layernorm.weight": ("kv_a_norm", (n.kv_rank,)),
            "kv_b_proj.weight": ("kv_b", (heads * (n.nope + n.value), n.kv_rank)),
            "o_proj.weight": ("o", (h, heads * n.value)),
        }
        if n.q_rank:
            layer["q_a_proj.weight"] = ("q_a", (n.q_rank, h))
            layer["q_a_layernorm.weight"] = ("q_a_norm", (n.q_rank,))
            layer["q_b_proj.weight"] = ("q_b", (q_rows, n.q_rank))
        else:
            layer["q_proj.weight"] = ("q", (q_rows, h))
        if config.attention_bias:  # transformers: on q_a, kv_a and o (never q_b, kv_b, q)
            if n.q_rank:
                layer["q_a_proj.bias"] = ("q_a_bias", (n.q_rank,))
            layer["kv_a_proj_with_mqa.bias"] = ("kv_a_bias", (n.kv_rank + n.rope,))
            layer["o_proj.bias"] = ("o_bias", (h,))
        for name, (leaf, shape) in layer.items():
            names[f"model.layers.{i}.self_attn.{name}"] = (("layers", i, "attn", leaf), shape)
    return names


def cache_shape(config: ModelConfig, layer: int) -> tuple[int, int]:
    """(heads, width) of one layer's KV cache: decompressed keys and values per head, padded to
    one width (fnlm.models.mla)."""
    return config.num_heads, cache_width(config)


# the multi-token-prediction layers (numbered num_hidden_layers and up) skipped as GLM-4.5's
checkpoint_stream = glm4_moe.checkpoint_stream
