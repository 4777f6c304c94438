"""gpt-oss against transformers (+ peft): the shared per-family checks of tests/test_equivalence,
test_lora, test_train_architectures, test_generate and test_export on hypothesis-drawn tiny
configs, LoRA on the router and the expert stacks (peft's target_parameters), plus NF4, MXFP4
checkpoints and the LoRA settings gpt-oss refuses.

gpt-oss is not in tests/models.py's HF_CONFIGS because peft's bias="all" trains its router's and
experts' biases, which fnlm refuses (LoraError) rather than silently train fewer."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import fnlm
from fnlm.errors import LoraError
from tests.family_checks import (
    EXAMPLES,
    NO_TOKENIZER,
    assert_adapter_matches_peft,
    assert_nf4_matches_dequantized,
    check_adapter_matches_peft,
    check_greedy_matches,
    check_logits_match,
    check_merged_export_matches,
    check_training_matches_peft,
    family,
    load_fp32,
    tokens_for,
)
from tests.models import FP32_REL_TOL, build_model, hf_configs, max_rel_error, saved_checkpoint
from tests.test_lora import randomize_fnlm

pytestmark = NO_TOKENIZER
GPT_OSS = family("gpt_oss")


@GPT_OSS
@EXAMPLES
@given(data=st.data())
def test_logits_match_transformers_gpt_oss(model_type, data):
    """Logits, and logits of a left-padded batch, equal transformers' (fp32)."""
    config = data.draw(hf_configs(model_type))
    check_logits_match(data, config, saved_checkpoint(config))


@GPT_OSS
@EXAMPLES
@given(data=st.data())
def test_greedy_matches_transformers_gpt_oss(model_type, data):
    config = data.draw(hf_configs(model_type))
    check_greedy_matches(data, config, saved_checkpoint(config), most_new=10)


@GPT_OSS
@EXAMPLES
@given(data=st.data())
def test_saved_adapter_loads_in_peft_with_same_logits_gpt_oss(model_type, data, tmp_path_factory):
    """Attention LoRA (q, k, v, o; biases with "lora_only"): peft loads our adapter with our logits
    and re-saves the same files."""
    config = data.draw(hf_configs(model_type))
    targets = data.draw(st.lists(st.sampled_from(["q", "k", "v", "o"]), min_size=1, unique=True))
    bias = data.draw(st.sampled_from(["none", "lora_only"]))
    check_adapter_matches_peft(
        config, saved_checkpoint(config), tmp_path_factory, targets=targets, bias=bias
    )


@GPT_OSS
def test_lora_refuses_what_peft_would_do_differently_gpt_oss(model_type):
    config = transformers.GptOssConfig(**TINY)
    with saved_checkpoint(config) as (_, directory):
        params = load_fp32(directory)
    with pytest.raises(LoraError, match="bias='all' is not supported for gpt_oss"):
        fnlm.lora.init(params, r=2, bias="all")
    assert set(fnlm.lora.target_names(params.config)) == {"q", "k", "v", "o", "lm_head", "embed"}
    assert fnlm.lora.target_names(params.config, experts=True)["router"] == "router.weight"
    assert fnlm.lora.target_names(params.config, experts=True)["experts.gate_up"] == "gate_up_proj"


EXPERT_TARGETS = ["router", "experts.gate_up", "experts.down", "q", "o"]


@GPT_OSS
@EXAMPLES
@given(data=st.data())
def test_expert_and_router_adapter_both_ways_gpt_oss(model_type, data, tmp_path_factory):
    """LoRA on the router and the expert stacks (peft's target_parameters on gpt-oss's transposed,
    gate/up-interleaved stacks): peft loads our adapter with our logits and re-saves the same
    files; an adapter peft creates loads in fnlm with peft's logits."""
    config = data.draw(hf_configs(model_type))
    targets = data.draw(st.lists(st.sampled_from(EXPERT_TARGETS), min_size=1, unique=True))
    targets = sorted({*targets, "experts.gate_up"})  # the stack whose rows peft orders otherwise
    out, again = tmp_path_factory.mktemp("adapter"), tmp_path_factory.mktemp("again")
    tokens = tokens_for(config.vocab_size)
    with saved_checkpoint(config) as (model, directory):
        params = load_fp32(directory)
        lora = randomize_fnlm(fnlm.lora.init(params, r=4, alpha=8, targets=targets))
        peft_model = assert_adapter_matches_peft(model, params, lora, directory, out, again, tokens)
        # an adapter peft creates: its own B factors randomized, loaded by fnlm
        names = fnlm.lora.target_names(params.config, experts=True)
        parameters = [
            names[t] for t in targets if t in ("router", "experts.gate_up", "experts.down")
        ]
        modules = [names[t] for t in targets if t in ("q", "o")]
        base = peft_model.unload()
        created = peft.get_peft_model(
            base, peft.LoraConfig(r=2, target_modules=modules, target_parameters=parameters)
        )
        with torch.no_grad():
            for name, t in created.named_parameters():
                if "lora_B" in name:
                    t.normal_(0, 0.3)
            created_ref = created.eval()(tokens).logits
        created.save_pretrained(out / "created")
    loaded = fnlm.lora.load(out / "created", params)
    assert max_rel_error(fnlm.forward(params, tokens, lora=loaded), created_ref) <= FP32_REL_TOL


@GPT_OSS
@pytest.mark.parametrize("targets", ["attention", "experts"])
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_lora_training_matches_peft_gpt_oss(model_type, targets, data, tmp_path_factory):
    """Six steps against peft + transformers: attention only (fnlm's default targets), or q, v,
    the router and both expert stacks (peft's target_parameters)."""
    config = data.draw(hf_configs(model_type))
    targets = fnlm.lora.ALL_LINEAR if targets == "attention" else ("q", "v", *EXPERT_TARGETS[:3])
    check_training_matches_peft(config, saved_checkpoint(config), tmp_path_factory, targets)


@GPT_OSS
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_merged_export_loads_in_transformers_gpt_oss(model_type, data, tmp_path_factory):
    """The merged export (expert stacks written back transposed and interleaved) loads in
    transformers with fnlm's adapted logits, and in fnlm again."""
    config = data.draw(hf_configs(model_type))
    check_merged_export_matches(config, saved_checkpoint(config), tmp_path_factory, ("q", "v", "o"))


# ----------------------------------------------------------------------------------------------
# NF4 and MXFP4
# ----------------------------------------------------------------------------------------------

# in_features multiples of 64: NF4 blocks never straddle two experts; MXFP4 blocks are 32 wide
TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
    num_experts_per_tok=2, sliding_window=3, initializer_range=0.2, swiglu_limit=2.0,
    max_position_embeddings=256,
)  # fmt: skip


@GPT_OSS
def test_nf4_logits_match_transformers_on_the_dequantized_weights_gpt_oss(model_type, tmp_path):
    """NF4 params (experts too) give the logits transformers gives on their dequantized weights
    (written by fnlm's merged export without a 16-bit source); the NF4 error is real."""
    config = transformers.GptOssConfig(**TINY)
    tokens = tokens_for(config.vocab_size, (2, 10))
    with saved_checkpoint(config) as (model, directory):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
    assert fnlm.quant.is_quantized(params["layers"][0]["mlp"]["experts"]["gate_up"])
    assert_nf4_matches_dequantized(model, params, tokens, tmp_path)


def mxfp4_checkpoint(model, directory: Path, seed: int = 0) -> None:
    """Save `model` as OpenAI ships gpt-oss: each expert stack as random MXFP4 blocks and scales;
    the model's stacks are replaced by transformers' own dequantization of them."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(seed)
    model.save_pretrained(directory)
    state = load_file(directory / "model.safetensors")
    for name, p in model.named_parameters():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        e, inner, out = p.shape  # checkpoint layout [E, in, out]; MXFP4 packs [E, out, in]
        blocks = torch.randint(0, 256, (e, out, inner // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(122, 128, (e, out, inner // 32), generator=g, dtype=torch.uint8)
        with torch.no_grad():
            p.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
        del state[name]
        state[name + "_blocks"], state[name + "_scales"] = blocks, scales
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    doc = json.loads((directory / "config.json").read_text())
    doc["quantization_config"] = {"quant_method": "mxfp4"}
    (directory / "config.json").write_text(json.dumps(doc))


@GPT_OSS
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_mxfp4_checkpoint_loads_gpt_oss(model_type, quant, tmp_path):
    """An MXFP4 checkpoint loads dequantized (logits equal transformers' on its dequantization)
    or re-quantized to NF4; the merged export from NF4 reads the MXFP4 source for the experts."""
    model = build_model(transformers.GptOssConfig(**TINY))
    source = tmp_path / "mxfp4"
    mxfp4_checkpoint(model, source)
    tokens = tokens_for(TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        ref = model(tokens).logits
    params, _ = fnlm.load(source, quant=quant, dtype=torch.float32, device="cpu")
    ours = fnlm.forward(params, tokens)
    if quant is None:
        assert max_rel_error(ours, ref) <= FP32_REL_TOL
        return
    assert max_rel_error(ours, ref) > 100 * FP32_REL_TOL  # quantized to NF4 for real
    fnlm.save(tmp_path / "merged", params, format="merged")  # 16-bit weights from the source
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in written  # 16-bit now: no MXFP4 quantizer on reading
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "merged", dtype=torch.float32
        )(tokens).logits
    assert max_rel_error(merged, ref) <= FP32_REL_TOL


@GPT_OSS
def test_to_params_and_back_is_the_identity(model_type):
    from fnlm.models import gpt_oss

    stack = torch.randn(3, 8, 12)  # [E, in, 2·out] interleaved
    ours = gpt_oss.to_params("model.layers.0.mlp.experts.gate_up_proj", stack)
    assert torch.equal(ours[:, :6], stack[:, :, 0::2].transpose(1, 2))
    assert torch.equal(
        gpt_oss.to_checkpoint("model.layers.0.mlp.experts.gate_up_proj", ours), stack
    )
    bias = torch.randn(3, 12)
    name = "model.layers.0.mlp.experts.gate_up_proj_bias"
    assert torch.equal(gpt_oss.to_checkpoint(name, gpt_oss.to_params(name, bias)), bias)


@GPT_OSS
def test_unpaired_mxfp4_tensor_is_named(model_type, tmp_path):
    model = build_model(transformers.GptOssConfig(**TINY))
    mxfp4_checkpoint(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(fnlm.errors.CheckpointError, match="down_proj_blocks"):
        fnlm.load(tmp_path, quant=None, device="cpu")


@GPT_OSS
def test_packed_rows_keep_the_sinks(model_type):
    """Packed rows (a flex_attention BlockMask) take the explicit path with the sinks, over the
    block mask's dense equivalent: equal to the dense boolean mask of the same documents."""
    from fnlm.models import decoder, masks
    from fnlm.models.rope import rope_tables

    with saved_checkpoint(transformers.GptOssConfig(**TINY)) as (_, directory):
        params = load_fp32(directory)
    config, layer = params.config, params["layers"][0]
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    x = torch.randn(1, 8, config.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_tables(config, positions)
    block = masks.document_mask(segments, None)
    dense = decoder.build_mask(positions, None, segments, None)
    packed = decoder.attention(config, layer["attn"], x, cos, sin, block)
    reference = decoder.attention(config, layer["attn"], x, cos, sin, dense)
    assert max_rel_error(packed, reference) <= FP32_REL_TOL
