"""Mixtral: Mistral whose MLP is a mixture of experts: softmax router, top-k, weights renormalized."""

from fnlm.config import ModelConfig
from fnlm.models import llama

MODEL_TYPES = ("mixtral",)

# transformers 4's MoE block and per-expert Linear names (the checkpoint's) -> fnlm's parts.
MOE_BLOCK = "block_sparse_moe"
EXPERT_NAMES = {"w1": "gate", "w3": "up", "w2": "down"}
# Read by fnlm.lora: peft 0.21 rewrites these per-expert targets into target_parameters on
# transformers 5's fused experts; adapters trained under transformers 4 name each expert's Linear.
PEFT_EXPERT_NAMES = EXPERT_NAMES
LEGACY_EXPERTS = (MOE_BLOCK, EXPERT_NAMES)


def config_from_hf(hf: dict) -> ModelConfig:
    return llama.translate(
        hf,
        attention_bias=False,
        o_bias=False,
        sliding_window=hf.get("sliding_window"),
        num_experts=llama.require(hf, "num_local_experts"),
        experts_per_token=llama.require(hf, "num_experts_per_tok"),
        moe_layers=tuple(range(hf["num_hidden_layers"])),
        moe_renormalize=True,
    )


def moe_names(
    config: ModelConfig, layer: int, prefix: str, experts: dict[str, str], router: str
) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Router and per-expert names of one MoE layer: params["layers"][n]["mlp"]["experts"][e][w]."""
    h, i = config.hidden_size, config.expert_size
    shapes = {"gate": (i, h), "up": (i, h), "down": (h, i)}
    names = {prefix + router: (("layers", layer, "mlp", "router"), (config.num_experts, h))}
    for e in range(config.num_experts):
        for hf_name, ours in experts.items():
            path = ("layers", layer, "mlp", "experts", e, ours)
            names[f"{prefix}experts.{e}.{hf_name}.weight"] = (path, shapes[ours])
    return names


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    names = {k: v for k, v in llama.weight_names(config).items() if ".mlp." not in k}
    for n in range(config.num_layers):
        names |= moe_names(
            config,
            n,
            f"model.layers.{n}.{MOE_BLOCK}.",
            EXPERT_NAMES,
            "gate.weight",
        )
    return names
