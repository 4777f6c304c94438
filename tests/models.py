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


def _implicit_head_dim(f: dict) -> dict:
    """For configs without a head_dim field: hidden = heads * head_dim (the drawn head_dim)."""
    f["hidden_size"] = f["num_attention_heads"] * f.pop("head_dim")
    return f


def _gemma(draw):
    f = draw(llama_like_fields(bias=True))
    f["hidden_act"] = draw(st.sampled_from(["gelu_pytorch_tanh", "gelu"]))  # "gelu" means tanh
    return transformers.GemmaConfig(**f)


def _gemma2(draw):
    f = draw(llama_like_fields(bias=True, window=True))
    f["query_pre_attn_scalar"] = draw(st.sampled_from([8, 32]))
    f["attn_logit_softcapping"] = draw(st.sampled_from([None, 2.0, 50.0]))
    f["final_logit_softcapping"] = draw(st.sampled_from([None, 3.0]))
    f["hidden_activation"] = draw(st.sampled_from(["gelu_pytorch_tanh", "gelu"]))
    return transformers.Gemma2Config(**f)


def _gemma3_text(draw):
    f = draw(llama_like_fields(bias=True, window=True))
    f["query_pre_attn_scalar"] = draw(st.sampled_from([8, 32]))
    f["final_logit_softcapping"] = draw(st.sampled_from([None, 3.0]))
    f["sliding_window_pattern"] = draw(st.integers(1, 3))
    f["rope_local_base_freq"] = draw(st.sampled_from([10.0, 10000.0]))
    f["rope_scaling"] = draw(st.sampled_from([None, {"rope_type": "linear", "factor": 4.0}]))
    return transformers.Gemma3TextConfig(**f)


def _phi3(draw):
    f = _implicit_head_dim(draw(llama_like_fields(window=True)))
    if not draw(st.booleans()):
        f["sliding_window"] = None
    f["partial_rotary_factor"] = draw(st.sampled_from([1.0, 0.5]))
    f["pad_token_id"] = None  # the default 32000 lies outside the tiny vocabulary
    if draw(st.booleans()):  # LongRoPE, with the original length inside the drawn sequences
        half = int(f["hidden_size"] // f["num_attention_heads"] * f["partial_rotary_factor"]) // 2
        factors = st.lists(st.floats(1.0, 8.0), min_size=half, max_size=half)
        f["original_max_position_embeddings"] = draw(st.integers(4, 8))
        f["max_position_embeddings"] = 64
        f["rope_scaling"] = {
            "rope_type": "longrope",
            "short_factor": draw(factors),
            "long_factor": draw(factors),
        }
    return transformers.Phi3Config(**f)


def _granite(draw):
    f = _implicit_head_dim(draw(llama_like_fields(bias=True)))
    f["mlp_bias"] = draw(st.booleans())
    f["embedding_multiplier"] = draw(st.sampled_from([1.0, 12.0]))
    f["residual_multiplier"] = draw(st.sampled_from([1.0, 0.22]))
    f["attention_multiplier"] = draw(st.sampled_from([0.0078125, 0.25]))
    f["logits_scaling"] = draw(st.sampled_from([1.0, 8.0]))
    return transformers.GraniteConfig(**f)


def _cohere(draw):
    f = _implicit_head_dim(draw(llama_like_fields(bias=True)))
    f["layer_norm_eps"] = f.pop("rms_norm_eps")
    f["use_qk_norm"] = draw(st.booleans())
    f["logit_scale"] = draw(st.sampled_from([0.0625, 1.0]))
    return transformers.CohereConfig(**f)


def _starcoder2(draw):
    f = _implicit_head_dim(draw(llama_like_fields(window=True)))
    f["norm_epsilon"] = f.pop("rms_norm_eps")
    f["use_bias"] = draw(st.booleans())
    f["hidden_act"] = draw(st.sampled_from(["gelu_pytorch_tanh", "gelu"]))
    if not draw(st.booleans()):
        f["sliding_window"] = None
    return transformers.Starcoder2Config(**f)


def _olmo2(draw):
    f = _implicit_head_dim(draw(llama_like_fields(bias=True)))
    f["pad_token_id"] = 0
    return transformers.Olmo2Config(**f)


def _falcon(draw):
    f = _implicit_head_dim(draw(llama_like_fields()))
    new_layout = draw(st.booleans())
    config = dict(
        vocab_size=f["vocab_size"],
        hidden_size=f["hidden_size"],
        num_hidden_layers=f["num_hidden_layers"],
        num_attention_heads=f["num_attention_heads"],
        ffn_hidden_size=f["intermediate_size"],
        rope_theta=f["rope_theta"],
        layer_norm_epsilon=f["rms_norm_eps"],
        tie_word_embeddings=f["tie_word_embeddings"],
        max_position_embeddings=f["max_position_embeddings"],
        initializer_range=f["initializer_range"],
        bias=draw(st.booleans()),
        new_decoder_architecture=new_layout,
        activation=draw(st.sampled_from(["gelu", "gelu_pytorch_tanh"])),
    )
    if new_layout:  # grouped kv heads; one or two norms in front of the parallel attention + MLP
        config["num_kv_heads"] = f["num_key_value_heads"]
        config["num_ln_in_parallel_attn"] = draw(st.sampled_from([None, 1]))
        config["parallel_attn"] = True
    else:
        config["multi_query"] = draw(st.booleans())
        config["parallel_attn"] = draw(st.booleans())
    return transformers.FalconConfig(**config)


def _moe_fields(draw, f: dict, experts_key: str) -> dict:
    experts = draw(st.integers(2, 4))
    f[experts_key] = experts
    f["num_experts_per_tok"] = draw(st.integers(1, min(2, experts)))
    return f


def _mixtral(draw):
    f = _moe_fields(draw, draw(llama_like_fields(window=True)), "num_local_experts")
    return transformers.MixtralConfig(**f)


def _qwen_moe_fields(draw, f: dict) -> dict:
    f = _moe_fields(draw, f, "num_experts")
    f["moe_intermediate_size"] = draw(st.sampled_from([24, 40]))
    f["norm_topk_prob"] = draw(st.booleans())
    f["decoder_sparse_step"] = draw(st.integers(1, 2))
    f["mlp_only_layers"] = draw(st.lists(st.integers(0, f["num_hidden_layers"] - 1), max_size=1))
    f["use_sliding_window"] = draw(st.booleans())
    return f


def _qwen3_moe(draw):
    f = _qwen_moe_fields(draw, draw(llama_like_fields(bias=True, window=True)))
    return transformers.Qwen3MoeConfig(**f)


def _qwen2_moe(draw):
    f = _qwen_moe_fields(draw, _implicit_head_dim(draw(llama_like_fields(window=True))))
    f["shared_expert_intermediate_size"] = draw(st.sampled_from([16, 24]))
    f["max_window_layers"] = draw(st.integers(0, f["num_hidden_layers"]))
    return transformers.Qwen2MoeConfig(**f)


def _smollm3(draw):
    f = draw(llama_like_fields(bias=True, window=True))
    f["mlp_bias"] = draw(st.booleans())
    f["no_rope_layer_interval"] = draw(st.integers(1, 3))
    f["use_sliding_window"] = draw(st.booleans())
    f["pad_token_id"] = None  # the defaults lie outside the tiny vocabulary
    f["bos_token_id"] = f["eos_token_id"] = None
    return transformers.SmolLM3Config(**f)


def _olmo3(draw):
    f = _implicit_head_dim(draw(llama_like_fields(bias=True, window=True)))
    f["pad_token_id"] = 0
    f["eos_token_id"] = None
    f["rope_scaling"] = draw(st.sampled_from([None, {"rope_type": "linear", "factor": 4.0}]))
    return transformers.Olmo3Config(**f)


def _ministral(draw):
    f = draw(llama_like_fields(window=True))
    f["layer_types"] = draw(
        st.lists(
            st.sampled_from(["sliding_attention", "full_attention"]),
            min_size=f["num_hidden_layers"],
            max_size=f["num_hidden_layers"],
        )
    )
    return transformers.MinistralConfig(**f)


def _gpt_oss(draw):
    f = _moe_fields(draw, draw(llama_like_fields(window=True)), "num_local_experts")
    f["attention_bias"] = draw(st.booleans())
    f["layer_types"] = [
        draw(st.sampled_from(["sliding_attention", "full_attention"]))
        for _ in range(f["num_hidden_layers"])
    ]
    f["swiglu_limit"] = draw(st.sampled_from([0.5, 7.0]))  # 0.5 clamps the tiny model's values
    theta = f.pop("rope_theta")
    f["rope_parameters"] = draw(
        st.sampled_from(
            [
                {"rope_type": "default", "rope_theta": theta},
                {
                    "rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                    "truncate": False, "original_max_position_embeddings": 8,
                    "rope_theta": theta,
                },
            ]
        )
    )  # fmt: skip
    return transformers.GptOssConfig(**f)


# Tiny vision towers: never run (the tests feed text), only built, saved and skipped on load.
GEMMA3_VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    image_size=28, patch_size=14,
)  # fmt: skip
PIXTRAL_VISION = dict(GEMMA3_VISION, head_dim=8)


def _multimodal(config):
    """The shared tests read config.vocab_size; a multimodal config keeps it in text_config."""
    config.vocab_size = config.get_text_config().vocab_size
    return config


def _gemma3(draw):
    text = _gemma3_text(draw).to_dict()
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=GEMMA3_VISION,
        mm_tokens_per_image=4,
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    return _multimodal(config)


def _mistral3(draw):
    text = _mistral(draw).to_dict()
    config = transformers.Mistral3Config(
        text_config=text,
        vision_config=PIXTRAL_VISION,
        image_token_index=10**6,  # outside the tiny vocabulary: no text token is an image slot
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    return _multimodal(config)


HF_CONFIGS = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "phi3": _phi3,
    "granite": _granite,
    "cohere": _cohere,
    "starcoder2": _starcoder2,
    "olmo2": _olmo2,
    "falcon": _falcon,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe,
    "gemma3": _gemma3,
    "mistral3": _mistral3,
    "smollm3": _smollm3,
    "olmo3": _olmo3,
    "ministral": _ministral,
}
# gpt-oss runs its own copies of the shared per-family tests (tests/test_gpt_oss.py): peft's
# bias="all" also trains its router's and experts' biases, which fnlm refuses rather than ignores.
GPT_OSS = {"gpt_oss": _gpt_oss}

# multimodal model_type -> its transformers class (AutoModelForCausalLM does not build Mistral3)
MULTIMODAL = {
    "gemma3": "Gemma3ForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "gemma4": "Gemma4ForConditionalGeneration",
}


@st.composite
def hf_configs(draw, model_type: str):
    return {**HF_CONFIGS, **GPT_OSS}[model_type](draw)


def build_model(config, seed: int = 0):
    torch.manual_seed(seed)
    if config.model_type in MULTIMODAL:
        model = getattr(transformers, MULTIMODAL[config.model_type])(config).float()
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 (or 0); make them random so a missed norm shows up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def text_model(model):
    """A multimodal model's language model as transformers' text model (Gemma3ForCausalLM, ...)
    with the same weights: the reference fnlm's text-tower params are tested against (peft adapts
    and transformers loads exports of the text model); any other model as it is."""
    if model.config.model_type not in MULTIMODAL:
        return model
    config = model.config.get_text_config()
    config.tie_word_embeddings = model.config.tie_word_embeddings
    text = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prefix = "model.language_model."
    state = {
        ("model." + k[len(prefix) :] if k.startswith(prefix) else k): v
        for k, v in model.state_dict().items()
        if k.startswith(prefix) or k == "lm_head.weight"
    }
    text.load_state_dict(state, strict=True)
    return text.eval()


@contextmanager
def saved_checkpoint(config, seed: int = 0):
    """(model, directory) of a random model saved with save_pretrained; removed afterwards. For a
    multimodal config the directory holds the multimodal checkpoint and the model is its text
    model (`text_model`)."""
    model = build_model(config, seed)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        yield text_model(model), Path(d)
