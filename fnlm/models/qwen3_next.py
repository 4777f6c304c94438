"""Qwen3-Next (Qwen3-Next-80B-A3B): Qwen3.5's hybrid layers (fnlm/models/qwen3_5.py: gated
DeltaNet linear attention, every `full_attention_interval`-th layer gated full attention, (1 + w)
RMSNorms, partial rotary) with the DeltaNet's input projections fused into in_proj_qkvz and
in_proj_ba, grouped per key head (kept fused, as peft adapts them; fnlm/models/deltanet.py
regroups them), and a mixture of experts — softmax router, top-k renormalized by norm_topk_prob,
plus a shared expert gated by sigmoid(shared_expert_gate x) — on the layers decoder_sparse_step
selects (dense MLPs on mlp_only_layers), as Qwen2-MoE / Qwen3-MoE."""

from __future__ import annotations

from fnlm.config import ModelConfig
from fnlm.models import qwen2_moe, qwen3_5
from fnlm.models.deltanet import LINEAR, sizes
from fnlm.models.qwen3_moe import QWEN_EXPERTS, moe_fields

MODEL_TYPES = ("qwen3_next",)

# Read by fnlm.lora: the order transformers creates a layer's modules in (peft draws initial
# adapters in it): attention, or Qwen3NextGatedDeltaNet's conv1d, in_proj_qkvz, in_proj_ba,
# norm, out_proj; then the MLP, or the MoE block's router, experts, shared expert and its gate.
PEFT_LAYER_ORDER = (
    "attn", "mlp", "q", "k", "v", "o", "conv", "in_qkvz", "in_ba", "out",
    "router", "experts", "shared", "shared_gate", "gate", "up", "down",
)  # fmt: skip
# transformers maps qwen3_next to Qwen2-MoE's conversion pattern, so peft 0.21 rewrites the
# gate_proj / up_proj / down_proj targets into target_parameters on the expert stacks (and then
# adapts neither the shared expert nor the dense MLPs); the router comes before the experts
# (fnlm.lora's default parameter order). Adapters trained under transformers 4 name each
# expert's Linear under "mlp".
PEFT_EXPERT_NAMES = QWEN_EXPERTS
LEGACY_EXPERTS = ("mlp", QWEN_EXPERTS)
PEFT_BIAS_ALL = qwen3_5.PEFT_BIAS_ALL  # peft's bias="all" would train the DeltaNet's dt_bias
cache_shape = qwen3_5.cache_shape
checkpoint_stream = qwen3_5.checkpoint_stream  # the multi-token-prediction "mtp.*" skipped


# transformers' Qwen3NextConfig defaults for the MoE keys a config.json may leave out (Qwen3-MoE's,
# which moe_fields assumes, differ: no experts, norm_topk_prob False)
MOE_DEFAULTS = {
    "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "norm_topk_prob": True,
}  # fmt: skip


def config_from_hf(hf: dict) -> ModelConfig:
    moe = {**MOE_DEFAULTS, **hf}
    return qwen3_5.translate(
        hf, shared_expert_size=moe["shared_expert_intermediate_size"] or 0, **moe_fields(moe)
    )


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Qwen3.5's names with each DeltaNet's in_proj_qkv / _z / _b / _a replaced by the fused
    in_proj_qkvz and in_proj_ba; each MoE layer's MLP is a router ("mlp.gate"), experts and a
    shared expert."""
    names = qwen3_5.weight_names(config)
    n, h = sizes(config), config.hidden_size
    fused = {
        "in_proj_qkvz": ("in_qkvz", n.conv_dim + n.value_heads * n.value_dim),
        "in_proj_ba": ("in_ba", 2 * n.value_heads),
    }
    for i, kind in enumerate(config.layer_types):
        if kind != LINEAR:
            continue
        pre = f"model.layers.{i}.linear_attn."
        for part in ("qkv", "z", "b", "a"):
            del names[f"{pre}in_proj_{part}.weight"]
        for name, (leaf, rows) in fused.items():
            names[f"{pre}{name}.weight"] = (("layers", i, "attn", leaf), (rows, h))
    return qwen2_moe.shared_expert_names(config, names)
