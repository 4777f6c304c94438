"""The real model configs every benchmark script runs (random weights), their LoRA targets on both
sides, and the --tiny shrink that runs the same code path on a CPU.

    from bench_configs import REAL_CONFIGS, hf_config, write_checkpoint, lora_targets
    config = hf_config("qwen3.5-9b")                   # transformers config (AutoConfig.for_model)
    config = hf_config("qwen3.5-9b", tiny=True)        # same family, 4 layers, hidden 64, vocab 512
    write_checkpoint("gpt-oss-20b", Path("ckpt"), device="cuda")
    targets = lora_targets("gpt-oss-20b")              # fnlm names, peft target_modules/_parameters

Each entry carries its transformers `model_type`; the other keys are config.json fields.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
REAL_CONFIGS = {
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(_LLAMA3_ROPE, factor=32.0), tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(_LLAMA3_ROPE, factor=8.0), tie_word_embeddings=False,
    ),
    "qwen3-4b": dict(
        model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "gemma2-2b": dict(
        model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
        max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen3.5-9B's text model: transformers 5.24's Qwen3_5TextConfig defaults ("Qwen3.5-9B
    # style"), which the model card repeats (32 layers as 8 x (3 gated DeltaNet + 1 gated
    # attention), DeltaNet 16 QK / 32 V heads of 128, attention 16 Q / 4 KV heads of 256, rotary
    # on 64 dims, FFN 12288, vocab 248320 padded, untied LM output); rope base 1e7.
    "qwen3.5-9b": dict(
        model_type="qwen3_5_text", hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4, head_dim=256,
        linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_num_key_heads=16, linear_num_value_heads=32, vocab_size=248320,
        max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                         "partial_rotary_factor": 0.25},
    ),
    # google/gemma-4-E4B-it's text_config (as published; transformers 5.24's Gemma4TextConfig
    # derives the same layer_types, 5 sliding : 1 full, and the default rope_parameters, sliding
    # theta 1e4 / full "proportional" theta 1e6 on a quarter of the 512-wide global heads).
    "gemma-4-e4b": dict(
        model_type="gemma4_text", hidden_size=2560, intermediate_size=10240,
        num_hidden_layers=42, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        global_head_dim=512, vocab_size=262144, vocab_size_per_layer_input=262144,
        hidden_size_per_layer_input=256, num_kv_shared_layers=18, sliding_window=512,
        final_logit_softcapping=30.0, rms_norm_eps=1e-6, max_position_embeddings=131072,
        hidden_activation="gelu_pytorch_tanh", attention_k_eq_v=False, use_double_wide_mlp=False,
        enable_moe_block=False, tie_word_embeddings=True,
    ),
    # openai/gpt-oss-20b's config.json (transformers' GptOssConfig defaults are the 120B's 36
    # layers and 128 experts; the rest agrees): 24 layers, 32 experts, 4 per token.
    "gpt-oss-20b": dict(
        model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_local_experts=32, num_experts_per_tok=4, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, vocab_size=201088, sliding_window=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, swiglu_limit=7.0,
        attention_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 4096},
    ),
}  # fmt: skip

# --tiny: the same family at toy size (a key is replaced only where the real config has it).
TINY_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=512, sliding_window=16, query_pre_attn_scalar=16, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    global_head_dim=32, hidden_size_per_layer_input=8, vocab_size_per_layer_input=512,
    num_local_experts=4, num_experts_per_tok=2,
)  # fmt: skip
TINY_FAMILY = {
    "qwen3_5_text": dict(num_hidden_layers=4),  # 3 DeltaNet layers, then full attention
    # two layers of each type; the last two share the first two's keys and values
    "gemma4_text": dict(
        num_hidden_layers=4,
        num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    "gpt_oss": dict(intermediate_size=64),  # the expert size
}


def config_values(name: str, tiny: bool = False) -> dict:
    """A copy of REAL_CONFIGS[name] (model_type included), shrunk by --tiny's rules."""
    values = dict(REAL_CONFIGS[name])
    if tiny:
        values.update({k: v for k, v in TINY_SIZES.items() if k in values})
        values.update(TINY_FAMILY.get(values["model_type"], {}))
    return values


def hf_config(name: str, tiny: bool = False):
    """The transformers config of an entry (AutoConfig.for_model of its model_type)."""
    import transformers

    values = config_values(name, tiny)
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


def vocab_size(name: str, tiny: bool = False) -> int:
    return config_values(name, tiny)["vocab_size"]


def clear() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def write_checkpoint(name: str, directory: Path, device: str = "cuda", tiny: bool = False) -> None:
    """A random-init checkpoint of an entry (`save_random`); kept if `directory` already holds
    one."""
    if not (directory / "config.json").is_file():
        save_random(hf_config(name, tiny), directory, device)


def save_random(config, directory: Path, device: str = "cuda") -> None:
    """A random-init model of a transformers `config` (bf16 built on a GPU, fp32 on a CPU),
    written to `directory` with save_pretrained."""
    import transformers

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory, max_shard_size="5GB")
    del model
    clear()


def parameter_count(name: str, tiny: bool = False) -> int:
    """Parameters of the model (a tied embedding counted once), from its config on no device."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(name, tiny))
    return sum(p.numel() for p in model.parameters())


def active_parameters(name: str, tiny: bool = False) -> int:
    """The parameters one token's matmuls read, for MFU: an expert stack counts k / E of its size
    (k experts per token of E), Gemma 4's per-layer embedding table (a lookup) not at all."""
    import transformers

    values = config_values(name, tiny)
    share = values.get("num_experts_per_tok", 1) / values.get("num_local_experts", 1)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(name, tiny))
    total = 0
    for key, p in model.named_parameters():
        if "embed_tokens_per_layer" not in key:
            total += p.numel() * (share if ".experts." in key else 1)
    return int(total)


@dataclass(frozen=True)
class LoraTargets:
    """What LoRA adapts, named for each side: fnlm.lora.init's `targets`, peft's
    `target_modules` and `target_parameters` (mixture-of-experts stacks), and a line saying so."""

    fnlm: tuple[str, ...]
    peft_modules: tuple[str, ...]
    peft_parameters: tuple[str, ...] = ()
    note: str = "q, k, v, o, gate, up, down"


_DENSE = LoraTargets(
    ("q", "k", "v", "o", "gate", "up", "down"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
# By model_type; the rest adapt every linear of attention and MLP (_DENSE).
_TARGETS = {
    # every linear of both token mixers: full attention's q, k, v, o, the DeltaNet's input
    # projections (qkv, z, b, a) and out_proj; then the MLP
    "qwen3_5_text": LoraTargets(
        ("q", "k", "v", "o", "in_qkv", "in_z", "in_b", "in_a", "out", "gate", "up", "down"),
        (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "in_proj_qkv",
            "in_proj_z",
            "in_proj_b",
            "in_proj_a",
            "out_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ),
        note="attention q, k, v, o; DeltaNet in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, "
        "out_proj; MLP gate, up, down",
    ),  # fmt: skip
    # attention linears, and the expert stacks through peft's target_parameters (peft 0.21's
    # ParamWrapper; one low-rank pair per expert), the router left frozen on both sides
    "gpt_oss": LoraTargets(
        ("q", "k", "v", "o", "experts.gate_up", "experts.down"),
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        note="attention q, k, v, o; experts gate_up_proj, down_proj (peft target_parameters); "
        "router frozen",
    ),
}


def lora_targets(name: str) -> LoraTargets:
    return _TARGETS.get(REAL_CONFIGS[name]["model_type"], _DENSE)


# The dense families' peft target_modules (scripts/bench_methods.py reads it).
TARGETS = list(_DENSE.peft_modules)
