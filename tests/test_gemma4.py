"""Gemma 4 (text, and the text tower of the multimodal checkpoint) against transformers (+ peft):
logits (with left padding), greedy generation, LoRA adapters both ways, training, merged export and
NF4, on hypothesis-drawn tiny configs that switch each Gemma 4 feature on and off: per-layer input
embeddings, KV sharing (with the double-wide MLP), global layers with their own head size, kv heads
and k = v, proportional rope, the MoE block, attention biases, final soft-capping.

Tolerance: FP32_REL_TOL (1e-4 of the logits' scale) as every family; the fp32 forward agrees with
transformers bit for bit on the configs tried while writing this, the slack covers kernel rounding.
"""

from __future__ import annotations

import tempfile
import unittest.mock
from contextlib import contextmanager
from pathlib import Path

import peft
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from fnlm.models import gemma4
from tests.family_checks import (
    NO_TOKENIZER,
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
from tests.models import FP32_REL_TOL, build_model, max_rel_error

pytestmark = [NO_TOKENIZER, pytest.mark.filterwarnings("ignore:.*full_attention")]

EXAMPLES = settings(max_examples=4, deadline=None)
GEMMA4 = family("gemma4_text")
# the text model's checkpoint, and the multimodal one (Gemma4ForConditionalGeneration with a tiny
# vision tower) that fnlm loads for its text tower
BOTH = family("gemma4_text", "gemma4")
LORA_TARGETS = ["q", "k", "v", "o", "gate", "up", "down", "per_layer_gate", "per_layer_projection"]
# the MoE block's: the router is a linear layer, the expert stacks peft's target_parameters
MOE_TARGETS = ["router", "experts.gate_up", "experts.down"]


@st.composite
def gemma4_configs(draw, moe: bool | None = None) -> transformers.Gemma4TextConfig:
    layers = draw(st.integers(2, 4))
    kinds = st.sampled_from(["sliding_attention", "full_attention"])
    types = draw(st.lists(kinds, min_size=layers, max_size=layers))
    types[-1] = "full_attention"  # transformers forces it
    shared = draw(st.integers(0, layers - 1))
    per_layer = draw(st.sampled_from([0, 4, 8]))
    if not set(types[layers - shared :]) <= set(types[: layers - shared]) or not per_layer:
        # every sharing layer needs an earlier layer of its type; transformers 5.24 fails on KV
        # sharing without per-layer inputs (_maybe_slice_kv_shared_inputs slices None), a
        # combination no released Gemma 4 has
        shared = 0
    kv_heads = draw(st.sampled_from([1, 2]))
    vocab = draw(st.integers(64, 128))
    moe = draw(st.booleans()) if moe is None else moe
    fields = dict(
        vocab_size=vocab,
        hidden_size=draw(st.sampled_from([32, 64])),
        intermediate_size=draw(st.sampled_from([32, 48])),
        num_hidden_layers=layers,
        num_attention_heads=kv_heads * draw(st.sampled_from([1, 2])),
        num_key_value_heads=kv_heads,
        head_dim=draw(st.sampled_from([8, 16])),
        global_head_dim=draw(st.sampled_from([8, 16, 32])),
        attention_k_eq_v=draw(st.booleans()),
        num_global_key_value_heads=draw(st.sampled_from([None, 1])),
        layer_types=types,
        sliding_window=draw(st.integers(2, 6)),
        num_kv_shared_layers=shared,
        use_double_wide_mlp=draw(st.booleans()),
        hidden_size_per_layer_input=per_layer,
        vocab_size_per_layer_input=vocab,
        attention_bias=draw(st.booleans()),
        final_logit_softcapping=draw(st.sampled_from([None, 3.0])),
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
        tie_word_embeddings=draw(st.booleans()),
        rope_parameters={
            "sliding_attention": draw(
                st.sampled_from(
                    [
                        {"rope_type": "default", "rope_theta": 10_000.0},
                        {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0},
                    ]
                )
            ),
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": draw(st.sampled_from([0.25, 0.5, 1.0])),
                "rope_theta": draw(st.sampled_from([10_000.0, 1_000_000.0])),
                "factor": draw(st.sampled_from([1.0, 4.0])),
            },
        },
        max_position_embeddings=256,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    if moe:
        experts = draw(st.integers(2, 4))
        fields.update(
            enable_moe_block=True,
            num_experts=experts,
            top_k_experts=draw(st.integers(1, min(2, experts))),
            moe_intermediate_size=draw(st.sampled_from([8, 16])),
        )
    return transformers.Gemma4TextConfig(**fields)


def build(config, seed: int = 0):
    """build_model (random norms and biases) with random layer scalars and router scales too."""
    model = build_model(config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("layer_scalar", "router.scale", "per_expert_scale")):
                t.add_(0.2 * torch.randn(t.shape, generator=g))
    return model


# Tiny vision tower: built and saved, never run (the tests feed text), skipped on load.
VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=2,
    position_embedding_size=64,
)  # fmt: skip


def multimodal(text) -> transformers.Gemma4ForConditionalGeneration:
    """The multimodal model whose language model holds `text`'s weights (random vision tower)."""
    config = transformers.Gemma4Config(
        text_config=text.config.to_dict(), vision_config=VISION,
        tie_word_embeddings=text.config.tie_word_embeddings, image_token_id=10**6,
    )  # fmt: skip
    model = transformers.Gemma4ForConditionalGeneration(config).float().eval()
    state = text.state_dict()
    inner = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model.model.language_model.load_state_dict(inner, strict=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(state["lm_head.weight"])
    return model


@contextmanager
def checkpoint(config, seed: int = 0, model_type: str = "gemma4_text"):
    """(model, directory): a random text model saved with save_pretrained, or for model_type
    "gemma4" the multimodal checkpoint around it (`model` is then the text model with the same
    weights: the reference of fnlm's text-tower params, which peft adapts and exports load as)."""
    model = build(config, seed)
    saved = model if model_type == "gemma4_text" else multimodal(model)
    with tempfile.TemporaryDirectory() as d:
        saved.save_pretrained(d)
        yield model, Path(d)


@BOTH
@EXAMPLES
@given(data=st.data())
def test_logits_match_transformers_gemma4(model_type, data):
    """Logits, and logits of a left-padded batch, equal transformers' (fp32)."""
    config = data.draw(gemma4_configs())
    check_logits_match(data, config, checkpoint(config, model_type=model_type))


@BOTH
@EXAMPLES
@given(data=st.data())
def test_greedy_matches_transformers_gemma4(model_type, data):
    """Greedy tokens of a left-padded batch through the KV cache (shared-KV layers read their
    source layer's cache) equal transformers' generate."""
    config = data.draw(gemma4_configs())
    check_greedy_matches(data, config, checkpoint(config, model_type=model_type), most_new=8)


@BOTH
@EXAMPLES
@given(data=st.data())
def test_saved_adapter_loads_in_peft_with_same_logits_gemma4(model_type, data, tmp_path_factory):
    """Our adapter (drawn targets, the expert stacks among them, or "all-linear": the router and
    the model-level PLE projection too) loads in peft with our logits, merged too, and peft
    re-saves the same tensors."""
    config = data.draw(gemma4_configs())
    targets = data.draw(
        st.one_of(
            st.just("all-linear"),
            st.lists(st.sampled_from([*LORA_TARGETS, *MOE_TARGETS]), min_size=1, unique=True),
        )
    )
    absent = set() if config.enable_moe_block else set(MOE_TARGETS)
    if not config.hidden_size_per_layer_input:
        absent |= {"per_layer_gate", "per_layer_projection"}
    if targets != "all-linear" and set(targets) <= absent:
        # targets that all match nothing are refused (LoraError, tests/test_lora.py); those that
        # partly match adapt what they match, as in peft
        targets.append("q")
    check_adapter_matches_peft(
        config, checkpoint(config, model_type=model_type), tmp_path_factory, targets=targets
    )


@GEMMA4
def test_peft_adapter_loads_in_fnlm_gemma4(model_type, tmp_path):
    """An adapter peft creates ("all-linear" plus the expert stacks as target_parameters) loads in
    fnlm with peft's logits."""
    config = transformers.Gemma4TextConfig(**{**TINY, "attention_bias": True})
    model = build(config)
    model.save_pretrained(tmp_path / "base")
    lora_config = peft.LoraConfig(
        r=4, target_modules="all-linear", target_parameters=["gate_up_proj", "down_proj"]
    )
    peft_model = peft.get_peft_model(model, lora_config)
    with torch.no_grad():
        for name, t in peft_model.named_parameters():
            if "lora_B" in name:
                t.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    params = load_fp32(tmp_path / "base")
    lora = fnlm.lora.load(tmp_path / "adapter", params)
    tokens = tokens_for(config.vocab_size)
    with torch.no_grad():
        ref = peft_model.eval()(tokens).logits
    assert max_rel_error(fnlm.forward(params, tokens, lora=lora), ref) <= FP32_REL_TOL


@BOTH
@pytest.mark.parametrize("targets", ["default", "moe"])
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_lora_training_matches_peft_gemma4(model_type, targets, data, tmp_path_factory):
    """Six LoRA steps (fnlm.train) give peft + transformers' losses step by step: fnlm's default
    targets, or q, v, the router, the expert stacks and the per-layer projections of a MoE model."""
    config = data.draw(gemma4_configs(moe=targets == "moe"))
    if targets == "moe":
        targets = ("q", "v", *MOE_TARGETS, "per_layer_gate", "per_layer_projection")
    else:
        targets = fnlm.lora.ALL_LINEAR
    check_training_matches_peft(
        config, checkpoint(config, model_type=model_type), tmp_path_factory, targets
    )


@BOTH
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_merged_export_loads_in_transformers_gemma4(model_type, data, tmp_path_factory):
    """The merged export loads in transformers with fnlm's adapted logits, and in fnlm again."""
    config = data.draw(gemma4_configs())
    check_merged_export_matches(
        config, checkpoint(config, model_type=model_type), tmp_path_factory, ("q", "o", "down")
    )


# in_features multiples of 64: NF4 blocks never straddle two experts (or two rows)
TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=32,
    layer_types=["sliding_attention", "full_attention", "full_attention"], sliding_window=3,
    num_kv_shared_layers=1, hidden_size_per_layer_input=64, vocab_size_per_layer_input=96,
    enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=64,
    max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
)  # fmt: skip


@BOTH
def test_nf4_logits_match_transformers_on_the_dequantized_weights_gemma4(model_type, tmp_path):
    """NF4 params (experts and per-layer projections too; embeddings, PLE table and router stay
    16-bit) give the logits transformers gives on their dequantized weights, written by the
    merged export without a 16-bit source; the NF4 error is real."""
    tokens = tokens_for(TINY["vocab_size"], (2, 10))
    with checkpoint(transformers.Gemma4TextConfig(**TINY), model_type=model_type) as (
        model,
        directory,
    ):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
    layer = params["layers"][0]
    for leaf in (layer["mlp"]["experts"]["gate_up"], layer["per_layer_gate"], layer["attn"]["q"]):
        assert fnlm.quant.is_quantized(leaf)
    assert not fnlm.quant.is_quantized(layer["router"])
    assert_nf4_matches_dequantized(model, params, tokens, tmp_path)


# ----------------------------------------------------------------------------------------------
# The multimodal checkpoint beyond the BOTH tests above
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gemma4"])
def test_multimodal_checkpoint_loads_its_text_tower_gemma4(model_type, tmp_path, capsys):
    """The multimodal model's own logits on text equal fnlm's text-tower params'; the vision
    tensors are skipped with one line; the merged export is a Gemma4ForCausalLM checkpoint."""
    text = build(transformers.Gemma4TextConfig(**{**TINY, "enable_moe_block": False}))
    model = multimodal(text)
    model.save_pretrained(tmp_path / "mm")
    params = load_fp32(tmp_path / "mm")
    assert params.config.text_tower_of == "gemma4"
    assert "skipped" in capsys.readouterr().out
    tokens = tokens_for(TINY["vocab_size"])
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
    assert max_rel_error(fnlm.forward(params, tokens), ref) <= FP32_REL_TOL
    fnlm.save(tmp_path / "merged", params, format="merged")
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float32
    )
    assert type(exported).__name__ == "Gemma4ForCausalLM"
    with torch.no_grad():
        assert max_rel_error(exported(tokens).logits, ref) <= FP32_REL_TOL


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------


@GEMMA4
def test_layout_follows_transformers_gemma4(model_type):
    """Per-layer head sizes, kv heads, k = v, KV sources and MLP widths as transformers builds them,
    from transformers 5's per_layer_config and from the released global_* keys alike."""
    config = transformers.Gemma4TextConfig(
        **{**TINY, "attention_k_eq_v": True, "num_global_key_value_heads": 2, "num_key_value_heads": 1,
           "num_hidden_layers": 5, "num_kv_shared_layers": 2, "use_double_wide_mlp": True,
           "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                           "sliding_attention", "full_attention"]}
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    released = {k: v for k, v in config.to_dict().items() if k != "per_layer_config"}
    released.update(global_head_dim=32, num_global_key_value_heads=2)
    for hf in (config.to_dict(), released):
        lay = gemma4.make_layout(hf)
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            assert lay.head_dims[i] == attn.head_dim
            assert lay.k_eq_v[i] == attn.use_alternative_attention
            assert lay.shared(i) == attn.is_kv_shared_layer
            assert lay.mlp_sizes[i] == layer.mlp.intermediate_size
            if not attn.is_kv_shared_layer:
                assert lay.kv_heads[i] * attn.head_dim == attn.k_proj.out_features
    assert lay.kv_source == (0, 1, 2, 2, 1)


@GEMMA4
def test_bidirectional_gemma4_is_refused(model_type):
    config = transformers.Gemma4TextConfig(**TINY).to_dict()
    config["use_bidirectional_attention"] = "all"
    with pytest.raises(fnlm.errors.UnsupportedModelError, match="bidirectional"):
        fnlm.models.config_from_hf(config)


@GEMMA4
@pytest.mark.parametrize("checkpointing", ["layer", "offload"])
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_checkpointing_recomputes_gemma4_layers(model_type, checkpointing, data):
    """Training's layer function checkpoints Gemma 4's own layer (through its `wrap`): each layer
    runs twice (forward, recompute), and the loss and adapter gradients equal no checkpointing."""
    config = data.draw(gemma4_configs())
    runs = []
    original = gemma4.layer_forward

    def counting(*args):
        runs.append(1)
        return original(*args)

    tokens = tokens_for(config.vocab_size, (2, 12), seed=3)
    counted = unittest.mock.patch.object(gemma4, "layer_forward", counting)
    with counted, checkpoint(config, model_type=model_type) as (_, directory):
        params = load_fp32(directory)
        lora = fnlm.lora.init(params, r=4, alpha=8, seed=0)
        results = {}
        for mode in ("none", checkpointing):
            layer_fn = fnlm.train.layer_function(mode, preserve_rng=False)
            runs.clear()
            loss = fnlm.loss(params, {"tokens": tokens}, lora=lora, layer_fn=layer_fn)
            loss.backward()
            results[mode] = (loss.item(), [t.grad.clone() for t in fnlm.lora.parameters(lora)])
            results[mode] += (len(runs),)
            for t in fnlm.lora.parameters(lora):
                t.grad = None
    layers = config.num_hidden_layers
    assert results["none"][2] == layers and results[checkpointing][2] == 2 * layers
    assert results[checkpointing][0] == results["none"][0]
    for a, b in zip(results[checkpointing][1], results["none"][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same ops in the same order
