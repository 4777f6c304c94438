"""Every architecture family and every RoPE type against transformers.

tests/test_equivalence.py draws random configs of every family in tests/models.py (HF_CONFIGS);
here each behaviour flag a family uses gets a fixed tiny case of its own, so every combination runs
in CI whatever hypothesis draws: logits in fp32, with left padding, over sequences longer than the
sliding window. Then the rope tables of each rope type, and logits, at positions past the original
length; the context extension of `fnlm.load(max_seq_length=)`; MoE weights stacked per expert;
NF4 loading against transformers + bitsandbytes; the registry's refusals.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

import fnlm
from fnlm import models
from fnlm.config import ModelConfig
from fnlm.errors import UnsupportedModelError
from fnlm.models import moe
from fnlm.models.rope import rope_tables
from fnlm.params import Params
from tests.models import FP32_REL_TOL, build_model, max_rel_error, saved_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

# Long enough to pass every sliding window below (3) and the original rope lengths (16).
SEQ = 10
LONG_SEQ = 40

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    initializer_range=0.2,  # large enough that logits are far from zero
)
NO_HEAD_DIM = {k: v for k, v in BASE.items() if k != "head_dim"}  # head_dim = hidden / heads
MOE = dict(num_experts_per_tok=2)

# (id, transformers config class, fields): one case per behaviour each family switches on.
FLAG_CASES = [
    ("gemma-legacy_gelu", "GemmaConfig", dict(BASE, hidden_act="gelu", attention_bias=True)),
    ("gemma-untied", "GemmaConfig", dict(BASE, tie_word_embeddings=False)),
    (
        "gemma2-softcaps_window",
        "Gemma2Config",
        dict(
            BASE,
            sliding_window=3,
            query_pre_attn_scalar=32,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    (
        "gemma2-no_softcaps_exact_gelu",
        "Gemma2Config",
        dict(
            BASE,
            sliding_window=3,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            hidden_activation="gelu",
        ),
    ),
    (
        "gemma3_text-local_rope",
        "Gemma3TextConfig",
        dict(
            BASE,
            num_hidden_layers=3,
            sliding_window=3,
            sliding_window_pattern=2,
            rope_theta=1e6,
            rope_local_base_freq=10.0,
        ),
    ),
    (
        "gemma3_text-scaled_global_rope_softcap",
        "Gemma3TextConfig",
        dict(
            BASE,
            sliding_window=3,
            sliding_window_pattern=2,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=16,
        ),
    ),
    (
        "phi3-partial_rotary_window",
        "Phi3Config",
        dict(NO_HEAD_DIM, partial_rotary_factor=0.5, sliding_window=3, pad_token_id=None),
    ),
    (
        "phi3-longrope",
        "Phi3Config",
        dict(
            NO_HEAD_DIM,
            pad_token_id=None,
            max_position_embeddings=64,
            original_max_position_embeddings=4,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.5, 2.0, 3.0],
                "long_factor": [2.0, 3.0, 5.0, 8.0],
            },
        ),
    ),
    (
        "granite-multipliers",
        "GraniteConfig",
        dict(
            NO_HEAD_DIM,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.0625,
            logits_scaling=8.0,
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    (
        "cohere-qk_norm",
        "CohereConfig",
        dict(NO_HEAD_DIM, use_qk_norm=True, logit_scale=0.0625, attention_bias=True),
    ),
    (
        "cohere-untied",
        "CohereConfig",
        dict(NO_HEAD_DIM, use_qk_norm=False, logit_scale=0.5, tie_word_embeddings=False),
    ),
    (
        "starcoder2-bias_window",
        "Starcoder2Config",
        dict(NO_HEAD_DIM, use_bias=True, sliding_window=3),
    ),
    (
        "starcoder2-no_bias_exact_gelu",
        "Starcoder2Config",
        dict(NO_HEAD_DIM, use_bias=False, hidden_act="gelu"),
    ),
    ("olmo2-bias", "Olmo2Config", dict(NO_HEAD_DIM, attention_bias=True, pad_token_id=0)),
    (
        "falcon-multi_query_parallel",
        "FalconConfig",
        dict(NO_HEAD_DIM, multi_query=True, parallel_attn=True, bias=False),
    ),
    (
        "falcon-multi_head_parallel_bias",
        "FalconConfig",
        dict(NO_HEAD_DIM, multi_query=False, parallel_attn=True, bias=True),
    ),
    (
        "falcon-multi_head_sequential",
        "FalconConfig",
        dict(NO_HEAD_DIM, multi_query=False, parallel_attn=False),
    ),
    (
        "falcon-multi_query_sequential_untied",
        "FalconConfig",
        dict(NO_HEAD_DIM, multi_query=True, parallel_attn=False, tie_word_embeddings=False),
    ),
    (
        "falcon-new_layout_two_norms",
        "FalconConfig",
        dict(NO_HEAD_DIM, new_decoder_architecture=True, num_kv_heads=2, bias=True),
    ),
    (
        "falcon-new_layout_one_norm",
        "FalconConfig",
        dict(NO_HEAD_DIM, new_decoder_architecture=True, num_kv_heads=1, num_ln_in_parallel_attn=1),
    ),
    (
        "mixtral-top2_of_4_window",
        "MixtralConfig",
        dict(BASE, **MOE, num_local_experts=4, sliding_window=3),
    ),
    (
        "qwen3_moe-renormalized",
        "Qwen3MoeConfig",
        dict(BASE, **MOE, num_experts=4, moe_intermediate_size=24, norm_topk_prob=True),
    ),
    (
        "qwen3_moe-sparse_step_dense_layer_window",
        "Qwen3MoeConfig",
        dict(
            BASE,
            num_hidden_layers=3,
            num_experts=3,
            num_experts_per_tok=1,
            moe_intermediate_size=24,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
            use_sliding_window=True,
            sliding_window=3,
        ),
    ),
    (
        "qwen2_moe-shared_expert",
        "Qwen2MoeConfig",
        dict(
            NO_HEAD_DIM,
            **MOE,
            num_experts=4,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=16,
            mlp_only_layers=[0],
        ),
    ),
    (
        "qwen2_moe-window_layers",
        "Qwen2MoeConfig",
        dict(
            NO_HEAD_DIM,
            **MOE,
            num_hidden_layers=3,
            num_experts=3,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=16,
            norm_topk_prob=True,
            use_sliding_window=True,
            sliding_window=3,
            max_window_layers=2,
        ),
    ),
]


def load_fp32(directory, **kwargs) -> Params:
    params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu", **kwargs)
    return params


def random_tokens(vocab: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def hf_config(class_name: str, fields: dict):
    return getattr(transformers, class_name)(**fields)


@pytest.mark.parametrize(
    "class_name, fields", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES]
)
def test_flag_combinations_match_transformers(class_name, fields):
    config = hf_config(class_name, fields)
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
    assert ours.shape == ref.shape
    assert max_rel_error(ours, ref) <= FP32_REL_TOL
    real = mask.bool()
    assert max_rel_error(ours_padded[real], ref_padded[real]) <= FP32_REL_TOL


def test_every_family_has_a_flag_case():
    from tests.test_new_families import NEW_FLAG_CASES  # issue 18's families keep theirs there

    covered = {case_id.split("-")[0] for case_id, *_ in FLAG_CASES + NEW_FLAG_CASES}
    new_families = set(models.FAMILIES) - {"llama", "mistral", "qwen2", "qwen3"}
    assert new_families <= covered, f"families without a flag case: {new_families - covered}"


# ----------------------------------------------------------------------------------------------
# RoPE: tables and logits at positions past the original length
# ----------------------------------------------------------------------------------------------

ROPE_BASE = dict(
    BASE,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_hidden_layers=1,
    max_position_embeddings=16,
)
PHI3_ROPE_BASE = dict(
    {k: v for k, v in ROPE_BASE.items() if k != "head_dim"},
    pad_token_id=None,
    max_position_embeddings=64,
    original_max_position_embeddings=16,
)
LONG_FACTORS = [1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0]

# (id, config class, fields): every rope type transformers implements for these families.
ROPE_CASES = [
    ("default", "LlamaConfig", ROPE_BASE),
    ("linear", "LlamaConfig", dict(ROPE_BASE, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    (
        "dynamic",
        "LlamaConfig",
        dict(ROPE_BASE, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    ),
    (
        "yarn",
        "LlamaConfig",
        dict(
            ROPE_BASE,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    (
        "yarn-mscale_betas",
        "LlamaConfig",
        dict(
            ROPE_BASE,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 16,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
                "beta_fast": 16,
                "beta_slow": 2,
            },
        ),
    ),
    (
        "yarn-attention_factor_untruncated",
        "LlamaConfig",
        dict(
            ROPE_BASE,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "attention_factor": 1.3,
                "truncate": False,
            },
        ),
    ),
    (
        "llama3",
        "LlamaConfig",
        dict(
            ROPE_BASE,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    (
        "longrope",
        "Phi3Config",
        dict(
            PHI3_ROPE_BASE,
            rope_scaling={
                "type": "longrope",
                "short_factor": LONG_FACTORS[::-1],
                "long_factor": LONG_FACTORS,
            },
        ),
    ),
    (
        "longrope-partial_rotary_attention_factor",
        "Phi3Config",
        dict(
            PHI3_ROPE_BASE,
            partial_rotary_factor=0.5,
            rope_scaling={
                "type": "longrope",
                "short_factor": LONG_FACTORS[:4],
                "long_factor": LONG_FACTORS[4:],
                "attention_factor": 1.1,
            },
        ),
    ),
    (
        "longrope-legacy_su",
        "Phi3Config",
        dict(
            PHI3_ROPE_BASE,
            rope_scaling={
                "type": "su",
                "short_factor": LONG_FACTORS,
                "long_factor": LONG_FACTORS[::-1],
                "original_max_position_embeddings": 16,
            },
        ),
    ),
]


def reference_tables(model, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos, sin [batch, seq, rotary_dim] from the model's own rotary module."""
    x = torch.zeros(1, dtype=torch.float32)
    return model.model.rotary_emb(x, positions)


@pytest.mark.parametrize(
    "class_name, fields", [c[1:] for c in ROPE_CASES], ids=[c[0] for c in ROPE_CASES]
)
@pytest.mark.parametrize("length", [12, LONG_SEQ], ids=["within", "past_original"])
def test_rope_tables_and_logits_match_transformers(class_name, fields, length):
    config = hf_config(class_name, fields)
    positions = torch.arange(length)[None]
    with saved_checkpoint(config) as (model, directory):
        params = load_fp32(directory)
        ref_cos, ref_sin = reference_tables(model, positions)
        tokens = random_tokens(config.vocab_size, (1, length))
        with torch.no_grad():
            ref = model(tokens).logits
        ours = fnlm.forward(params, tokens)
    cos, sin = rope_tables(params.config, positions)
    half = cos.shape[-1]
    assert cos.shape == (1, length, ref_cos.shape[-1] // 2)
    # The same fp32 expressions as transformers, so the tables are bit-equal; transformers' repeat
    # the half-dim table twice (rotate_half layout).
    assert torch.equal(cos, ref_cos[..., :half]) and torch.equal(sin, ref_sin[..., :half])
    assert max_rel_error(ours, ref) <= FP32_REL_TOL


def test_longrope_switches_factors_past_the_original_length():
    """Within the original length the short factors apply, past it the long ones (a test that the
    case above really exercises both)."""
    config = models.config_from_hf(hf_config("Phi3Config", ROPE_CASES[7][2]).to_dict())
    short, _ = rope_tables(config, torch.arange(16)[None])
    long, _ = rope_tables(config, torch.arange(17)[None])
    assert not torch.allclose(short[0, 15], long[0, 15])


def test_gemma3_local_layers_use_their_own_rope_base():
    fields = dict(FLAG_CASES[4][2])
    config = models.config_from_hf(hf_config("Gemma3TextConfig", fields).to_dict())
    assert config.local_rope_theta == 10.0 and config.rope_theta == 1e6
    assert [config.local_rope(i) for i in range(3)] == [True, False, True]
    positions = torch.arange(8)[None]
    local, _ = rope_tables(config, positions, local=True)
    global_, _ = rope_tables(config, positions)
    assert not torch.allclose(local, global_)


# Hub checkpoints written by transformers v4 keep rope_scaling / rope_theta / rope_local_base_freq
# at the top level, where v5 (which wrote every checkpoint above) nests rope_parameters per layer type.
V4_CONFIGS = [
    (
        "Gemma3TextConfig",
        dict(
            BASE,
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            sliding_window=512,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
        ),
    ),
    (
        "Phi3Config",
        dict(
            NO_HEAD_DIM,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
        ),
    ),
    ("Gemma2Config", dict(BASE, num_hidden_layers=4, sliding_window=4096)),
    ("CohereConfig", dict(NO_HEAD_DIM, use_qk_norm=True)),
]
TRANSLATED_FIELDS = (
    "rope_theta",
    "rope",
    "local_rope_theta",
    "local_rope_scaling",
    "layer_types",
    "sliding_window",
    "attention_scale",
    "attention_softcap",
    "final_softcap",
    "tie_word_embeddings",
    "qk_norm",
)


@pytest.mark.parametrize("class_name, fields", V4_CONFIGS, ids=[c[0] for c in V4_CONFIGS])
def test_v4_config_json_translates_as_transformers_reads_it(class_name, fields):
    cls = getattr(transformers, class_name)
    ours = models.config_from_hf({"model_type": cls.model_type, **fields})
    reference = models.config_from_hf(cls(**fields).to_dict())  # as transformers v5 normalizes it
    for name in TRANSLATED_FIELDS:
        a, b = getattr(ours, name), getattr(reference, name)
        if name == "rope":  # v5 keeps the legacy "type" key beside rope_type
            a, b = ({k: v for k, v in d.items() if k != "type"} for d in (a, b))
        assert a == b, name


# ----------------------------------------------------------------------------------------------
# Context extension: fnlm.load(max_seq_length=L)
# ----------------------------------------------------------------------------------------------


def test_max_seq_length_adds_linear_scaling_like_transformers(capsys):
    """Past the native length, load adds linear scaling by L / native with a one-line notice; the
    logits equal transformers' with that rope_scaling in the config."""
    config = hf_config("LlamaConfig", ROPE_BASE)
    with saved_checkpoint(config) as (model, directory):
        params = load_fp32(directory, max_seq_length=64)
    notice = capsys.readouterr().out.strip().splitlines()
    assert len(notice) == 1 and "linear" in notice[0] and "4" in notice[0]
    assert params.config.rope == {"rope_type": "linear", "factor": 4.0}
    scaled = build_model(
        hf_config(
            "LlamaConfig", dict(ROPE_BASE, rope_scaling={"rope_type": "linear", "factor": 4.0})
        )
    )
    scaled.load_state_dict(model.state_dict())
    tokens = random_tokens(config.vocab_size, (1, LONG_SEQ))
    with torch.no_grad():
        ref = scaled(tokens).logits
    assert max_rel_error(fnlm.forward(params, tokens), ref) <= FP32_REL_TOL


@pytest.mark.parametrize("case", ["dynamic", "longrope"])
def test_max_seq_length_keeps_the_checkpoint_scaling(case, capsys):
    """A checkpoint that already scales keeps its scaling, relative to its own native length."""
    _, class_name, fields = next(c for c in ROPE_CASES if c[0] == case)
    config = hf_config(class_name, fields)
    with saved_checkpoint(config) as (model, directory):
        params = load_fp32(directory, max_seq_length=4 * fields["max_position_embeddings"])
        tokens = random_tokens(config.vocab_size, (1, LONG_SEQ))
        with torch.no_grad():
            ref = model(tokens).logits
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert params.config.rope["rope_type"] == case
    assert max_rel_error(fnlm.forward(params, tokens), ref) <= FP32_REL_TOL


# ----------------------------------------------------------------------------------------------
# The training loss sees the same logits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["gemma2-softcaps_window", "cohere-qk_norm", "granite-multipliers"]
)
def test_loss_applies_logit_scale_and_softcap_like_transformers(case):
    _, class_name, fields = next(c for c in FLAG_CASES if c[0] == case)
    config = hf_config(class_name, fields)
    with saved_checkpoint(config) as (model, directory):
        params = load_fp32(directory)
        tokens = random_tokens(config.vocab_size, (2, SEQ))
        with torch.no_grad():
            ref = model(tokens, labels=tokens).loss
    ours = fnlm.loss(params, {"tokens": tokens})
    assert abs(ours.item() - ref.item()) <= FP32_REL_TOL * max(1.0, ref.item())


# ----------------------------------------------------------------------------------------------
# Mixture of experts: per-expert and stacked weights
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mixtral-top2_of_4_window", "qwen2_moe-shared_expert"])
def test_experts_load_as_transformers_stacks(case):
    """The per-expert checkpoint tensors land in [E, 2I, H] / [E, H, I] stacks equal to the fused
    parameters transformers builds from the same checkpoint."""
    _, class_name, fields = next(c for c in FLAG_CASES if c[0] == case)
    config = hf_config(class_name, fields)
    with saved_checkpoint(config) as (model, directory):
        params = load_fp32(directory)
    assert params.config.moe_layers
    for n in params.config.moe_layers:
        layer = model.model.layers[n]
        experts = getattr(layer, "block_sparse_moe", layer.mlp).experts
        ours = params["layers"][n]["mlp"]["experts"]
        assert torch.equal(ours["gate_up"], experts.gate_up_proj.detach())
        assert torch.equal(ours["down"], experts.down_proj.detach())


@st.composite
def routed_rows(draw):
    experts = draw(st.integers(1, 6))
    k = draw(st.integers(1, experts))
    tokens = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    return experts, k, tokens, seed


@given(routed_rows())
def test_grouped_expert_matmul_matches_the_loop(case):
    """The grouped GEMM (torch._grouped_mm, on CPU in bf16 here) and the per-expert loop give the
    same rows and the same grads of rows and stack, whatever the routing (experts without rows
    included). bf16: both round the same fp32 sums, so they agree within one bf16 ulp (2^-7 rel)."""
    experts, k, tokens, seed = case
    generator = torch.Generator().manual_seed(seed)
    config = ModelConfig(
        model_type="mixtral", vocab_size=8, hidden_size=16, intermediate_size=16, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=8, num_experts=experts, experts_per_token=k,
        moe_layers=(0,),
    )  # fmt: skip
    route = moe.route(config, torch.randn(tokens, experts, generator=generator), torch.bfloat16)
    x = torch.randn(tokens, 16, generator=generator).bfloat16()
    stack = torch.randn(experts, 24, 16, generator=generator).bfloat16()
    grad = torch.randn(tokens * k, 24, generator=generator).bfloat16()
    results = []
    for grouped in (True, False):
        rows = x[route.tokens].requires_grad_()
        w = stack.clone().requires_grad_()
        y = moe.matmul(route, rows, w, grouped=grouped)
        y.backward(grad)
        results.append((y.float(), rows.grad.float(), w.grad.float()))
    for ours, loop in zip(*results, strict=True):
        assert (ours - loop).abs().max() <= 2**-7 * loop.abs().max()
    owner = torch.bucketize(torch.arange(tokens * k), route.offsets.long(), right=True)
    expected = torch.stack(
        [x[t].float() @ stack[e].float().t() for t, e in zip(route.tokens, owner, strict=True)]
    )
    assert (results[1][0] - expected).abs().max() <= 2**-7 * expected.abs().max()


@pytest.mark.parametrize("renormalize", [True, False])
def test_routing_matches_transformers_top_k(renormalize):
    """Routing weights and expert choices equal those of transformers' own Qwen3-MoE router module
    (bit for bit, fp32), sorted by expert with tokens ascending within an expert."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    hf = transformers.Qwen3MoeConfig(
        hidden_size=16, num_experts=5, num_experts_per_tok=2, norm_topk_prob=renormalize
    )
    router = Qwen3MoeTopKRouter(hf)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(5, 16, generator=generator))
        x = torch.randn(7, 16, generator=generator)
        logits, weights, chosen = router(x)
    config = ModelConfig(
        model_type="qwen3_moe", vocab_size=8, hidden_size=16, intermediate_size=16, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=8, num_experts=5, experts_per_token=2,
        moe_layers=(0,), moe_renormalize=renormalize,
    )  # fmt: skip
    route = moe.route(config, logits, torch.float32)
    pairs = sorted((int(chosen[t, s]), t, float(weights[t, s])) for t in range(7) for s in range(2))
    assert route.tokens.tolist() == [t for _, t, _ in pairs]
    assert route.weights.tolist() == [w for *_, w in pairs]
    counts = torch.bincount(chosen.flatten(), minlength=5)
    assert route.offsets.tolist() == counts.cumsum(0).tolist()


# ----------------------------------------------------------------------------------------------
# Parameter names: LoRA targets and quantization
# ----------------------------------------------------------------------------------------------

LINEAR_NAMES = {"q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "router", "shared_gate"}


@pytest.mark.parametrize(
    "class_name, fields", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES]
)
def test_every_linear_weight_has_a_target_name(class_name, fields):
    """Every 2-D weight inside the layers ends in one of the linear names LoRA targets use, so
    `targets=("q", "gate", ...)` reaches it in every family (experts: [..., "experts", e, "gate"])."""
    config = models.config_from_hf(hf_config(class_name, fields).to_dict())
    names = models.family(config.model_type).weight_names(config)
    for path, shape in names.values():
        if path[0] == "layers" and len(shape) == 2 and not str(path[-1]).endswith("norm"):
            assert path[-1] in LINEAR_NAMES, path


# ----------------------------------------------------------------------------------------------
# NF4 loading against transformers + bitsandbytes
# ----------------------------------------------------------------------------------------------

# One case per dense family (fused qkv, LayerNorm with bias, parallel blocks, softcaps, ...). MoE
# families have no reference here: transformers v5 keeps routers and stacked experts outside
# nn.Linear, so bitsandbytes does not quantize them.
NF4_CASES = [
    "gemma-untied",
    "gemma2-softcaps_window",
    "gemma3_text-local_rope",
    "phi3-partial_rotary_window",
    "granite-multipliers",
    "cohere-qk_norm",
    "starcoder2-bias_window",
    "olmo2-bias",
    "falcon-multi_query_parallel",
    "falcon-new_layout_two_norms",
]


def bnb_nf4(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every nn.Linear but the lm head replaced by bitsandbytes' NF4 Linear4bit
    (double quant, fp32 compute), quantized from the same fp32 weights: what transformers'
    load_in_4bit does, without its loader's own dtype casts."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or child is model.lm_head:
                continue
            nf4 = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
                compress_statistics=True,
            )
            nf4.weight = bnb.nn.Params4bit(
                child.weight.data.clone(),
                requires_grad=False,
                quant_type="nf4",
                compress_statistics=True,
            )
            if child.bias is not None:
                nf4.bias = child.bias
            setattr(parent, name, nf4.to(child.weight.device))  # .to() quantizes
    return model


# bitsandbytes 0.50's CPU backend mis-quantizes weights whose in_features is not a multiple of the
# 64-element block (its output is off by far more than NF4's own error; fnlm's is not), so the NF4
# cases use widths that are multiples of 64.
NF4_WIDTHS = dict(hidden_size=64, intermediate_size=128)
NF4_WIDTHS_16 = dict(NF4_WIDTHS, head_dim=16)


@pytest.mark.parametrize("case", NF4_CASES)
def test_nf4_logits_match_bitsandbytes(case):
    pytest.importorskip("bitsandbytes")
    _, class_name, fields = next(c for c in FLAG_CASES if c[0] == case)
    fields = {**fields, **NF4_WIDTHS, **({"head_dim": 16} if "head_dim" in fields else {})}
    assert_nf4_matches_bitsandbytes(hf_config(class_name, fields))


def assert_nf4_matches_bitsandbytes(config) -> None:
    """fnlm's NF4 logits equal transformers' with bitsandbytes Linear4bit in place of its linears."""
    with saved_checkpoint(config) as (model, directory):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
        tokens = random_tokens(config.vocab_size, (2, SEQ))
        with torch.no_grad():
            full = model(tokens).logits
            ref = bnb_nf4(model)(tokens).logits
    ours = fnlm.forward(params, tokens)
    # the reference really is quantized: NF4 moves the logits far more than the tolerance
    assert max_rel_error(ref, full) > 100 * FP32_REL_TOL
    assert max_rel_error(ours, ref) <= FP32_REL_TOL


CORE_NF4_CASES = {
    "llama-untied": transformers.LlamaConfig(**dict(BASE, **NF4_WIDTHS_16)),
    "llama-tied": transformers.LlamaConfig(**dict(BASE, **NF4_WIDTHS_16), tie_word_embeddings=True),
    "mistral-window": transformers.MistralConfig(**dict(BASE, **NF4_WIDTHS_16), sliding_window=3),
    "qwen2-qkv_bias": transformers.Qwen2Config(**dict(BASE, **NF4_WIDTHS_16)),
    "qwen3-qk_norm": transformers.Qwen3Config(**dict(BASE, **NF4_WIDTHS_16)),
}


@pytest.mark.parametrize("case", sorted(CORE_NF4_CASES))
def test_nf4_logits_of_the_core_families_match_bitsandbytes(case):
    """As above for the core issue's families (the MoE families' experts are fused 3-D tensors in
    transformers, which bitsandbytes' Linear4bit cannot stand in for)."""
    pytest.importorskip("bitsandbytes")
    assert_nf4_matches_bitsandbytes(CORE_NF4_CASES[case])


@pytest.mark.parametrize(
    "case", ["mixtral-top2_of_4_window", "qwen3_moe-renormalized", "qwen2_moe-shared_expert"]
)
def test_nf4_moe_logits_match_transformers_on_the_dequantized_weights(case, tmp_path):
    """transformers holds MoE experts as fused 3-D tensors, which bitsandbytes' Linear4bit cannot
    stand in for; so the NF4 params (quantization itself is checked bit-exact against bitsandbytes
    in test_quant), exported dequantized, are what transformers runs: same logits as fnlm's NF4
    forward, and far from the unquantized model's."""
    _, class_name, fields = next(c for c in FLAG_CASES if c[0] == case)
    config = hf_config(class_name, fields)
    with saved_checkpoint(config) as (model, directory):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
        tokens = random_tokens(config.vocab_size, (2, SEQ))
        with torch.no_grad():
            full = model(tokens).logits
    params.source = None  # export the dequantized NF4 values, not the 16-bit checkpoint
    fnlm.save(tmp_path / "dequantized", params, format="merged")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dequantized", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ref = reference(tokens).logits
    ours = fnlm.forward(params, tokens)
    assert max_rel_error(ref, full) > 100 * FP32_REL_TOL
    assert max_rel_error(ours, ref) <= FP32_REL_TOL


def test_nf4_moe_merged_export_cuts_the_checkpoint_experts_back_out(tmp_path):
    """An NF4 MoE model exported merged: each expert's matrix, cut from its stack, is the 16-bit
    checkpoint's own tensor (fnlm.save reads it back after checking the quantized stack matches),
    bit for bit, under the checkpoint's per-expert names."""
    from safetensors.torch import load_file

    _, class_name, fields = next(c for c in FLAG_CASES if c[0] == "qwen3_moe-renormalized")
    with saved_checkpoint(hf_config(class_name, fields)) as (_, directory):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
        fnlm.save(tmp_path / "merged", params, format="merged")
        original = load_file(directory / "model.safetensors")
    exported = load_file(tmp_path / "merged" / "model.safetensors")
    experts = [n for n in original if ".experts." in n]
    assert experts and set(exported) == set(original)
    for name in experts:
        assert torch.equal(exported[name], original[name].float()), name


def test_nf4_moe_merged_export_with_expert_lora_folds_into_the_checkpoint(tmp_path):
    """NF4 base + LoRA on the experts, exported merged: each expert is the 16-bit checkpoint's
    tensor plus its own delta, so transformers' logits equal fnlm's fp32 model with the adapter."""
    import torch.utils._pytree as pytree

    _, class_name, fields = next(c for c in FLAG_CASES if c[0] == "qwen3_moe-renormalized")
    config = hf_config(class_name, fields)
    with saved_checkpoint(config) as (_, directory):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
        dense = load_fp32(directory)
        lora = fnlm.lora.init(params, r=2, alpha=4, targets="all-linear")
        g = torch.Generator().manual_seed(3)
        lora = pytree.tree_map(lambda t: t + 0.3 * torch.randn(t.shape, generator=g), lora)
        assert isinstance(lora["layers"][1]["mlp"]["experts"]["gate_up"], dict)
        fnlm.save(tmp_path / "merged", params, lora=lora, format="merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float32
    )
    tokens = random_tokens(config.vocab_size, (2, SEQ))
    with torch.no_grad():
        ref = model.eval()(tokens).logits
        ours = fnlm.forward(dense, tokens, lora=lora)
        base = fnlm.forward(dense, tokens)
    assert max_rel_error(ref, base) > 100 * FP32_REL_TOL  # the adapter moved the logits
    assert max_rel_error(ref, ours) <= FP32_REL_TOL


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_expert_matmul_shapes_decide_the_grouped_path(quant, monkeypatch):
    """What `grouped_everywhere` (CUDA-graph decode or not) checks: every expert matrix as
    [out, in], for 16-bit [E, out, in] and quantized [E·out, in] stacks alike."""
    _, class_name, fields = next(c for c in FLAG_CASES if c[0] == "qwen3_moe-renormalized")
    with saved_checkpoint(hf_config(class_name, fields)) as (_, directory):
        params, _ = fnlm.load(directory, quant=quant, dtype=torch.bfloat16, device="cpu")
    h, i = params.config.hidden_size, params.config.expert_size
    shapes = moe.matmul_shapes(params)
    assert sorted(s[:2] for s in shapes) == sorted(
        [(2 * i, h), (h, i)] * len(params.config.moe_layers)
    )
    assert not moe.grouped_everywhere(params)  # CPU: the loop
    seen = []
    monkeypatch.setattr(
        moe, "_grouped_case", lambda x, out, inner: seen.append((out, inner)) or True
    )
    assert moe.grouped_everywhere(params) and seen == [s[:2] for s in shapes]


def test_nf4_keeps_moe_routers_16_bit():
    _, class_name, fields = next(c for c in FLAG_CASES if c[0] == "qwen2_moe-shared_expert")
    with saved_checkpoint(hf_config(class_name, fields)) as (_, directory):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
    mlp = params["layers"][1]["mlp"]
    assert type(mlp["router"]) is torch.Tensor and type(mlp["shared_gate"]) is torch.Tensor
    assert type(mlp["experts"]["gate_up"]) is not torch.Tensor  # experts are quantized


# ----------------------------------------------------------------------------------------------
# The registry refuses what it cannot run exactly
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(models.UNSUPPORTED))
def test_unsupported_architectures_name_the_reason(model_type):
    with pytest.raises(UnsupportedModelError, match=model_type) as error:
        models.config_from_hf({"model_type": model_type})
    assert models.UNSUPPORTED[model_type][:20] in str(error.value)


@pytest.mark.parametrize(
    "fields, reason",
    [
        (dict(model_type="falcon", alibi=True), "alibi"),
        (dict(model_type="gemma3_text", use_bidirectional_attention=True), "bidirectional"),
    ],
    ids=["falcon-alibi", "gemma3_text-bidirectional"],
)
def test_unsupported_variants_name_the_reason(fields, reason):
    with pytest.raises(UnsupportedModelError, match=reason):
        models.config_from_hf({**NO_HEAD_DIM, "num_hidden_layers": 1, **fields})


def test_registry_lists_sixteen_families():
    assert len(models.FAMILIES) >= 16
    for model_type, module in models.FAMILIES.items():
        assert model_type in module.MODEL_TYPES
        assert callable(module.config_from_hf) and callable(module.weight_names)
