"""Qwen3-MoE: Qwen3 attention (q/k norm) with mixture-of-experts MLPs on the layers
decoder_sparse_step selects (dense MLPs on mlp_only_layers); norm_topk_prob renormalizes."""

from fnlm.config import ModelConfig
from fnlm.models import llama
from fnlm.models.mixtral import moe_names

MODEL_TYPES = ("qwen3_moe",)

QWEN_EXPERTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
# Read by fnlm.lora: peft 0.21 rewrites these per-expert targets into target_parameters on
# transformers 5's fused experts, visiting the experts' parameters before the router (created
# after them); adapters trained under transformers 4 name each expert's Linear under "mlp".
PEFT_EXPERT_NAMES = QWEN_EXPERTS
PEFT_PARAMETER_ORDER = ("gate_up", "down", "router")
LEGACY_EXPERTS = ("mlp", QWEN_EXPERTS)


def moe_fields(hf: dict) -> dict:
    """Expert counts and the sparse layers, as transformers' Qwen MoE decoder layers pick them."""
    experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    layers = tuple(
        i
        for i in range(hf["num_hidden_layers"])
        if i not in dense and experts > 0 and (i + 1) % step == 0
    )
    return dict(
        num_experts=experts,
        experts_per_token=llama.require(hf, "num_experts_per_tok") if experts else 0,
        moe_intermediate_size=hf.get("moe_intermediate_size"),
        moe_layers=layers,
        moe_renormalize=bool(hf.get("norm_topk_prob", False)),
    )


def config_from_hf(hf: dict) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return llama.translate(
        hf, qk_norm=True, attention_bias=bias, o_bias=bias, sliding_window=window, **moe_fields(hf)
    )


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Llama's names; the MLP of each sparse layer is a router ("mlp.gate") and experts."""
    names = llama.weight_names(config)
    for n in config.moe_layers:
        pre = f"model.layers.{n}.mlp."
        names = {k: v for k, v in names.items() if not k.startswith(pre)}
        names |= moe_names(config, n, pre, QWEN_EXPERTS, "gate.weight")
    return names
