"""Qwen3.5-MoE (text model; the multimodal checkpoint's text tower through
fnlm.models.multimodal): Qwen3.5's hybrid layers (fnlm/models/qwen3_5.py) with a mixture of
experts on every layer — softmax router, top-k renormalized — plus a shared expert gated by
sigmoid(shared_expert_gate x), as Qwen2-MoE (fnlm/models/moe.py runs the experts)."""

from __future__ import annotations

from fnlm.config import ModelConfig, hf_text
from fnlm.models import llama, qwen2_moe, qwen3_5

MODEL_TYPES = ("qwen3_5_moe_text",)

PEFT_LAYER_ORDER = qwen3_5.PEFT_LAYER_ORDER
PEFT_BIAS_ALL = qwen3_5.PEFT_BIAS_ALL
cache_shape = qwen3_5.cache_shape
checkpoint_stream = qwen3_5.checkpoint_stream
# No PEFT_EXPERT_NAMES: transformers maps no conversion pattern to qwen3_5_moe_text itself, so
# peft 0.21 adapts its shared expert as linear layers and reaches its experts only through
# explicit target_parameters (as for Qwen2-MoE).


def config_from_hf(hf: dict) -> ModelConfig:
    experts = llama.require(hf, "num_experts")
    expert_size = llama.require(hf, "moe_intermediate_size")
    # transformers' config has no intermediate_size (no dense MLP): the experts' width stands in
    config = qwen3_5.translate(
        {**hf, "intermediate_size": hf.get("intermediate_size") or expert_size},
        num_experts=experts,
        experts_per_token=llama.require(hf, "num_experts_per_tok"),
        moe_intermediate_size=expert_size,
        moe_layers=tuple(range(hf["num_hidden_layers"])),
        moe_renormalize=True,
        shared_expert_size=hf.get("shared_expert_intermediate_size") or 0,
    )
    return config.replace(hf_config=hf_text(hf))


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Qwen3.5's names; each layer's MLP is a router ("mlp.gate"), experts and a shared expert."""
    return qwen2_moe.shared_expert_names(config, qwen3_5.weight_names(config))
