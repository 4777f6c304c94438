"""Qwen3-Next against transformers (+ peft): the shared per-family checks (tests/family_checks.py)
on hypothesis-drawn tiny configs — logits with left padding, greedy generation (compiled too),
packed rows, a saved adapter in peft, LoRA training, merged export — plus NF4, peft's all-linear
targets, a transformers-4 adapter and the real 80B-A3B config.

Drawn configs (tests/test_qwen3_5.py's text fields plus experts) put several value heads on a key
head (the fused in_proj_qkvz / in_proj_ba group them per key head), dense and MoE layers
(decoder_sparse_step, mlp_only_layers) and both layer kinds. Not in tests/models.py's HF_CONFIGS
(as Qwen3.5): peft's bias="all" also trains the DeltaNet's dt_bias, which fnlm refuses."""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from tests.family_checks import (
    EXAMPLES,
    NO_TOKENIZER,
    assert_nf4_matches_dequantized,
    check_adapter_matches_peft,
    check_compiled_generation_equals_eager,
    check_greedy_matches,
    check_logits_match,
    check_merged_export_matches,
    check_packed_rows_equal_documents,
    check_training_matches_peft,
    family,
    load_fp32,
    tokens_for,
)
from tests.models import FP32_REL_TOL, max_rel_error, saved_checkpoint
from tests.test_lora import randomize_peft, read_adapter
from tests.test_qwen3_5 import text_fields

pytestmark = [NO_TOKENIZER, pytest.mark.filterwarnings("ignore:.*flash-linear-attention")]
FAMILY = family("qwen3_next")
# fnlm's names of the DeltaNet projections (peft's: in_proj_qkvz, in_proj_ba, out_proj)
LINEAR_TARGETS = ["in_qkvz", "in_ba", "out"]


@st.composite
def hf_configs(draw) -> transformers.Qwen3NextConfig:
    """Qwen3.5's drawn text fields (both layer kinds, several value heads per key head) with
    experts on the layers decoder_sparse_step picks, less mlp_only_layers."""
    fields = draw(text_fields())
    layers, experts = fields["num_hidden_layers"], draw(st.integers(2, 4))
    fields.update(
        num_experts=experts,
        num_experts_per_tok=draw(st.integers(1, min(2, experts))),
        norm_topk_prob=draw(st.booleans()),
        moe_intermediate_size=draw(st.sampled_from([24, 40])),
        shared_expert_intermediate_size=draw(st.sampled_from([16, 24])),
        decoder_sparse_step=draw(st.integers(1, 2)),
        mlp_only_layers=draw(st.lists(st.integers(0, layers - 1), max_size=1)),
    )
    return transformers.Qwen3NextConfig(**fields)


# in_features multiples of 64 (NF4 blocks); two value heads per key head; a dense layer (1) and
# MoE layers
TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, full_attention_interval=2, num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=64, shared_expert_intermediate_size=64, mlp_only_layers=[1],
    initializer_range=0.2, max_position_embeddings=256,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Logits, generation, packed rows
# ----------------------------------------------------------------------------------------------


@FAMILY
@EXAMPLES
@given(data=st.data())
def test_logits_match_transformers_qwen3_next(model_type, data):
    """Logits, and logits of a left-padded batch, equal transformers' (fp32); sequences longer
    than one 64-token chunk of the delta rule are drawn too."""
    config = data.draw(hf_configs())
    lengths = st.sampled_from([3, 12, 70])
    params = check_logits_match(data, config, saved_checkpoint(config), lengths)
    assert params.config.model_type == model_type


@FAMILY
@EXAMPLES
@given(data=st.data())
def test_greedy_matches_transformers_qwen3_next(model_type, data):
    """Prefill (chunked delta rule) then one-token steps (the recurrence, conv and recurrent
    states in the cache), left-padded batches, equal transformers' greedy generate."""
    config = data.draw(hf_configs())
    check_greedy_matches(data, config, saved_checkpoint(config), most_new=8)


@FAMILY
def test_compiled_greedy_equals_eager_qwen3_next(model_type, monkeypatch):
    """The compiled prefill and decode layers (dynamo traces the fused projections' regrouping
    and the DeltaNet state updates; CPU test with a backend that runs the traced graph) give
    eager's tokens, which are transformers'."""
    checkpoint = saved_checkpoint(transformers.Qwen3NextConfig(**TINY))
    check_compiled_generation_equals_eager(monkeypatch, checkpoint)


@FAMILY
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_packed_rows_equal_separate_documents_qwen3_next(model_type, data):
    """Packed rows (segments): each document's logits are those of the document alone."""
    config = data.draw(hf_configs())
    checkpoint = saved_checkpoint(config)
    check_packed_rows_equal_documents(data, config, checkpoint, padding=2, first_segment=1)


# ----------------------------------------------------------------------------------------------
# LoRA, training, export
# ----------------------------------------------------------------------------------------------


@FAMILY
@EXAMPLES
@given(data=st.data())
def test_saved_adapter_loads_in_peft_with_same_logits_qwen3_next(
    model_type, data, tmp_path_factory
):
    """LoRA on attention, on the fused linear-attention projections (in_proj_qkvz, in_proj_ba,
    out_proj), on the shared expert's gate and on the experts and router (peft's
    target_parameters): peft loads our adapter with our logits and re-saves the same files."""
    config = data.draw(hf_configs())
    names = ["q", "k", "v", "o", *LINEAR_TARGETS, "shared_gate"]
    targets = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    targets += data.draw(st.sampled_from([["in_qkvz"], ["in_proj_ba"], []]))  # linear layers
    targets += data.draw(st.sampled_from([[], ["gate", "up", "down"], ["router", "down"]]))
    bias = data.draw(st.sampled_from(["none", "lora_only"]))
    check_adapter_matches_peft(
        config, saved_checkpoint(config), tmp_path_factory, targets=targets, bias=bias
    )


@FAMILY
def test_lora_targets_qwen3_next(model_type, tmp_path):
    """The fused projections are targets under peft's names; all-linear adapts the modules and
    parameters peft's all-linear does (the experts and router as target_parameters, the shared
    expert's gate, not the shared expert or the dense MLP, which peft's rewrite drops), and peft's
    all-linear adapter loads in fnlm with peft's logits; bias="all" is refused."""
    with saved_checkpoint(transformers.Qwen3NextConfig(**TINY)) as (model, directory):
        params = load_fp32(directory)
        names = fnlm.lora.target_names(params.config)
        expected = {
            "in_qkvz": "in_proj_qkvz", "in_ba": "in_proj_ba", "out": "out_proj",
            "q": "q_proj", "shared_gate": "shared_expert_gate",
        }  # fmt: skip
        assert expected.items() <= names.items()
        assert "conv" not in names and "A_log" not in names
        lora = fnlm.lora.init(params, r=2, targets=("in_proj_qkvz", "out_proj"))
        assert set(lora["layers"][0]["attn"]) == {"in_qkvz", "out"}
        with pytest.raises(fnlm.errors.LoraError, match="bias='all' is not supported"):
            fnlm.lora.init(params, r=2, bias="all")

        fnlm.lora.save(tmp_path / "ours", fnlm.lora.init(params, r=2, targets="all-linear"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = peft.LoraConfig(r=2, target_modules="all-linear")
            reference = peft.get_peft_model(model, config).eval()
            randomize_peft(reference)  # peft's adapter, trained: B nonzero, each factor its own
            reference.save_pretrained(tmp_path / "peft")
        ours, theirs = read_adapter(tmp_path / "ours")[1], read_adapter(tmp_path / "peft")[1]
        assert ours.keys() == theirs.keys()
        assert any("shared_expert_gate" in k for k in ours)
        assert not any("shared_expert." in k or "layers.1.mlp" in k for k in ours)
        # and peft's adapter loads in fnlm with peft's logits
        tokens = tokens_for(params.config.vocab_size)
        with torch.no_grad():
            ref = reference(tokens).logits
        lora = fnlm.lora.load(tmp_path / "peft", params)
        assert max_rel_error(fnlm.forward(params, tokens, lora=lora), ref) <= FP32_REL_TOL
        assert max_rel_error(fnlm.forward(params, tokens), ref) > 100 * FP32_REL_TOL


@FAMILY
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_lora_training_matches_peft_qwen3_next(model_type, data, tmp_path_factory):
    """Six LoRA steps lose what peft's do: fnlm's default targets, or the DeltaNet's fused
    projections with attention and the shared expert's gate."""
    config = data.draw(hf_configs())
    targets = data.draw(st.sampled_from([None, ["q", "o", *LINEAR_TARGETS, "shared_gate"]]))
    check_training_matches_peft(config, saved_checkpoint(config), tmp_path_factory, targets)


@FAMILY
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_merged_export_loads_in_transformers_qwen3_next(model_type, data, tmp_path_factory):
    """The merged export loads in transformers with fnlm's adapted logits, and in fnlm again."""
    config = data.draw(hf_configs())
    targets = ("q", "in_qkvz", "in_ba", "out", "gate", "up", "down", "shared_gate")
    check_merged_export_matches(config, saved_checkpoint(config), tmp_path_factory, targets)


# ----------------------------------------------------------------------------------------------
# NF4
# ----------------------------------------------------------------------------------------------


@FAMILY
def test_nf4_logits_match_transformers_on_the_dequantized_weights_qwen3_next(model_type, tmp_path):
    """NF4 params (the fused DeltaNet projections too; the conv1d, A_log, dt_bias and norms stay
    16-bit, as bitsandbytes leaves them) give the logits transformers gives on their dequantized
    weights (written by fnlm's merged export); the NF4 error is real."""
    config = transformers.Qwen3NextConfig(**TINY)
    tokens = tokens_for(config.vocab_size, (2, 10))
    with saved_checkpoint(config) as (model, directory):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
    linear = params["layers"][0]["attn"]
    assert all(fnlm.quant.is_quantized(linear[n]) for n in LINEAR_TARGETS)
    assert not fnlm.quant.is_quantized(linear["conv"])
    assert_nf4_matches_dequantized(model, params, tokens, tmp_path)


# Qwen/Qwen3-Next-80B-A3B-Instruct's config.json (the fields transformers reads)
QWEN3_NEXT_80B = {
    "model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 16,
    "num_key_value_heads": 2, "head_dim": 256, "attention_bias": False, "hidden_act": "silu",
    "full_attention_interval": 4, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "num_experts": 512,
    "num_experts_per_tok": 10, "moe_intermediate_size": 512, "norm_topk_prob": True,
    "shared_expert_intermediate_size": 512, "partial_rotary_factor": 0.25, "rope_scaling": None,
    "rope_theta": 10000000, "rms_norm_eps": 1e-06, "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
}  # fmt: skip


@FAMILY
def test_real_config_translates_qwen3_next(model_type):
    """Qwen3-Next-80B-A3B's config: three DeltaNet layers per full-attention one, a quarter of
    head_dim rotated, 512 experts (10 per token, renormalized) plus a shared expert on every
    layer, and 79.67 B parameters in the tensors fnlm reads (the checkpoint's, less mtp.*)."""
    config = fnlm.models.config_from_hf(QWEN3_NEXT_80B)
    assert config.model_type == model_type
    assert config.layer_types[:4] == ("linear_attention",) * 3 + ("full_attention",)
    assert config.rotary_dim == 64 and config.rope_theta == 1e7
    assert config.linear_attention == (16, 32, 128, 128, 4)
    assert config.moe_layers == tuple(range(48)) and config.shared_expert_size == 512
    assert (config.num_experts, config.experts_per_token, config.moe_renormalize) == (512, 10, True)
    shapes = fnlm.models.family(model_type).weight_names(config).values()
    assert round(sum(math.prod(shape) for _, shape in shapes) / 1e9, 2) == 79.67


@FAMILY
@pytest.mark.parametrize("left_out", ["norm_topk_prob", "experts"])
def test_config_defaults_equal_transformers_qwen3_next(model_type, left_out):
    """A config.json without norm_topk_prob (or without any MoE key) reads them as
    Qwen3NextConfig defaults them (renormalized; 512 experts, 10 per token, 512 wide, a 512-wide
    shared expert), not as Qwen3-MoE's (no renormalization, no experts)."""
    keys = {"norm_topk_prob"}
    if left_out == "experts":
        keys |= {"num_experts", "num_experts_per_tok", "moe_intermediate_size"}
        keys |= {"shared_expert_intermediate_size"}
    hf = {k: v for k, v in transformers.Qwen3NextConfig(**TINY).to_dict().items() if k not in keys}
    config, reference = fnlm.models.config_from_hf(hf), transformers.Qwen3NextConfig(**hf)
    assert config.moe_renormalize is reference.norm_topk_prob is True
    assert (config.num_experts, config.experts_per_token, config.moe_intermediate_size) == (
        reference.num_experts,
        reference.num_experts_per_tok,
        reference.moe_intermediate_size,
    )
    assert config.shared_expert_size == reference.shared_expert_intermediate_size


@FAMILY
def test_transformers4_adapter_loads_as_in_peft_qwen3_next(model_type, monkeypatch):
    """An adapter trained under transformers 4 (one Linear per expert, "mlp.experts.3.gate_proj",
    and the router "mlp.gate") loads stacked, with the logits peft gives and those the adapter
    computed there (W + scale·B·A per expert), and fnlm re-saves it in peft's stacked format."""
    from tests import test_moe_lora_legacy as legacy

    config = transformers.Qwen3NextConfig(**{**TINY, "mlp_only_layers": []})  # MoE everywhere
    experts = legacy.Family(lambda: config, "mlp", dict(legacy.FAMILIES["qwen3_moe"].names), 4, 64)
    monkeypatch.setitem(legacy.FAMILIES, model_type, experts)
    with saved_checkpoint(config) as (model, base), tempfile.TemporaryDirectory() as out:
        factors = legacy.write_legacy(Path(out), config, model_type, attention=(), router=True)
        params = load_fp32(base)
        tokens = tokens_for(config.vocab_size)
        ours = legacy.fnlm_logits(params, out, tokens)
        oracle = legacy.oracle_logits(model, factors, tokens)
        assert max_rel_error(ours, legacy.peft_logits(model, out, tokens)) <= FP32_REL_TOL
        assert max_rel_error(ours, oracle) <= FP32_REL_TOL
        legacy.check_resaved(params, model, Path(out), Path(out) / "again", tokens, oracle)
