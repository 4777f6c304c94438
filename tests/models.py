"""Tiny random transformers checkpoints for the tests, drawn by hypothesis and saved to disk.

Each family's strategy draws the config fields that family uses; `save_checkpoint` writes the
model exactly as a user's checkpoint would be written (`save_pretrained`, safetensors).
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from hypothesis import strategies as st

# fp32 logits agree to rounding: errors are relative to the logits' scale.
FP32_REL_TOL = 1e-4


def max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    scale = max(1.0, ref.abs().max().item())
    return (ours.float() - ref.float()).abs().max().item() / scale


@st.composite
def llama_like_fields(draw, *, bias=False, window=False):
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([8, 16]))
    fields = dict(
        vocab_size=draw(st.integers(64, 160)),
        hidden_size=draw(st.sampled_from([32, 48, 64])),
        intermediate_size=draw(st.sampled_from([40, 64, 96])),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=draw(st.sampled_from([10000.0, 500000.0])),
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        tie_word_embeddings=draw(st.booleans()),
        max_position_embeddings=256,
        initializer_range=0.2,  # large enough that logits are far from zero
    )
    if bias:
        fields["attention_bias"] = draw(st.booleans())
    if window:
        fields["sliding_window"] = draw(st.integers(2, 6))
    return fields


def _llama(draw):
    f = draw(llama_like_fields(bias=True))
    f["mlp_bias"] = draw(st.booleans())
    return transformers.LlamaConfig(**f)


def _mistral(draw):
    return transformers.MistralConfig(**draw(llama_like_fields(window=True)))


def _qwen2(draw):
    f = draw(llama_like_fields(window=True))
    f["use_sliding_window"] = draw(st.booleans())
    f["max_window_layers"] = draw(st.integers(0, f["num_hidden_layers"]))
    return transformers.Qwen2Config(**f)


def _qwen3(draw):
    f = draw(llama_like_fields(bias=True, window=True))
    f["use_sliding_window"] = draw(st.booleans())
    f["max_window_layers"] = draw(st.integers(0, f["num_hidden_layers"]))
    return transformers.Qwen3Config(**f)


HF_CONFIGS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3}


@st.composite
def hf_configs(draw, model_type: str):
    return HF_CONFIGS[model_type](draw)


def build_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 (or 0); make them random so a missed norm shows up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@contextmanager
def saved_checkpoint(config, seed: int = 0):
    """(model, directory) of a random model saved with save_pretrained; removed afterwards."""
    model = build_model(config, seed)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        yield model, Path(d)
