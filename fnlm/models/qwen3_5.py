"""Qwen3.5 (text model; the multimodal checkpoint's text tower through fnlm.models.multimodal):
hybrid layers — gated DeltaNet linear attention (fnlm/models/deltanet.py) on the layers
layer_types calls "linear_attention" (by default all but every `full_attention_interval`-th), and
on the others Qwen3 attention (per-head q/k RMSNorm) whose q_proj also yields a per-head output
gate (output times sigmoid(gate)); partial rotary (a quarter of head_dim by default). Every RMSNorm
but the DeltaNet's gated one scales by (1 + weight).

The rope is transformers' multimodal rope (mrope); for text every section gets the same position,
which is plain rope, so mrope_section / mrope_interleaved are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

from fnlm.config import ModelConfig, hf_text
from fnlm.models import llama
from fnlm.models.deltanet import LINEAR, sizes

MODEL_TYPES = ("qwen3_5_text",)

# rope parameters that only place image / video positions
MROPE_KEYS = ("mrope_section", "mrope_interleaved")

# Read by fnlm.lora: the order transformers creates a layer's modules in (peft draws initial
# adapters in it): the token mixer (Qwen3_5GatedDeltaNet creates conv1d, norm, out_proj, then the
# input projections), then the MLP (a MoE block: router, experts, shared expert, its gate).
PEFT_LAYER_ORDER = (
    "attn", "mlp", "q", "k", "v", "o", "conv", "out", "in_qkv", "in_z", "in_b", "in_a",
    "router", "experts", "shared", "shared_gate", "gate", "up", "down",
)  # fmt: skip
# peft's bias="all" trains every parameter named *bias*, the DeltaNet's dt_bias too; fnlm refuses
# it here rather than train fewer biases than peft would.
PEFT_BIAS_ALL = False


def layer_types(hf: dict) -> tuple[str, ...]:
    """transformers' rule: every full_attention_interval-th layer (default 4) is full attention."""
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    interval = hf.get("full_attention_interval", 4)
    return tuple(
        LINEAR if (i + 1) % interval else "full_attention" for i in range(hf["num_hidden_layers"])
    )


def translate(hf: dict, **overrides) -> ModelConfig:
    """The fields Qwen3.5 and Qwen3.5-MoE share; the MoE family passes its expert fields."""
    original = hf
    rope, legacy = dict(hf.get("rope_parameters") or {}), dict(hf.get("rope_scaling") or {})
    for key in MROPE_KEYS:
        rope.pop(key, None)
        legacy.pop(key, None)
    if legacy.get("rope_type", legacy.get("type")) == "mrope":  # transformers 4's name for it
        legacy = {}
    rope.setdefault("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
    hf = {**hf, "rope_parameters": rope, "rope_scaling": legacy or None}
    linear_sizes = tuple(
        llama.require(hf, key)
        for key in (
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
        )
    )
    bias = bool(hf.get("attention_bias", False))
    return llama.translate(
        hf,
        qk_norm=True,
        attention_bias=bias,
        o_bias=bias,
        norm_offset=1.0,
        attention_output_gate=True,
        layer_types=layer_types(hf),
        linear_attention=linear_sizes,
        hf_config=hf_text(original),  # exports write the mrope keys back
        **overrides,
    )


def config_from_hf(hf: dict) -> ModelConfig:
    return translate(hf)


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Llama's names with q_proj twice as tall (q and gate per head); on linear-attention layers
    the DeltaNet's tensors (`fnlm.models.deltanet`) replace self_attn's."""
    names = llama.weight_names(config)
    h, d = config.hidden_size, config.head_dim
    n = sizes(config)
    value = n.value_heads * n.value_dim
    for i, kind in enumerate(config.layer_types):
        pre = f"model.layers.{i}."
        if kind != LINEAR:
            names[pre + "self_attn.q_proj.weight"] = (
                ("layers", i, "attn", "q"),
                (2 * config.num_heads * d, h),
            )
            if config.attention_bias:
                names[pre + "self_attn.q_proj.bias"] = (
                    ("layers", i, "attn", "q_bias"),
                    (2 * config.num_heads * d,),
                )
            continue
        names = {k: v for k, v in names.items() if not k.startswith(pre + "self_attn.")}
        layer = {
            "in_proj_qkv.weight": ("in_qkv", (n.conv_dim, h)),
            "in_proj_z.weight": ("in_z", (value, h)),
            "in_proj_b.weight": ("in_b", (n.value_heads, h)),
            "in_proj_a.weight": ("in_a", (n.value_heads, h)),
            "out_proj.weight": ("out", (h, value)),
            "conv1d.weight": ("conv", (n.conv_dim, 1, n.conv_kernel)),
            "norm.weight": ("norm", (n.value_dim,)),
            "A_log": ("A_log", (n.value_heads,)),
            "dt_bias": ("dt_bias", (n.value_heads,)),
        }
        for name, (leaf, shape) in layer.items():
            names[pre + "linear_attn." + name] = (("layers", i, "attn", leaf), shape)
    return names


def cache_shape(config: ModelConfig, layer: int) -> tuple[int, int]:
    """(kv heads, head dim) of one layer's KV cache (fnlm.generate.init_cache): empty (head dim
    0) on the linear-attention layers, whose conv and recurrent states sit beside it."""
    return config.num_kv_heads, 0 if config.layer_types[layer] == LINEAR else config.head_dim


def checkpoint_stream(stream: Iterator, config: ModelConfig) -> Iterator:
    """The loader's (name, tensor, file) stream without the multi-token-prediction head
    ("mtp.*"), which transformers ignores too (`_keys_to_ignore_on_load_unexpected`)."""
    return ((name, t, file) for name, t, file in stream if not name.startswith("mtp."))
