"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (`glm4_moe`): Llama's block with q/k/v biases (attention_bias;
never on o), optional per-head q/k RMSNorm (use_qk_norm) and partial rotary (half of head_dim by
default, rotating halves as Llama, not GLM-4's interleaved pairs); dense MLPs on the first
first_k_dense_replace layers, then mixture-of-experts MLPs routed as DeepSeek-V3 routes (sigmoid
scores + the router's correction bias choose, group-limited top-k, weights from the uncorrected
scores times routed_scaling_factor: fnlm.models.moe.sigmoid_topk) plus an ungated shared expert
(n_shared_experts experts as one MLP). The checkpoints' multi-token-prediction layers
(model.layers.{num_hidden_layers}.*) are skipped, as transformers skips them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from fnlm.config import ModelConfig, hf_text
from fnlm.errors import ConfigError
from fnlm.models import llama
from fnlm.models.mixtral import moe_names
from fnlm.models.qwen3_moe import QWEN_EXPERTS

MODEL_TYPES = ("glm4_moe",)

# Read by fnlm.lora: transformers maps glm4_moe to the qwen2_moe conversion pattern, so peft 0.21
# rewrites per-expert targets into target_parameters on the fused experts (and, as for Qwen3-MoE,
# then reaches neither the shared expert nor the dense MLPs); Glm4MoeMoE creates its experts
# before its router.
PEFT_EXPERT_NAMES = QWEN_EXPERTS
PEFT_PARAMETER_ORDER = ("gate_up", "down", "router")
LEGACY_EXPERTS = ("mlp", QWEN_EXPERTS)


def config_from_hf(hf: dict) -> ModelConfig:
    layers = llama.require(hf, "num_hidden_layers")
    first_sparse = hf.get("first_k_dense_replace", 1)
    bias = bool(hf.get("attention_bias", False))
    # transformers' default partial rotary is 0.5 when config.json names none
    rope = {"partial_rotary_factor": hf.get("partial_rotary_factor", 0.5)}
    rope |= hf.get("rope_parameters") or {}
    return llama.translate(
        {**hf, "rope_parameters": rope},
        qk_norm=bool(hf.get("use_qk_norm", False)),
        attention_bias=bias,
        o_bias=False,
        hf_config=hf_text(hf),
        **moe_fields(hf, tuple(range(first_sparse, layers))),
    )


# transformers' Glm4MoeConfig defaults for the router keys a config.json may leave out
# (DeepseekV3Config's differ: fnlm.models.deepseek_v3 passes its own)
ROUTER_DEFAULTS = {"n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0}


def moe_fields(hf: dict, layers: tuple[int, ...], defaults: dict = ROUTER_DEFAULTS) -> dict:
    """ModelConfig's MoE fields for the sparse `layers`, as DeepSeek-V3's TopkRouter (which
    GLM-4.5 took over) reads them: sigmoid, group-limited top-k (fnlm.models.moe.sigmoid_topk)
    and n_shared_experts ungated experts; the router keys config.json lacks take `defaults`."""
    size = llama.require(hf, "moe_intermediate_size")
    shared = hf.get("n_shared_experts", 1)
    if not shared:  # transformers would build a zero-width shared MLP
        raise ConfigError(f"{hf.get('model_type')} with n_shared_experts 0 is not supported")
    router = {key: hf.get(key, default) for key, default in defaults.items()}
    return dict(
        num_experts=llama.require(hf, "n_routed_experts"),
        experts_per_token=llama.require(hf, "num_experts_per_tok"),
        moe_intermediate_size=size,
        moe_layers=layers,
        moe_renormalize=bool(hf.get("norm_topk_prob", True)),
        shared_expert_size=shared * size,
        moe_scoring="sigmoid",
        moe_groups=router["n_group"] or 1,
        moe_topk_groups=router["topk_group"] or 1,
        moe_routed_scale=float(router["routed_scaling_factor"]),
    )


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Llama's names; each sparse layer's MLP is a router ("mlp.gate" with its
    e_score_correction_bias), per-expert matrices and the shared experts ("mlp.shared_experts")."""
    names = llama.weight_names(config)
    h, s = config.hidden_size, config.shared_expert_size
    for n in config.moe_layers:
        pre = f"model.layers.{n}.mlp."
        names = {k: v for k, v in names.items() if not k.startswith(pre)}
        names |= moe_names(config, n, pre, QWEN_EXPERTS, "gate.weight")
        correction = ("layers", n, "mlp", "router_correction")
        names[pre + "gate.e_score_correction_bias"] = (correction, (config.num_experts,))
        for hf_name, ours in QWEN_EXPERTS.items():
            shape = (h, s) if ours == "down" else (s, h)
            path = ("layers", n, "mlp", "shared", ours)
            names[f"{pre}shared_experts.{hf_name}.weight"] = (path, shape)
    return names


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def checkpoint_stream(stream: Iterator, config: ModelConfig) -> Iterator:
    """The loader's (name, tensor, file) stream without the multi-token-prediction layers
    (numbered num_hidden_layers and up: GLM-4.5's layer 92, GLM-4.5-Air's 46)."""
    for name, tensor, file in stream:
        found = _LAYER.match(name)
        if found is None or int(found.group(1)) < config.num_layers:
            yield name, tensor, file
