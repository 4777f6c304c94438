"""The families added for the models people fine-tune now (issue 18), beyond what the shared
per-family tests check through tests/models.py's HF_CONFIGS (logits, left padding, LoRA against
peft, training, greedy generation, merged export): a fixed tiny case per behaviour flag, NF4
against bitsandbytes, and the multimodal checkpoints read for their text model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import transformers

import fnlm
from fnlm import models
from tests.models import (
    FP32_REL_TOL,
    GEMMA3_VISION,
    PIXTRAL_VISION,
    build_model,
    max_rel_error,
    saved_checkpoint,
)
from tests.test_architectures import (
    BASE,
    SEQ,
    assert_nf4_matches_bitsandbytes,
    load_fp32,
    random_tokens,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

GEMMA3_TEXT = dict(
    BASE, num_hidden_layers=3, sliding_window=3, sliding_window_pattern=2,
    rope_local_base_freq=10.0, query_pre_attn_scalar=16, model_type="gemma3_text",
)  # fmt: skip
MISTRAL_TEXT = dict(BASE, sliding_window=3, model_type="mistral")


def gemma3(text=GEMMA3_TEXT, tie=True):
    config = transformers.Gemma3Config(
        text_config=text, vision_config=GEMMA3_VISION, mm_tokens_per_image=4,
        tie_word_embeddings=tie,
    )  # fmt: skip
    config.vocab_size = text["vocab_size"]
    return config


def mistral3(text=MISTRAL_TEXT, tie=False):
    config = transformers.Mistral3Config(
        text_config=text, vision_config=PIXTRAL_VISION, image_token_index=10**6,
        tie_word_embeddings=tie,
    )  # fmt: skip
    config.vocab_size = text["vocab_size"]
    return config


NO_HEAD_DIM = {k: v for k, v in BASE.items() if k != "head_dim"}
SMOLLM3 = dict(
    BASE, num_hidden_layers=4, no_rope_layer_interval=2, use_sliding_window=True,
    sliding_window=3, attention_bias=True, mlp_bias=True, pad_token_id=None,
    bos_token_id=None, eos_token_id=None,
)  # fmt: skip
OLMO3 = dict(
    NO_HEAD_DIM, num_hidden_layers=4, sliding_window=3, attention_bias=True, pad_token_id=0,
    eos_token_id=None, rope_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0},
)  # fmt: skip
MINISTRAL = dict(
    BASE, num_hidden_layers=3, sliding_window=3,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
)  # fmt: skip

GPT_OSS = dict(
    BASE, num_hidden_layers=3, sliding_window=3, num_local_experts=4, num_experts_per_tok=2,
    swiglu_limit=1.0, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 4, "rope_theta": 150000.0,
    },
)  # fmt: skip


# (id, config builder): one case per behaviour each new family switches on. The id's first part
# names the family (the README support table and test_every_family_has_a_flag_case read it).
NEW_FLAG_CASES = [
    ("gemma3-tied_local_rope", lambda: gemma3()),
    ("gemma3-untied", lambda: gemma3(tie=False)),
    ("mistral3-untied_window", lambda: mistral3()),
    ("mistral3-tied", lambda: mistral3(tie=True)),
    ("smollm3-nope_layers_window_biases", lambda: transformers.SmolLM3Config(**SMOLLM3)),
    (
        "smollm3-rope_everywhere_no_window",
        lambda: transformers.SmolLM3Config(
            **dict(SMOLLM3, no_rope_layer_interval=100, use_sliding_window=False)
        ),
    ),
    ("olmo3-window_scaled_full_rope", lambda: transformers.Olmo3Config(**OLMO3)),
    ("ministral-mixed_layer_types", lambda: transformers.MinistralConfig(**MINISTRAL)),
    ("gpt_oss-sinks_window_clamp_yarn", lambda: transformers.GptOssConfig(**GPT_OSS)),
    (
        "gpt_oss-no_attention_bias_default_rope",
        lambda: transformers.GptOssConfig(
            **dict(GPT_OSS, attention_bias=False, rope_parameters={"rope_type": "default"})
        ),
    ),
]
# Qwen3.5 (tests/test_qwen3_5.py draws more): DeltaNet layers around gated full attention
QWEN3_5 = dict(
    BASE, num_hidden_layers=3, attention_bias=True, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention", "linear_attention"],
    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
)  # fmt: skip
QWEN3_5_MOE = dict(
    {k: v for k, v in QWEN3_5.items() if k != "intermediate_size"}, num_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=16,
)  # fmt: skip


def qwen3_5(kind, text):
    """A multimodal Qwen3.5 config (a one-block vision tower) around `text`."""
    config = kind(text_config=text, vision_config=dict(depth=1, hidden_size=16, num_heads=2))
    config.vocab_size = text["vocab_size"]
    return config


NEW_FLAG_CASES += [
    ("qwen3_5_text-deltanet_gated_attention", lambda: transformers.Qwen3_5TextConfig(**QWEN3_5)),
    (
        "qwen3_5_moe_text-deltanet_shared_expert",
        lambda: transformers.Qwen3_5MoeTextConfig(**QWEN3_5_MOE),
    ),
    ("qwen3_5-text_tower", lambda: qwen3_5(transformers.Qwen3_5Config, QWEN3_5)),
    ("qwen3_5_moe-text_tower", lambda: qwen3_5(transformers.Qwen3_5MoeConfig, QWEN3_5_MOE)),
]
# Gemma 4 (tests/test_gemma4.py draws more): per-layer inputs, KV sharing with a double-wide MLP,
# global layers with their own head size and k = v, proportional rope, the MoE block
GEMMA4 = dict(
    BASE, num_hidden_layers=3, global_head_dim=16, attention_k_eq_v=True,
    num_global_key_value_heads=1, sliding_window=3, num_kv_shared_layers=1,
    layer_types=["sliding_attention", "full_attention", "full_attention"],
    use_double_wide_mlp=True, hidden_size_per_layer_input=8, vocab_size_per_layer_input=96,
    enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
    final_logit_softcapping=3.0, pad_token_id=0,
)  # fmt: skip
GEMMA4_VISION = dict(GEMMA3_VISION, num_key_value_heads=2, head_dim=8, patch_size=4)


def gemma4() -> transformers.Gemma4Config:
    """A multimodal Gemma 4 config (a one-layer vision tower) around GEMMA4."""
    config = transformers.Gemma4Config(text_config=GEMMA4, vision_config=GEMMA4_VISION)
    config.vocab_size = GEMMA4["vocab_size"]
    return config


NEW_FLAG_CASES += [
    ("gemma4_text-ple_shared_kv_k_eq_v_moe", lambda: transformers.Gemma4TextConfig(**GEMMA4)),
    ("gemma4-text_tower", gemma4),
]
# DeepSeek-V3 (tests/test_deepseek_v3.py draws more): MLA with q_lora_rank and v heads wider than
# q/k's, interleaved yarn rope with mscale, a dense layer, then a sigmoid group-routed MoE layer
DEEPSEEK_V3 = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=24, attention_bias=True,
    n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, moe_intermediate_size=16,
    n_shared_experts=2, max_position_embeddings=256, initializer_range=0.2,
    rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 0.707, "mscale_all_dim": 1.0, "rope_theta": 1e4,
    },
)  # fmt: skip
NEW_FLAG_CASES += [
    ("deepseek_v3-mla_yarn_moe", lambda: transformers.DeepseekV3Config(**DEEPSEEK_V3)),
]
# GLM-4.5 (tests/test_glm4_moe.py draws more): partial rotary, q/k norm, qkv biases, a dense
# layer, then sigmoid group-routed experts with two shared experts
GLM4_MOE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    use_qk_norm=True, attention_bias=True, n_routed_experts=8, n_group=4, topk_group=2,
    num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
    routed_scaling_factor=2.5, max_position_embeddings=256, initializer_range=0.2,
)  # fmt: skip
NEW_FLAG_CASES += [
    ("glm4_moe-partial_rope_qk_norm_grouped_moe", lambda: transformers.Glm4MoeConfig(**GLM4_MOE)),
]
# Qwen3-Next (tests/test_qwen3_next.py draws more): fused DeltaNet projections around gated full
# attention, a dense layer among sparse ones, a sigmoid-gated shared expert
QWEN3_NEXT = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, full_attention_interval=2, num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=24, mlp_only_layers=[2],
    initializer_range=0.2, max_position_embeddings=256,
)  # fmt: skip
NEW_FLAG_CASES += [
    (
        "qwen3_next-fused_deltanet_dense_and_sparse",
        lambda: transformers.Qwen3NextConfig(**QWEN3_NEXT),
    ),
]
CASES = dict(NEW_FLAG_CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_flag_combinations_match_transformers(case):
    """Logits with and without left padding equal transformers' text model's."""
    config = CASES[case]()
    pads = [0, 3, 7]
    mask = torch.tensor([[0] * p + [1] * (SEQ - p) for p in pads])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with saved_checkpoint(config) as (model, directory):
        params = load_fp32(directory)
        tokens = random_tokens(config.vocab_size, mask.shape)
        with torch.no_grad():
            ref = model(tokens).logits
            ref_padded = model(tokens, attention_mask=mask, position_ids=positions).logits
        ours = fnlm.forward(params, tokens)
        ours_padded = fnlm.forward(params, tokens, attention_mask=mask)
    assert max_rel_error(ours, ref) <= FP32_REL_TOL
    real = mask.bool()
    assert max_rel_error(ours_padded[real], ref_padded[real]) <= FP32_REL_TOL


NF4_WIDTHS = dict(hidden_size=64, intermediate_size=128, head_dim=16)  # bitsandbytes' CPU blocks


NF4_CASES = {
    "gemma3": lambda: gemma3({**GEMMA3_TEXT, **NF4_WIDTHS}),
    "mistral3": lambda: mistral3({**MISTRAL_TEXT, **NF4_WIDTHS}),
    "smollm3": lambda: transformers.SmolLM3Config(**dict(SMOLLM3, **NF4_WIDTHS)),
    "olmo3": lambda: transformers.Olmo3Config(
        **dict(OLMO3, **NF4_WIDTHS, num_attention_heads=4, num_key_value_heads=2)
    ),
    "ministral": lambda: transformers.MinistralConfig(**dict(MINISTRAL, **NF4_WIDTHS)),
}


@pytest.mark.parametrize("case", list(NF4_CASES))
def test_nf4_logits_match_bitsandbytes(case):
    pytest.importorskip("bitsandbytes")
    assert_nf4_matches_bitsandbytes(NF4_CASES[case]())


# ----------------------------------------------------------------------------------------------
# multimodal checkpoints: the text model of the multimodal reference, vision skipped in one line
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gemma3-tied_local_rope", "mistral3-untied_window"])
def test_multimodal_checkpoint_logits_equal_the_references_text_logits(case, capsys):
    config = CASES[case]()
    multimodal = build_model(config)
    tokens = random_tokens(config.vocab_size, (2, SEQ))
    with tempfile.TemporaryDirectory() as d:
        multimodal.save_pretrained(d)
        capsys.readouterr()
        params = load_fp32(d)
        printed = capsys.readouterr().out.strip().splitlines()
    with torch.no_grad():
        ref = multimodal(input_ids=tokens).logits
    assert max_rel_error(fnlm.forward(params, tokens), ref) <= FP32_REL_TOL
    vision = [
        n for n in multimodal.state_dict() if "language_model" not in n and "lm_head" not in n
    ]
    assert printed == [
        f"fnlm: {config.model_type} checkpoint: loaded its text model, skipped {len(vision)} vision tensors"
    ]
    text_type = config.get_text_config().model_type
    assert params.config.model_type == text_type
    assert params.config.text_tower_of == config.model_type


@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("case", ["gemma3-tied_local_rope", "mistral3-untied_window"])
def test_multimodal_merged_export_is_the_text_model(case, quant, tmp_path):
    """A merged export of a multimodal checkpoint's text model is a text checkpoint: transformers
    loads it as Gemma3ForCausalLM / MistralForCausalLM with fnlm's adapted logits. With NF4 the
    weights come from the multimodal source checkpoint (renamed), not from dequantization."""
    text = GEMMA3_TEXT if case.startswith("gemma3") else MISTRAL_TEXT
    config = (
        CASES[case]()
        if quant is None
        else (gemma3 if case[0] == "g" else mistral3)({**text, **NF4_WIDTHS})
    )
    with saved_checkpoint(config) as (_, directory):
        params, _ = fnlm.load(directory, quant=quant, dtype=torch.float32, device="cpu")
        lora = fnlm.lora.init(params, r=2, targets=("q", "v", "down"))
        lora = torch.utils._pytree.tree_map(lambda t: t.detach() + 0.3, lora)
        fnlm.save(tmp_path, params, lora=lora, format="merged")
        exact = load_fp32(directory)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == config.get_text_config().model_type
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(reloaded).__name__.endswith("ForCausalLM")
    tokens = random_tokens(config.vocab_size, (2, SEQ))
    with torch.no_grad():
        ref = reloaded(tokens).logits
    # NF4: the export merged into the 16-bit source weights, so it equals the fp32 model + adapter
    ours = fnlm.forward(exact, tokens, lora=lora)
    assert max_rel_error(ref, ours) <= FP32_REL_TOL


def test_smollm3_nope_layers_follow_the_interval():
    config = models.config_from_hf(transformers.SmolLM3Config(**SMOLLM3).to_dict())
    assert config.nope_layers == (1, 3)
    assert [config.window(i) for i in range(4)] == [None, 3, None, 3]


def test_multimodal_types_are_registered():
    for model_type in ("gemma3", "mistral3"):
        assert models.family(model_type).MODEL_TYPES
        assert model_type not in models.UNSUPPORTED


def test_multimodal_config_without_text_config_names_the_file(tmp_path):
    Path(tmp_path, "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(fnlm.errors.ConfigError, match="config.json.*text_config"):
        fnlm.load(tmp_path, quant=None, device="cpu")
