"""GLM-4.5 / GLM-4.6 (`glm4_moe`) against transformers (+ peft): DeepSeek-V3's sigmoid router with
its correction bias and group-limited top-k (fnlm.models.moe.sigmoid_topk) against transformers'
Glm4MoeTopkRouter, then the shared per-family checks (tests/family_checks.py) on hypothesis-drawn
tiny configs: logits with left padding, greedy generation, LoRA on attention and the expert
stacks against peft, training, merged export, NF4."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

import fnlm
from fnlm.config import ModelConfig
from fnlm.errors import ConfigError
from fnlm.models import moe
from fnlm.models.qwen3_moe import QWEN_EXPERTS
from tests.family_checks import (
    EXAMPLES,
    NO_TOKENIZER,
    assert_nf4_matches_dequantized,
    check_adapter_matches_peft,
    check_compiled_generation_equals_eager,
    check_greedy_matches,
    check_logits_match,
    check_merged_export_matches,
    check_training_matches_peft,
    family,
    load_fp32,
    router_bias_checkpoint,
    tokens_for,
)
from tests.models import FP32_REL_TOL, max_rel_error
from tests.test_train import random_data

pytestmark = NO_TOKENIZER
GLM4_MOE = family("glm4_moe")


@st.composite
def router_cases(draw) -> dict:
    """A router's sizes: experts in groups (one group too), the groups kept, k within them."""
    groups = draw(st.sampled_from([1, 2, 4]))
    experts = groups * draw(st.integers(2, 4))
    kept = draw(st.integers(1, groups))
    return dict(
        n_routed_experts=experts,
        n_group=groups,
        topk_group=kept,
        num_experts_per_tok=draw(st.integers(1, kept * experts // groups)),
        norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        hidden_size=draw(st.sampled_from([8, 16])),
    )


def router_config(case: dict) -> ModelConfig:
    return ModelConfig(
        model_type="glm4_moe", vocab_size=8, hidden_size=case["hidden_size"],
        intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
        num_experts=case["n_routed_experts"], experts_per_token=case["num_experts_per_tok"],
        moe_renormalize=case["norm_topk_prob"], moe_scoring="sigmoid",
        moe_groups=case["n_group"], moe_topk_groups=case["topk_group"],
        moe_routed_scale=case["routed_scaling_factor"],
    )  # fmt: skip


def dense_weights(route: moe.Route, tokens: int) -> torch.Tensor:
    """A Route's weights as a [tokens, experts] matrix (0 where a token did not choose)."""
    expert = torch.bucketize(torch.arange(route.tokens.shape[0]), route.offsets, right=True)
    out = torch.zeros(tokens, route.experts, dtype=route.weights.dtype)
    out[route.tokens, expert] = route.weights
    return out


@GLM4_MOE
@settings(max_examples=20, deadline=None)
@given(case=router_cases(), seed=st.integers(0, 2**16))
def test_sigmoid_router_matches_transformers_glm4_moe(model_type, case, seed):
    """moe.route with sigmoid scoring chooses the experts transformers' Glm4MoeTopkRouter (the
    same code as DeepSeek-V3's) chooses, with its weights (fp32, 1e-6 relative): random logits and
    a random correction bias large enough to change the choice."""
    g = torch.Generator().manual_seed(seed)
    router = Glm4MoeTopkRouter(transformers.Glm4MoeConfig(**case))
    with torch.no_grad():
        router.weight.normal_(0, 1, generator=g)
        router.e_score_correction_bias.normal_(0, 0.5, generator=g)
    x = torch.randn(7, case["hidden_size"], generator=g)
    with torch.no_grad():
        _, ref_weights, ref_chosen = router(x)
    ref = torch.zeros(7, case["n_routed_experts"]).scatter_(1, ref_chosen, ref_weights)
    config = router_config(case)
    logits = F.linear(x, router.weight)
    route = moe.route(config, logits, torch.float32, correction=router.e_score_correction_bias)
    ours = dense_weights(route, 7)
    assert torch.equal(ours != 0, ref != 0)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)


@GLM4_MOE
def test_sigmoid_router_compiles_without_host_reads_glm4_moe(model_type):
    """The grouped choice is device ops only: it traces as one graph (fullgraph=True), as a CUDA
    graph capture of a decode step needs, with eager's result."""
    case = dict(
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=True,
        routed_scaling_factor=2.0, hidden_size=8,
    )  # fmt: skip
    config = router_config(case)
    logits, correction = torch.randn(5, 8), torch.randn(8)

    def weights(logits, correction):
        route = moe.route(config, logits, torch.float32, correction=correction)
        return route.weights, route.tokens, route.offsets

    compiled = torch.compile(weights, fullgraph=True, backend="aot_eager")
    for ours, ref in zip(compiled(logits, correction), weights(logits, correction), strict=True):
        assert torch.equal(ours, ref)


@GLM4_MOE
def test_router_groups_are_checked_glm4_moe(model_type):
    case = dict(
        n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3, norm_topk_prob=True,
        routed_scaling_factor=1.0, hidden_size=8,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="topk_group"):  # one group of two for three experts
        router_config(case)
    with pytest.raises(ConfigError, match="n_group"):
        router_config({**case, "n_group": 3, "topk_group": 2})
    with pytest.raises(ConfigError, match="sigmoid"):
        router_config({**case, "topk_group": 2}).replace(moe_scoring="softmax")


# ----------------------------------------------------------------------------------------------
# The family: tiny checkpoints
# ----------------------------------------------------------------------------------------------


@st.composite
def glm_configs(draw) -> transformers.Glm4MoeConfig:
    """A tiny GLM-4.5: partial rotary, q/k norm and qkv biases or not, dense layers first, experts
    in groups (one group too), one or two shared experts."""
    kv_heads = draw(st.sampled_from([1, 2]))
    layers = draw(st.integers(2, 3))
    groups = draw(st.sampled_from([1, 2]))
    experts = groups * draw(st.integers(2, 3))
    kept = draw(st.integers(1, groups))
    return transformers.Glm4MoeConfig(
        vocab_size=draw(st.integers(64, 128)),
        hidden_size=draw(st.sampled_from([32, 64])),
        intermediate_size=draw(st.sampled_from([40, 64])),
        num_hidden_layers=layers,
        num_attention_heads=kv_heads * draw(st.sampled_from([1, 2])),
        num_key_value_heads=kv_heads,
        head_dim=draw(st.sampled_from([8, 16])),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": draw(st.sampled_from([10000.0, 1e6])),
            "partial_rotary_factor": draw(st.sampled_from([0.5, 1.0])),
        },
        use_qk_norm=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        tie_word_embeddings=draw(st.booleans()),
        moe_intermediate_size=draw(st.sampled_from([16, 24])),
        n_routed_experts=experts,
        n_group=groups,
        topk_group=kept,
        num_experts_per_tok=draw(st.integers(1, min(3, kept * experts // groups))),
        n_shared_experts=draw(st.integers(1, 2)),
        first_k_dense_replace=draw(st.integers(0, layers - 1)),
        norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        max_position_embeddings=256,
        initializer_range=0.2,  # large enough that logits are far from zero
    )


@GLM4_MOE
def test_config_translation_glm4_moe(model_type):
    """GLM-4.5-Air's config.json fields (transformers 4's layout: partial_rotary_factor and
    rope_theta at the top) land in ModelConfig."""
    from fnlm.models import glm4_moe

    hf = {
        "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 4096,
        "intermediate_size": 10944, "num_hidden_layers": 46, "num_attention_heads": 96,
        "num_key_value_heads": 8, "head_dim": 128, "partial_rotary_factor": 0.5,
        "rope_theta": 1000000, "attention_bias": True, "use_qk_norm": False,
        "moe_intermediate_size": 1408, "n_routed_experts": 128, "num_experts_per_tok": 8,
        "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
        "norm_topk_prob": True, "routed_scaling_factor": 1.0, "num_nextn_predict_layers": 1,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
    }  # fmt: skip
    config = glm4_moe.config_from_hf(hf)
    assert config.rotary_dim == 64 and config.rope_theta == 1e6
    assert config.attention_bias and not config.o_bias and not config.qk_norm
    assert config.moe_layers == tuple(range(1, 46)) and config.shared_expert_size == 1408
    assert (config.moe_scoring, config.moe_groups, config.experts_per_token) == ("sigmoid", 1, 8)
    del hf["partial_rotary_factor"]  # transformers' default
    assert glm4_moe.config_from_hf(hf).rotary_dim == 64
    with pytest.raises(ConfigError, match="n_shared_experts 0"):
        glm4_moe.config_from_hf({**hf, "n_shared_experts": 0})
    with pytest.raises(ConfigError, match="topk_group"):  # 4 of 128 experts for 8 per token
        glm4_moe.config_from_hf({**hf, "n_group": 64, "topk_group": 2})


@GLM4_MOE
@EXAMPLES
@given(data=st.data())
def test_logits_match_transformers_glm4_moe(model_type, data):
    """Logits, and logits of a left-padded batch, equal transformers' (fp32)."""
    config = data.draw(glm_configs())
    check_logits_match(data, config, router_bias_checkpoint(config))


@GLM4_MOE
@EXAMPLES
@given(data=st.data())
def test_greedy_matches_transformers_glm4_moe(model_type, data):
    config = data.draw(glm_configs())
    check_greedy_matches(data, config, router_bias_checkpoint(config), most_new=8)


@GLM4_MOE
def test_compiled_generation_equals_eager_glm4_moe(model_type, monkeypatch):
    """The compiled prefill and decode layers (dynamo traces the sigmoid router; CPU test with a
    backend that runs the traced graph) give eager's tokens, and transformers'."""
    checkpoint = router_bias_checkpoint(transformers.Glm4MoeConfig(**TINY))
    check_compiled_generation_equals_eager(monkeypatch, checkpoint)


@GLM4_MOE
def test_multi_token_prediction_layers_are_skipped_glm4_moe(model_type, tmp_path):
    """A checkpoint with GLM-4.5's multi-token-prediction layer (model.layers.{num_hidden_layers})
    loads without it, with transformers' logits."""
    config = transformers.Glm4MoeConfig(**TINY)
    with router_bias_checkpoint(config) as (model, directory):
        state = load_file(directory / "model.safetensors")
        extra = f"model.layers.{config.num_hidden_layers}."
        state[extra + "eh_proj.weight"] = torch.randn(64, 128)
        state[extra + "mlp.gate.weight"] = torch.randn(4, 64)
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        params = load_fp32(directory)
        tokens = tokens_for(config.vocab_size)
        with torch.no_grad():
            ref = model(tokens).logits
    assert max_rel_error(fnlm.forward(params, tokens), ref) <= FP32_REL_TOL


# ----------------------------------------------------------------------------------------------
# LoRA, training, export, NF4
# ----------------------------------------------------------------------------------------------

EXPERT_TARGETS = ["router", "experts.gate_up", "experts.down"]


@GLM4_MOE
@EXAMPLES
@given(data=st.data())
def test_saved_adapter_loads_in_peft_with_same_logits_glm4_moe(model_type, data, tmp_path_factory):
    """LoRA on attention (biases with "lora_only") and on the router and expert stacks (peft's
    target_parameters): peft loads our adapter with our logits and re-saves the same files."""
    config = data.draw(glm_configs())
    targets = data.draw(st.lists(st.sampled_from(["q", "k", "v", "o"]), min_size=1, unique=True))
    targets += data.draw(st.sampled_from([[], EXPERT_TARGETS, ["experts.down"]]))
    bias = data.draw(st.sampled_from(["none", "lora_only"]))
    check_adapter_matches_peft(
        config, router_bias_checkpoint(config), tmp_path_factory, targets=targets, bias=bias
    )


@GLM4_MOE
def test_lora_targets_glm4_moe(model_type):
    """Per-expert names reach the expert stacks, as peft 0.21 converts them for glm4_moe."""
    with router_bias_checkpoint(transformers.Glm4MoeConfig(**TINY)) as (_, directory):
        params = load_fp32(directory)
    names = fnlm.lora.target_names(params.config, experts=True)
    assert names["router"] == "gate.weight" and names["experts.gate_up"] == "gate_up_proj"
    lora = fnlm.lora.init(params, r=2, targets=("gate_proj", "up_proj", "down_proj"))
    assert set(lora["layers"][1]["mlp"]["experts"]) == {"gate_up", "down"}
    assert "mlp" not in lora["layers"][0]  # the dense layer's MLP: peft does not reach it


@GLM4_MOE
@pytest.mark.parametrize("targets", ["all-linear", "experts"])
@settings(max_examples=1, deadline=None)
@given(data=st.data())
def test_lora_training_matches_peft_glm4_moe(model_type, targets, data, tmp_path_factory):
    """Six steps against peft + transformers: fnlm's default targets (all linear: attention, the
    routers and expert stacks), or q, v, the router and both expert stacks."""
    config = data.draw(glm_configs())
    targets = None if targets == "all-linear" else ("q", "v", *EXPERT_TARGETS)
    check_training_matches_peft(config, router_bias_checkpoint(config), tmp_path_factory, targets)


@GLM4_MOE
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_merged_export_loads_in_transformers_glm4_moe(model_type, data, tmp_path_factory):
    """The merged export (routers' correction biases, shared experts, expert stacks merged with
    their adapters) loads in transformers with fnlm's adapted logits, and in fnlm again."""
    config = data.draw(glm_configs())
    targets = ("q", "o", "experts.gate_up", "experts.down", "router")
    check_merged_export_matches(config, router_bias_checkpoint(config), tmp_path_factory, targets)


@GLM4_MOE
def test_transformers_4_adapter_loads_as_trained_glm4_moe(model_type, monkeypatch, tmp_path):
    """An adapter trained under transformers 4 (one Linear per expert: "mlp.experts.3.gate_proj")
    loads with the logits it had when trained (each factor's scale·B·A added to its weight by
    hand), which are also peft 0.21's (it converts glm4_moe's per-expert factors too)."""
    from tests import test_moe_lora_legacy as legacy

    config = transformers.Glm4MoeConfig(**dict(TINY, first_k_dense_replace=0))
    names = {ours: theirs for theirs, ours in QWEN_EXPERTS.items()}  # "gate": "gate_proj", ...
    family = legacy.Family(lambda: config, "mlp", names, 4, 64)
    monkeypatch.setitem(legacy.FAMILIES, model_type, family)
    tokens = tokens_for(config.vocab_size)
    with router_bias_checkpoint(config) as (model, directory):
        factors = legacy.write_legacy(tmp_path, config, model_type)
        params = load_fp32(directory)
        ours = legacy.fnlm_logits(params, tmp_path, tokens)
        oracle = legacy.oracle_logits(model, factors, tokens)
        ref = legacy.peft_logits(model, tmp_path, tokens)
        with torch.no_grad():
            plain = model(tokens).logits
    assert max_rel_error(ours, oracle) <= FP32_REL_TOL
    assert max_rel_error(ours, ref) <= FP32_REL_TOL
    assert max_rel_error(ours, plain) > 100 * FP32_REL_TOL


@GLM4_MOE
def test_full_finetune_sharded_with_fp32_routers_glm4_moe(model_type, tmp_path):
    """FSDP2 trains one dtype per layer group: a bf16 full fine-tune without fp32 masters
    (distributed="fsdp", a group of this one process) stores the fp32 routers in bf16 too, and
    runs, rather than stop in FSDP's dtype assertion."""
    from tests.test_train import run_config

    with router_bias_checkpoint(transformers.Glm4MoeConfig(**TINY)) as (_, directory):
        params, _ = fnlm.load(directory, quant=None, dtype=torch.bfloat16, device="cpu")
    config = run_config(tmp_path, mode="full", max_steps=2, distributed="fsdp")
    result = fnlm.train.train(config, params=params, data=random_data(n=8, vocab=96))
    assert result.status == "completed" and all(map(math.isfinite, result.losses))


# in_features multiples of 64 (NF4 blocks never straddle two experts); a dense layer, a MoE one
TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=64,
    n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
    first_k_dense_replace=1, use_qk_norm=True, attention_bias=True, routed_scaling_factor=2.0,
    initializer_range=0.2, max_position_embeddings=256,
)  # fmt: skip


@GLM4_MOE
def test_nf4_logits_match_transformers_on_the_dequantized_weights_glm4_moe(model_type, tmp_path):
    """NF4 params (expert stacks and shared experts too; the router and its correction bias stay
    fp32, as transformers keeps them) give the logits transformers gives on their dequantized
    weights (written by fnlm's merged export); the NF4 error is real."""
    config = transformers.Glm4MoeConfig(**TINY)
    tokens = tokens_for(config.vocab_size, (2, 10))
    with router_bias_checkpoint(config) as (model, directory):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
    mlp = params["layers"][1]["mlp"]
    assert fnlm.quant.is_quantized(mlp["experts"]["gate_up"])
    assert fnlm.quant.is_quantized(mlp["shared"]["down"])
    assert not fnlm.quant.is_quantized(mlp["router"])
    assert_nf4_matches_dequantized(model, params, tokens, tmp_path)


@GLM4_MOE
def test_router_stays_fp32_in_bf16_glm4_moe(model_type, tmp_path):
    """Loaded in bf16, the router and its correction bias stay fp32 (transformers'
    _keep_in_fp32_modules_strict) and the decoder routes bf16 hidden states in fp32 as
    transformers' bf16 model does: the same experts, the same weights (to bf16 rounding). A bf16
    merged export writes them in fp32, unrounded."""
    from fnlm.models import decoder

    config = transformers.Glm4MoeConfig(**TINY)
    with router_bias_checkpoint(config) as (_, directory):
        params, _ = fnlm.load(directory, quant=None, dtype=torch.bfloat16, device="cpu")
        bf16 = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
        source = load_file(directory / "model.safetensors")
    fnlm.save(tmp_path, params, format="merged")
    written = load_file(tmp_path / "model.safetensors")
    for name in (
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
    ):
        assert torch.equal(written[name], source[name])  # fp32, as read
    assert written["model.layers.1.mlp.shared_experts.up_proj.weight"].dtype == torch.bfloat16
    mlp = params["layers"][1]["mlp"]
    assert mlp["router"].dtype == mlp["router_correction"].dtype == torch.float32
    assert mlp["experts"]["gate_up"].dtype == torch.bfloat16
    x = torch.randn(32, config.hidden_size, generator=torch.Generator().manual_seed(0))
    x = x.bfloat16()
    with torch.no_grad():
        _, weights, chosen = bf16.model.layers[1].mlp.gate(x)
    ref = torch.zeros(32, config.n_routed_experts).scatter_(1, chosen, weights)
    logits = decoder.linear(x.to(mlp["router"].dtype), mlp["router"])
    route = moe.route(params.config, logits, torch.bfloat16, correction=mlp["router_correction"])
    ours = dense_weights(route, 32)
    assert torch.equal(ours != 0, ref != 0)
    assert torch.equal(ours, ref.bfloat16())
