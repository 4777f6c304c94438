"""Tiny checkpoints of every family fnlm writes as GGUF, shared by tests/test_gguf_families.py
(transformers' GGUF loader) and tests/test_llamacpp.py (llama.cpp itself).

Each config exercises what its llama.cpp architecture reads: Gemma2's soft-caps and alternating
window, Gemma3's per-layer pattern and local rope base, OLMo2's post-norms, Cohere's logit scale
and q/k norms, Granite's four multipliers, SmolLM3's NoPE layers, the MoE routers and shared
expert. The weights are rounded to fp16 before saving, so an f16 export holds them exactly and
the logits of the file must equal the model's to fp32 rounding.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tests.models import build_model

SIZES = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.3,
)  # fmt: skip
ALTERNATING = ["sliding_attention", "full_attention"] * 2


def family_config(family: str, vocab: int):
    """A tiny transformers config of `family` with `vocab` tokens."""
    t = transformers
    s = dict(SIZES, vocab_size=vocab)
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=32)
    configs = {
        "gemma": lambda: t.GemmaConfig(**s, head_dim=16, hidden_act="gelu_pytorch_tanh"),
        "gemma2": lambda: t.Gemma2Config(
            **s, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=4.0,
            final_logit_softcapping=6.0, sliding_window=3, layer_types=ALTERNATING,
        ),
        "gemma3_text": lambda: t.Gemma3TextConfig(
            **s, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            },
            tie_word_embeddings=False,
        ),
        "phi3": lambda: t.Phi3Config(
            **s, partial_rotary_factor=0.5, sliding_window=None, pad_token_id=None,
            tie_word_embeddings=False,
        ),
        # LongRoPE (Phi-3.5 / Phi-4-mini): the test contexts pass the original length, so both
        # fnlm and llama.cpp take the long factors
        "phi3_longrope": lambda: t.Phi3Config(
            **s, partial_rotary_factor=0.5, sliding_window=None, pad_token_id=None,
            original_max_position_embeddings=32,
            rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                          "long_factor": [1.0, 2.0, 4.0, 8.0]},
        ),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(
            **s, **moe, num_experts=4, shared_expert_intermediate_size=48, norm_topk_prob=False,
            decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        ),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(
            **s, **moe, head_dim=16, num_experts=4, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], tie_word_embeddings=True,
        ),
        "mixtral": lambda: t.MixtralConfig(
            **s, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
        ),
        "starcoder2": lambda: t.Starcoder2Config(
            **s, use_bias=True, sliding_window=None, hidden_act="gelu_pytorch_tanh",
            tie_word_embeddings=False,
        ),
        "olmo2": lambda: t.Olmo2Config(**s, pad_token_id=0, tie_word_embeddings=False),
        "olmo3": lambda: t.Olmo3Config(
            **s, pad_token_id=0, eos_token_id=None, sliding_window=3, layer_types=ALTERNATING,
        ),
        "cohere": lambda: t.CohereConfig(**s, use_qk_norm=False, logit_scale=0.5),
        "granite": lambda: t.GraniteConfig(
            **s, attention_bias=True, embedding_multiplier=6.0, residual_multiplier=0.5,
            attention_multiplier=0.125, logits_scaling=4.0, tie_word_embeddings=False,
        ),
        # Falcon-40B's layout (new decoder architecture: kv groups, ln_attn + ln_mlp), Falcon-7B's
        # (multi-query, one norm before the parallel attention and MLP) and Falcon-11B's
        "falcon": lambda: t.FalconConfig(
            **_falcon(s), new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True,
        ),
        "falcon_7b": lambda: t.FalconConfig(  # tied, as Falcon-7B: llama.cpp reads token_embd
            **{**_falcon(s), "tie_word_embeddings": True}, new_decoder_architecture=False,
            multi_query=True, parallel_attn=True,
        ),
        "falcon_11b": lambda: t.FalconConfig(  # new decoder, one norm for both branches
            **_falcon(s), new_decoder_architecture=True, num_kv_heads=2,
            num_ln_in_parallel_attn=1, parallel_attn=True,
        ),
        # gpt-oss: sinks, biases, alternating window, yarn, a biased router over 4 experts, the
        # clamped SwiGLU. Yarn's ramp ends rounded (truncate true), as llama.cpp always rounds
        # them; OpenAI's truncate false is written with a warning (test_gguf_families)
        "gpt_oss": lambda: t.GptOssConfig(
            **{**s, "intermediate_size": 32}, head_dim=16, num_local_experts=4,
            num_experts_per_tok=2, sliding_window=3, layer_types=ALTERNATING,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": True, "rope_theta": 1e4,
                             "original_max_position_embeddings": 256},
            tie_word_embeddings=False,
        ),
        # every token through all 4 experts: no routing near-ties, so llama.cpp's perplexity is
        # held to the dense tolerance (tests/test_llamacpp.py)
        "gpt_oss_every_expert": lambda: t.GptOssConfig(
            **{**family_config("gpt_oss", vocab).to_dict(), "num_experts_per_tok": 4}
        ),
        "smollm3": lambda: t.SmolLM3Config(
            **s, no_rope_layer_interval=4, use_sliding_window=False, pad_token_id=None,
            bos_token_id=None, eos_token_id=None,
        ),
    }  # fmt: skip
    return configs[family]()


def _falcon(sizes: dict) -> dict:
    return dict(
        vocab_size=sizes["vocab_size"], hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, ffn_hidden_size=96, bias=False, alibi=False,
        max_position_embeddings=1024, initializer_range=0.3, tie_word_embeddings=False,
    )  # fmt: skip


FAMILIES = [
    "gemma", "gemma2", "gemma3_text", "phi3", "phi3_longrope", "qwen2_moe", "qwen3_moe",
    "mixtral", "starcoder2", "olmo2", "olmo3", "cohere", "granite", "smollm3", "falcon",
    "falcon_7b", "falcon_11b", "gpt_oss", "gpt_oss_every_expert",
]  # fmt: skip


def family_tokenizer(directory: Path):
    """tests/tokenizer_fixtures.py's Llama-3 style byte-level BPE with the special tokens llama.cpp
    looks up by name in a model called Phi-3 (llama-vocab.cpp sets their attributes)."""
    from fnlm.tokenizer import Tokenizer
    from tests.tokenizer_fixtures import write_byte_level_bpe

    write_byte_level_bpe(directory)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    hf.add_special_tokens({"additional_special_tokens": ["<s>", "</s>", "<unk>", "<|endoftext|>"]})
    hf.save_pretrained(directory)
    return Tokenizer.from_dir(directory)


def save_rounded(config, directory: Path, seed: int = 0) -> Path:
    """A random model of `config` with fp16-representable weights, saved with save_pretrained."""
    model = build_model(config, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model.save_pretrained(directory)
    return directory
