"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama with fused qkv and gate_up weights, kept fused (peft adapts
them as one module) and sliced by the decoder; LongRoPE; a sliding window on every layer if set."""

from fnlm.config import ModelConfig, freeze
from fnlm.models import llama

MODEL_TYPES = ("phi3",)

# Read by fnlm.lora: the order transformers creates a layer's modules in (o_proj before qkv_proj),
# which is the order peft draws their initial adapters in.
PEFT_LAYER_ORDER = ("attn", "mlp", "o", "qkv", "gate_up", "down")


def config_from_hf(hf: dict) -> ModelConfig:
    config = llama.translate(
        hf,
        attention_bias=False,
        o_bias=False,
        mlp_bias=False,
        sliding_window=hf.get("sliding_window"),
    )
    rope = config.rope
    if rope.get("rope_type") in ("su", "yarn"):
        rope["rope_type"] = (
            "longrope"  # transformers reads Phi-3's legacy "su" / "yarn" as longrope
        )
    if rope.get("rope_type") == "longrope" and hf.get("original_max_position_embeddings"):
        # Phi-3 keeps the pretraining length beside rope_scaling; transformers gives it priority.
        rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    return config.replace(rope_scaling=freeze(rope))


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    names = llama.weight_names(config)
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    qkv = (config.num_heads + 2 * config.num_kv_heads) * d
    for n in range(config.num_layers):
        pre = f"model.layers.{n}."
        for name in ("q_proj", "k_proj", "v_proj"):
            del names[pre + f"self_attn.{name}.weight"]
        del names[pre + "mlp.gate_proj.weight"], names[pre + "mlp.up_proj.weight"]
        names[pre + "self_attn.qkv_proj.weight"] = (("layers", n, "attn", "qkv"), (qkv, h))
        names[pre + "mlp.gate_up_proj.weight"] = (("layers", n, "mlp", "gate_up"), (2 * i, h))
    return names
