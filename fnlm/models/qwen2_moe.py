"""Qwen2-MoE (Qwen1.5-MoE): Qwen2 attention (qkv bias) with mixture-of-experts MLPs plus a shared
expert gated by sigmoid(shared_expert_gate x)."""

from fnlm.config import ModelConfig
from fnlm.models import llama
from fnlm.models.mixtral import moe_names
from fnlm.models.qwen3_moe import QWEN_EXPERTS, moe_fields

MODEL_TYPES = ("qwen2_moe",)

# Read by fnlm.lora: adapters trained under transformers 4 name each expert's Linear under "mlp".
# No PEFT_EXPERT_NAMES: transformers maps no conversion pattern to qwen2_moe itself, so peft 0.21
# adapts its shared expert and dense MLPs as plain linear layers and reaches its experts only
# through explicit target_parameters.
LEGACY_EXPERTS = ("mlp", QWEN_EXPERTS)


def sliding_fields(hf: dict) -> dict:
    """transformers' Qwen2-MoE rule: with use_sliding_window, even layers below max_window_layers slide."""
    layers = hf["num_hidden_layers"]
    if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        return {"sliding_window": None, "layer_types": ()}
    below = hf.get("max_window_layers", layers)
    slides = [(i + 1) % 2 == 1 and i < below for i in range(layers)]
    types = hf.get("layer_types") or [
        "sliding_attention" if s else "full_attention" for s in slides
    ]
    return {"sliding_window": hf["sliding_window"], "layer_types": tuple(types)}


def config_from_hf(hf: dict) -> ModelConfig:
    return llama.translate(
        hf,
        attention_bias=bool(hf.get("qkv_bias", True)),
        o_bias=False,
        shared_expert_size=hf.get("shared_expert_intermediate_size") or 0,
        **sliding_fields(hf),
        **moe_fields(hf),
    )


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    return shared_expert_names(config, llama.weight_names(config))


def shared_expert_names(
    config: ModelConfig, names: dict[str, tuple[tuple, tuple[int, ...]]]
) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """`names` with each MoE layer's MLP replaced by a router ("mlp.gate"), the experts and a
    shared expert gated by "mlp.shared_expert_gate" (Qwen2-MoE's layout, Qwen3.5-MoE's too)."""
    h, s = config.hidden_size, config.shared_expert_size
    for n in config.moe_layers:
        pre = f"model.layers.{n}.mlp."
        names = {k: v for k, v in names.items() if not k.startswith(pre)}
        names |= moe_names(config, n, pre, QWEN_EXPERTS, "gate.weight")
        # transformers always builds the shared expert, so checkpoints always carry it
        for hf_name, ours in QWEN_EXPERTS.items():
            shape = (h, s) if ours == "down" else (s, h)
            path = ("layers", n, "mlp", "shared", ours)
            names[f"{pre}shared_expert.{hf_name}.weight"] = (path, shape)
        names[pre + "shared_expert_gate.weight"] = (("layers", n, "mlp", "shared_gate"), (1, h))
    return names
