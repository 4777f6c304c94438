"""What each of fnlm's families is in llama.cpp: the GGUF architecture, its metadata, the layout
changes of its tensors, and the model features that architecture computes.

The reference is llama.cpp itself: `convert_hf_to_gguf.py` (its `conversion/` package) for what is
written, and `src/models/<arch>.cpp` for what the runtime reads and computes. A llama.cpp
architecture hard-codes much of a model (Gemma2's attention scale, SmolLM3's every-4th NoPE
layer, Qwen2-MoE's unnormalized router weights): `problems` compares a config with what the
architecture would compute and names every difference, so a file llama.cpp would run differently
is never written. Tensor names come from the gguf package's own map (`gguf.TensorNameMap`, the
one llama.cpp's converter uses).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fnlm.config import ACTIVATIONS, ModelConfig

ANY = object()  # a feature the architecture reads from the file's metadata, any value is written


def _default_scale(config: ModelConfig) -> float:
    return config.head_dim**-0.5


def _gemma_scale(config: ModelConfig) -> float:
    """llama.cpp's Gemma2/3 attention scale: hidden / heads for the 27B (46 / 62 layers), else
    head_dim (gemma_pytorch's query_pre_attn_scalar rule)."""
    if (config.model_type, config.num_layers) in (("gemma2", 46), ("gemma3_text", 62)):
        return (config.hidden_size / config.num_heads) ** -0.5
    return config.head_dim**-0.5


# What a llama-like llama.cpp architecture computes; an Arch overrides what its own differs in.
# Values are the config's value, a callable of the config giving it, or ANY.
LLAMA_LIKE: dict[str, Any] = {
    "attention_scale": _default_scale,
    "attention_softcap": None,
    "final_softcap": None,
    "residual_scale": 1.0,
    "embedding_scale": None,
    "logit_scale": 1.0,
    "parallel_block": False,
    "pre_norms": True,
    "post_norms": False,
    "qk_norm": False,
    "qk_norm_across_heads": False,
    "norm_type": "rms",
    "norm_offset": 0.0,
    "activation": "silu",
    "mlp_gated": True,
    "glu_limit": None,
    "rope_interleaved": False,
    "fused_qkv_grouped": False,
    "nope_layers": (),
    "num_experts": 0,
    "shared_expert_size": 0,
    "o_bias": False,
    "mlp_bias": False,
}


@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture as fnlm writes it."""

    name: str  # general.architecture
    # llama.cpp's "norm" rope rotates adjacent pairs: the q / k rows of a checkpoint that rotates
    # halves are permuted (convert_hf_to_gguf's LlamaModel.permute)
    permute_qk: bool = False
    sliding_window: bool = False  # reads attention.sliding_window and its per-layer pattern
    features: dict[str, Any] = field(default_factory=dict)  # overrides of LLAMA_LIKE
    # the q rows span the hidden size (the arch sizes attn_q by n_embd, not heads x head_dim)
    q_spans_hidden: bool = False
    tied_only: bool = False  # reads no output.weight: the lm head is the embedding
    rope_types: tuple[str, ...] = ("default", "linear")
    metadata: Callable[[Any, ModelConfig], None] | None = None  # arch-specific keys
    needs_output: bool = False  # reads output.weight always: a tied lm head cannot be written
    # checkpoint tensor (name, shape, config) -> the tensors written for it, each as (a name
    # gguf's map knows, shape, the change from the checkpoint's tensor or None); None: as it is
    tensors: Callable[[str, tuple[int, ...], ModelConfig], list[Derived] | None] | None = None


Derived = tuple[str, tuple[int, ...], "Callable[[torch.Tensor], torch.Tensor] | None"]


def _falcon_tensors(name: str, shape: tuple[int, ...], config: ModelConfig) -> list[Derived] | None:
    """Falcon's fused qkv, rows grouped per kv head ([q heads of the group, k, v] per group), in
    llama.cpp's layout: all q heads, then the k heads, then the v heads (the converter's
    "jploski" transform)."""
    if not name.endswith("query_key_value.weight"):
        return None
    groups, d = config.num_kv_heads, config.head_dim
    per_group = config.num_heads // groups

    def regroup(w: torch.Tensor) -> torch.Tensor:
        qkv = w.reshape(groups, per_group + 2, d, w.shape[-1])
        return torch.cat([qkv[:, :-2].reshape(-1, w.shape[-1]), qkv[:, -2].reshape(-1, w.shape[-1]),
                          qkv[:, -1].reshape(-1, w.shape[-1])])  # fmt: skip

    return [(name, shape, regroup)]


def _gpt_oss_tensors(
    name: str, shape: tuple[int, ...], config: ModelConfig
) -> list[Derived] | None:
    """gpt-oss as convert_hf_to_gguf writes its 16-bit experts: the stacks [E, in, out] as
    [E, out, in], gate_up's interleaved columns split into gate (even) and up (odd) stacks, the
    biases likewise; the sinks as attn_sinks.weight."""
    if name.endswith("self_attn.sinks"):
        return [(name + ".weight", shape, None)]
    prefix, _, part = name.rpartition(".experts.")
    if not prefix:
        return None
    base = prefix + ".experts."
    if part == "gate_up_proj":  # [E, H, 2I]
        out = (shape[0], shape[2] // 2, shape[1])
        return [
            (base + "gate_proj.weight", out, lambda w: w.transpose(1, 2)[:, 0::2]),
            (base + "up_proj.weight", out, lambda w: w.transpose(1, 2)[:, 1::2]),
        ]
    if part == "gate_up_proj_bias":  # [E, 2I]
        out = (shape[0], shape[1] // 2)
        return [
            (base + "gate_proj.bias", out, lambda b: b[:, 0::2]),
            (base + "up_proj.bias", out, lambda b: b[:, 1::2]),
        ]
    if part == "down_proj":  # [E, I, H]
        return [
            (base + "down_proj.weight", (shape[0], shape[2], shape[1]), lambda w: w.transpose(1, 2))
        ]
    return [(base + "down_proj.bias", shape, None)]  # fmt: skip


def _gemma2_metadata(writer, config: ModelConfig) -> None:
    writer.add_attn_logit_softcapping(config.attention_softcap)
    writer.add_final_logit_softcapping(config.final_softcap)


def _final_softcap_metadata(writer, config: ModelConfig) -> None:
    if config.final_softcap is not None:
        writer.add_final_logit_softcapping(config.final_softcap)


def _granite_metadata(writer, config: ModelConfig) -> None:
    writer.add_attention_scale(config.attention_scale or config.head_dim**-0.5)
    writer.add_embedding_scale(config.embedding_scale or 1.0)
    writer.add_residual_scale(config.residual_scale)
    writer.add_logit_scale(1.0 / config.logit_scale)  # llama.cpp divides by it (logits_scaling)


def _cohere_metadata(writer, config: ModelConfig) -> None:
    writer.add_logit_scale(config.logit_scale)  # llama.cpp multiplies by it


def _phi3_metadata(writer, config: ModelConfig) -> None:
    """Phi-3's LongRoPE as convert_hf_to_gguf writes it: the original context and the attention
    factor (the factor tensors are written by write.py). llama.cpp takes the long factors when its
    context exceeds the original, fnlm (as transformers) when the sequence does."""
    from fnlm.models.rope import _longrope, _original_length

    rope = config.rope
    if rope.get("rope_type") == "longrope":
        writer.add_rope_scaling_orig_ctx_len(_original_length(config, rope))
        writer.add_rope_scaling_attn_factors(_longrope(config, rope, "cpu")[1])


def _falcon_metadata(writer, config: ModelConfig) -> None:
    writer.add_tensor_data_layout("jploski")  # as the converter: q, k, v heads contiguous


def _yarn_metadata(writer, config: ModelConfig) -> None:
    """yarn rope as convert_hf_to_gguf writes it."""
    import gguf

    rope = config.rope
    if rope.get("rope_type") != "yarn":
        return
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    for key, add in (
        ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
        ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
    ):
        if rope.get(key) is not None:
            add(float(rope[key]))  # fmt: skip


def _gemma_embedding(config: ModelConfig) -> float:
    return config.hidden_size**0.5


def _every_fourth(config: ModelConfig) -> tuple[int, ...]:
    """llama.cpp's SmolLM3: every 4th layer has no rotary embedding (n_no_rope_layer_step = 4)."""
    return tuple(i for i in range(config.num_layers) if (i + 1) % 4 == 0)


def _plus(config: ModelConfig) -> bool:
    """llama.cpp's command-r reads q / k norms in models of 64 layers or more (Command R+) only."""
    return config.num_layers >= 64


_GELU_TANH = ("gelu_tanh", "gelu_pytorch_tanh", "gelu_new")
_GEMMA = {"norm_offset": 1.0, "embedding_scale": _gemma_embedding, "activation": _GELU_TANH}
_MOE = {"num_experts": ANY}

ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("llama", permute_qk=True, features={"o_bias": ANY, "mlp_bias": ANY},
                  rope_types=("default", "linear", "llama3")),
    "mistral": Arch("llama", permute_qk=True, rope_types=("default", "linear", "llama3")),
    "mixtral": Arch("llama", permute_qk=True, features=_MOE),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3", features={"qk_norm": True}),
    "qwen2_moe": Arch("qwen2moe", q_spans_hidden=True,
                      features={**_MOE, "shared_expert_size": ANY}),
    "qwen3_moe": Arch("qwen3moe", features={**_MOE, "qk_norm": True}),
    "gemma": Arch("gemma", tied_only=True, features=_GEMMA),
    "gemma2": Arch("gemma2", tied_only=True, sliding_window=True, metadata=_gemma2_metadata,
                   features={**_GEMMA, "post_norms": True, "attention_scale": _gemma_scale,
                             "attention_softcap": ANY, "final_softcap": ANY}),
    "gemma3_text": Arch("gemma3", sliding_window=True, metadata=_final_softcap_metadata,
                        features={**_GEMMA, "post_norms": True, "qk_norm": True,
                                  "attention_scale": _gemma_scale, "final_softcap": ANY}),
    "phi3": Arch("phi3", q_spans_hidden=True, metadata=_phi3_metadata,
                 rope_types=("default", "longrope")),
    "starcoder2": Arch("starcoder2", q_spans_hidden=True,
                       features={"norm_type": "layer", "activation": _GELU_TANH,
                                 "mlp_gated": False, "o_bias": ANY, "mlp_bias": ANY}),
    "olmo2": Arch("olmo2", q_spans_hidden=True, sliding_window=True,
                  features={"pre_norms": False, "post_norms": True, "qk_norm": True,
                            "qk_norm_across_heads": True}),
    "olmo3": Arch("olmo2", sliding_window=True,
                  features={"pre_norms": False, "post_norms": True, "qk_norm": True,
                            "qk_norm_across_heads": True}),
    "cohere": Arch("command-r", q_spans_hidden=True, metadata=_cohere_metadata,
                   features={"norm_type": "layer", "parallel_block": True, "qk_norm": _plus,
                             "rope_interleaved": True, "logit_scale": ANY}),
    "granite": Arch("granite", permute_qk=True, metadata=_granite_metadata,
                    features={"attention_scale": ANY, "embedding_scale": ANY,
                              "residual_scale": ANY, "logit_scale": ANY, "o_bias": ANY,
                              "mlp_bias": ANY}),
    "smollm3": Arch("smollm3", permute_qk=True, features={"nope_layers": _every_fourth}),
    # llama.cpp's falcon: attention and MLP in parallel from the first norm (a second, Falcon-40B's
    # ln_attn, for attention when present), no biases, GELU (ggml's tanh form), NeoX rope
    "falcon": Arch("falcon", tensors=_falcon_tensors, metadata=_falcon_metadata,
                   features={"norm_type": "layer", "parallel_block": True, "mlp_gated": False,
                             "activation": ("gelu", *_GELU_TANH), "fused_qkv_grouped": True,
                             "attention_bias": False}),
    "gpt_oss": Arch("gpt-oss", sliding_window=True, needs_output=True, tensors=_gpt_oss_tensors,
                    metadata=_yarn_metadata, rope_types=("default", "yarn"),
                    features={**_MOE, "attention_bias": ANY, "o_bias": True, "glu_limit": 7.0,
                              "glu_alpha": 1.702}),
}  # fmt: skip


def problems(config: ModelConfig, arch: Arch) -> list[str]:
    """What of `config` the llama.cpp architecture `arch` would not compute as fnlm does."""
    found = []
    for name, want in {**LLAMA_LIKE, **arch.features}.items():
        have = getattr(config, name)
        if name == "attention_scale":
            have = have if have is not None else config.head_dim**-0.5
        if want is ANY:
            continue
        want = want(config) if callable(want) else want
        if name == "activation":
            ok = have in want if isinstance(want, tuple) else ACTIVATIONS.get(have, have) == want
            want = want[0] if isinstance(want, tuple) else want
        elif isinstance(want, float) and have is not None:
            ok = math.isclose(have, want, rel_tol=1e-6)
        else:
            ok = have == want
        if not ok:
            found.append(f"{name}={have!r} (llama.cpp's {arch.name} computes {want!r})")
    if arch.q_spans_hidden and config.num_heads * config.head_dim != config.hidden_size:
        found.append(
            f"heads x head_dim = {config.num_heads * config.head_dim} != hidden_size "
            f"{config.hidden_size} (llama.cpp's {arch.name} sizes q by the hidden size)"
        )
    if arch.needs_output and config.tie_word_embeddings:
        found.append(f"a tied lm head (llama.cpp's {arch.name} reads an output tensor of its own)")
    if arch.tied_only and not config.tie_word_embeddings:
        found.append(f"an lm_head of its own (llama.cpp's {arch.name} reuses the embedding)")
    if config.partial_rotary_factor != 1.0 and arch.permute_qk:
        found.append(f"partial rotary (factor {config.partial_rotary_factor})")
    rope_type = config.rope.get("rope_type", "default")
    if rope_type not in arch.rope_types:
        found.append(f"rope scaling {rope_type!r}")
    if config.local_rope_scaling:
        found.append("rope scaling on the sliding-window layers")
    if config.num_experts:
        if set(config.moe_layers) != set(range(config.num_layers)):
            found.append(
                f"dense MLP layers between the MoE layers (MoE layers {config.moe_layers})"
            )
        renormalize = arch.name != "qwen2moe"  # llama.cpp's build_moe_ffn norm_w per arch
        if config.moe_renormalize != renormalize:
            found.append(
                f"router weights {'' if config.moe_renormalize else 'not '}renormalized over "
                f"the top-k (llama.cpp's {arch.name} does {'' if renormalize else 'not'})"
            )
    return found
