"""Qwen3.5 and Qwen3.5-MoE (text models, and the multimodal checkpoint's text tower) against
transformers (+ peft): the shared per-family checks of tests/test_equivalence, test_lora,
test_train_architectures, test_generate and test_export on hypothesis-drawn tiny configs, plus
NF4, packed rows and LoRA on the linear-attention projections.

Not in tests/models.py's HF_CONFIGS (as gpt-oss): peft's bias="all" also trains the DeltaNet's
dt_bias, which fnlm refuses (LoraError) rather than silently train fewer."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from fnlm.errors import LoraError
from fnlm.generate import generate_tokens
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
from tests.test_generate import reference_generate

pytestmark = [NO_TOKENIZER, pytest.mark.filterwarnings("ignore:.*flash-linear-attention")]
FAMILIES = family("qwen3_5_text", "qwen3_5_moe_text")
TEXT_AND_TOWER = family("qwen3_5_text", "qwen3_5_moe_text", "qwen3_5", "qwen3_5_moe")
# fnlm's names of the DeltaNet projections (peft's: in_proj_qkv, in_proj_z, ..., out_proj)
LINEAR_TARGETS = ["in_qkv", "in_z", "in_b", "in_a", "out"]


@st.composite
def text_fields(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    layers = draw(st.integers(2, 4))
    key_heads = draw(st.sampled_from([1, 2]))
    fields = dict(
        vocab_size=draw(st.integers(64, 128)),
        hidden_size=draw(st.sampled_from([32, 64])),
        intermediate_size=draw(st.sampled_from([40, 64])),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([h for h in (1, 2) if heads % h == 0])),
        head_dim=draw(st.sampled_from([8, 16])),
        linear_num_key_heads=key_heads,
        linear_num_value_heads=key_heads * draw(st.sampled_from([1, 2])),
        linear_key_head_dim=draw(st.sampled_from([8, 16])),
        linear_value_head_dim=draw(st.sampled_from([8, 16])),
        linear_conv_kernel_dim=draw(st.sampled_from([2, 4])),
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
        tie_word_embeddings=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
        max_position_embeddings=256,
        initializer_range=0.2,  # large enough that logits are far from zero
        rope_parameters={
            "rope_type": "default",
            "rope_theta": draw(st.sampled_from([10000.0, 1e6])),
            "partial_rotary_factor": draw(st.sampled_from([0.25, 0.5])),
        },
    )
    # both kinds: transformers' cache needs a full-attention layer (get_seq_length), the tests a
    # linear one
    if draw(st.booleans()):  # explicit layer kinds, else every full_attention_interval-th is full
        kinds = st.sampled_from(["linear_attention", "full_attention"])
        types = draw(st.lists(kinds, min_size=layers - 2, max_size=layers - 2))
        fields["layer_types"] = ["linear_attention", *types, "full_attention"]
    else:
        fields["full_attention_interval"] = draw(st.integers(2, layers))
    return fields


# Tiny vision tower of the multimodal checkpoints: saved, never run (the tests feed text)
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2)


@st.composite
def hf_configs(draw, model_type: str):
    """A text config ("qwen3_5_text", "qwen3_5_moe_text") or a multimodal one ("qwen3_5",
    "qwen3_5_moe")."""
    fields = draw(text_fields())
    moe = model_type.startswith("qwen3_5_moe")
    if moe:
        fields.pop("intermediate_size")
        experts = draw(st.integers(2, 4))
        fields.update(
            num_experts=experts,
            num_experts_per_tok=draw(st.integers(1, min(2, experts))),
            moe_intermediate_size=draw(st.sampled_from([24, 40])),
            shared_expert_intermediate_size=draw(st.sampled_from([16, 24])),
        )
    if model_type == "qwen3_5_text":
        return transformers.Qwen3_5TextConfig(**fields)
    if model_type == "qwen3_5_moe_text":
        return transformers.Qwen3_5MoeTextConfig(**fields)
    fields.pop("tie_word_embeddings")
    kind = transformers.Qwen3_5MoeConfig if moe else transformers.Qwen3_5Config
    config = kind(
        text_config=fields,
        vision_config=VISION,
        tie_word_embeddings=draw(st.booleans()),
    )
    config.vocab_size = fields["vocab_size"]
    return config


# ----------------------------------------------------------------------------------------------
# Logits, generation
# ----------------------------------------------------------------------------------------------


def _config(data, model_type):
    return data.draw(hf_configs(model_type))


@TEXT_AND_TOWER
@EXAMPLES
@given(data=st.data())
def test_logits_match_transformers_qwen3_5(model_type, data):
    """Logits, and logits of a left-padded batch, equal transformers' (fp32); sequences longer
    than one 64-token chunk of the delta rule are drawn too."""
    config = _config(data, model_type)
    check_logits_match(data, config, saved_checkpoint(config), st.sampled_from([3, 12, 70]))


@TEXT_AND_TOWER
@EXAMPLES
@given(data=st.data())
def test_greedy_matches_transformers_qwen3_5(model_type, data):
    """Prefill (chunked delta rule) then one-token steps (the recurrence, conv and recurrent
    states in the cache), left-padded batches, equal transformers' greedy generate."""
    config = _config(data, model_type)
    check_greedy_matches(data, config, saved_checkpoint(config), most_new=8, repeat=2)


@FAMILIES
def test_compiled_generation_equals_eager_qwen3_5(model_type, monkeypatch):
    """The compiled prefill and decode layers (dynamo traces the DeltaNet layers and their
    in-place state updates; CPU test with a backend that runs the traced graph) give eager's
    tokens."""
    check_compiled_generation_equals_eager(monkeypatch, saved_checkpoint(tiny_config(model_type)))


@FAMILIES
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_packed_rows_equal_separate_documents_qwen3_5(model_type, data):
    """Packed rows (segments): each document's logits are those of the document alone (the
    DeltaNet layers restart their state and conv at each document)."""
    config = _config(data, model_type)
    checkpoint = saved_checkpoint(config)
    check_packed_rows_equal_documents(data, config, checkpoint, padding=2, first_segment=1)


def test_packed_rows_compile_as_one_graph_qwen3_5_text():
    """Packed rows run without a host read or a data-dependent shape (what a CUDA-graph capture
    of the training step needs): the LoRA loss on packed rows compiles with fullgraph=True
    (aot_eager: forward and backward graphs), with eager's loss and gradients (1e-5 relative,
    reassociation only; measured: loss equal, gradients 2.1e-6). Documents longer than a 64-token
    chunk, several in one chunk, padding between and after them; each document's logits equal the
    document alone (FP32_REL_TOL; measured <= 6.4e-6, the attention layer's share included)."""
    with saved_checkpoint(transformers.Qwen3_5TextConfig(**TINY)) as (_, directory):
        params = load_fp32(directory)
    targets = ["in_qkv", "in_z", "in_b", "in_a", "out", "q"]
    # row 0: documents of 70, 3, 5, 40 tokens, 3 padding; row 1: 2 padding, documents of 2 and
    # 1, 22 padding, a document of 90, 4 padding
    lengths = [70, 3, 5, 40]
    seq = 121
    segments = torch.zeros(2, seq, dtype=torch.long)
    segments[0, :118] = torch.repeat_interleave(torch.arange(1, 5), torch.tensor(lengths))
    segments[1, 2:4] = 1
    segments[1, 4:5] = 2
    segments[1, 27:117] = 3
    assert [int((segments[1] == i).sum()) for i in (1, 2, 3)] == [2, 1, 90]
    positions = fnlm.models.deltanet.document_positions(segments)
    tokens = tokens_for(params.config.vocab_size, (2, seq), seed=3)
    batch = {"tokens": tokens, "labels": tokens, "positions": positions.clamp(min=0)}
    batch["segments"] = segments

    def loss_and_grads(fn):
        adapters = fnlm.lora.init(params, r=2, targets=targets)
        for i, t in enumerate(fnlm.lora.parameters(adapters)):
            t.data.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        loss = fn(batch, adapters)
        loss.backward()
        return loss.detach(), [t.grad for t in fnlm.lora.parameters(adapters)]

    def step(batch, adapters):
        return fnlm.loss(params, batch, lora=adapters)

    ref_loss, ref_grads = loss_and_grads(step)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, grads = loss_and_grads(compiled)
    assert max_rel_error(loss, ref_loss) <= 1e-5
    for ours, ref in zip(grads, ref_grads, strict=True):
        assert max_rel_error(ours, ref) <= 1e-5

    logits = fnlm.forward(params, tokens, positions=positions.clamp(min=0), segments=segments)
    for r in range(2):
        for doc in segments[r].unique()[1:]:
            where = segments[r] == doc
            alone = fnlm.forward(params, tokens[r : r + 1, where])
            assert max_rel_error(logits[r : r + 1, where], alone) <= FP32_REL_TOL


# ----------------------------------------------------------------------------------------------
# LoRA, training, export
# ----------------------------------------------------------------------------------------------


@TEXT_AND_TOWER
@EXAMPLES
@given(data=st.data())
def test_saved_adapter_loads_in_peft_with_same_logits_qwen3_5(model_type, data, tmp_path_factory):
    """LoRA on attention and on the linear-attention projections (in_proj_qkv, in_proj_z,
    in_proj_b, in_proj_a, out_proj): peft loads our adapter with our logits and re-saves the
    same files."""
    config = _config(data, model_type)
    names = ["q", "k", "v", "o", *LINEAR_TARGETS]
    targets = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    targets += data.draw(st.sampled_from([["in_qkv"], ["out_proj"], []]))  # linear layers adapted
    if "moe" in model_type:  # expert stacks and router: peft's target_parameters
        targets += data.draw(st.sampled_from([[], ["experts.gate_up", "experts.down", "router"]]))
    bias = data.draw(st.sampled_from(["none", "lora_only"]))
    check_adapter_matches_peft(
        config, saved_checkpoint(config), tmp_path_factory, targets=targets, bias=bias
    )


@FAMILIES
def test_lora_targets_qwen3_5(model_type):
    """The linear-attention projections are targets under peft's names; bias="all" is refused."""
    config = tiny_config(model_type)
    with saved_checkpoint(config) as (_, directory):
        params = load_fp32(directory)
    names = fnlm.lora.target_names(params.config)
    expected = {
        "in_qkv": "in_proj_qkv", "in_z": "in_proj_z", "in_b": "in_proj_b", "in_a": "in_proj_a",
        "out": "out_proj", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    }  # fmt: skip
    assert expected.items() <= names.items()
    assert "conv" not in names and "A_log" not in names
    lora = fnlm.lora.init(params, r=2, targets=("in_proj_qkv", "out_proj"))
    assert set(lora["layers"][0]["attn"]) == {"in_qkv", "out"}
    with pytest.raises(LoraError, match="bias='all' is not supported"):
        fnlm.lora.init(params, r=2, bias="all")


@TEXT_AND_TOWER
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_lora_training_matches_peft_qwen3_5(model_type, data, tmp_path_factory):
    """Six LoRA steps (all-linear: attention, DeltaNet projections, MLP) lose what peft's do."""
    config = _config(data, model_type)
    check_training_matches_peft(config, saved_checkpoint(config), tmp_path_factory)


@TEXT_AND_TOWER
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_merged_export_loads_in_transformers_qwen3_5(model_type, data, tmp_path_factory):
    """The merged export (the text model, for the multimodal checkpoint) loads in transformers
    with fnlm's adapted logits, and in fnlm again."""
    config = _config(data, model_type)
    check_merged_export_matches(
        config, saved_checkpoint(config), tmp_path_factory, ("q", "in_qkv", "out", "down")
    )


# ----------------------------------------------------------------------------------------------
# NF4
# ----------------------------------------------------------------------------------------------

# in_features multiples of 64 (NF4 blocks), every layer kind
TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention"],
    initializer_range=0.2, max_position_embeddings=256,
)  # fmt: skip
TINY_MOE = {
    **{k: v for k, v in TINY.items() if k != "intermediate_size"},
    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
}  # fmt: skip


def tiny_config(model_type: str):
    """TINY as a "qwen3_5_text" config, TINY_MOE as a "qwen3_5_moe_text" one, or the multimodal
    config ("qwen3_5", "qwen3_5_moe") around the same text config."""
    if model_type == "qwen3_5_moe_text":
        return transformers.Qwen3_5MoeTextConfig(**TINY_MOE)
    if model_type == "qwen3_5_text":
        return transformers.Qwen3_5TextConfig(**TINY)
    moe = model_type == "qwen3_5_moe"
    kind = transformers.Qwen3_5MoeConfig if moe else transformers.Qwen3_5Config
    config = kind(text_config=TINY_MOE if moe else TINY, vision_config=VISION)
    config.vocab_size = TINY["vocab_size"]
    return config


@TEXT_AND_TOWER
def test_nf4_logits_match_transformers_on_the_dequantized_weights_qwen3_5(model_type, tmp_path):
    """NF4 params (DeltaNet projections too; the conv1d, A_log, dt_bias and norms stay 16-bit,
    as bitsandbytes leaves them) give the logits transformers gives on their dequantized weights
    (written by fnlm's merged export); the NF4 error is real."""
    config = tiny_config(model_type)
    tokens = tokens_for(config.vocab_size, (2, 10))
    with saved_checkpoint(config) as (model, directory):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
    linear = params["layers"][0]["attn"]
    assert all(fnlm.quant.is_quantized(linear[n]) for n in LINEAR_TARGETS)
    assert not fnlm.quant.is_quantized(linear["conv"])
    assert_nf4_matches_dequantized(model, params, tokens, tmp_path)


@pytest.mark.skipif(
    not fnlm.kernels.HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton scan on CPU needs TRITON_INTERPRET=1 (set by tests/conftest.py)",
)
def test_triton_scan_in_the_model_qwen3_5_text(monkeypatch):
    """The loss and LoRA gradients of a model whose DeltaNet layers run the Triton scan (custom
    op, forward and reverse-scan backward; interpreter) equal those of torch's scan. Measured on
    TINY: loss bit-equal, gradients within 9.7e-8 (relative)."""
    with saved_checkpoint(transformers.Qwen3_5TextConfig(**TINY)) as (_, directory):
        params = load_fp32(directory)
    lora = fnlm.lora.init(params, r=2, targets=["in_qkv", "in_z", "out", "q"])
    tokens = tokens_for(params.config.vocab_size, (2, 40))

    def loss_and_grads():
        adapters = fnlm.lora.init(params, r=2, targets=["in_qkv", "in_z", "out", "q"])
        for ours, theirs in zip(
            fnlm.lora.parameters(adapters), fnlm.lora.parameters(lora), strict=True
        ):
            ours.data.copy_(theirs.data + 0.1)  # B nonzero: gradients reach every factor
        loss = fnlm.loss(params, {"tokens": tokens, "labels": tokens}, lora=adapters)
        loss.backward()
        return loss.detach(), [t.grad for t in fnlm.lora.parameters(adapters)]

    ref_loss, ref_grads = loss_and_grads()
    chunked = fnlm.kernels.gated_delta_rule_chunked
    monkeypatch.setattr(
        fnlm.kernels,
        "gated_delta_rule_chunked",
        lambda *args, **kwargs: chunked(*args, **{**kwargs, "triton_scan": True}),
    )
    loss, grads = loss_and_grads()
    assert torch.equal(loss, ref_loss)
    for ours, ref in zip(grads, ref_grads, strict=True):
        assert max_rel_error(ours, ref) <= 1e-6


def test_mrope_parameters_are_plain_rope_for_text_qwen3_5_text():
    """The multimodal rope's sections (rope_parameters or a transformers 4 rope_scaling of type
    "mrope") give every section the same text position: plain rope, partial by default."""
    base = transformers.Qwen3_5TextConfig(**TINY).to_dict()
    sections = {"mrope_section": [2, 1, 1], "mrope_interleaved": True}
    for hf in (
        {**base, "rope_parameters": {**base["rope_parameters"], **sections}},
        {**base, "rope_parameters": None, "rope_scaling": {"type": "mrope", **sections}},
    ):
        config = fnlm.models.config_from_hf(hf)
        assert config.rope_scaling == () and config.rotary_dim == TINY["head_dim"] // 4


@family("qwen3_5_text", "qwen3_5")
def test_mtp_tensors_are_skipped_qwen3_5(model_type, tmp_path):
    """Qwen3.5 checkpoints carry a multi-token-prediction head ("mtp.*") that transformers
    ignores; so does fnlm, text model or multimodal text tower."""
    from safetensors.torch import load_file, save_file

    config = tiny_config(model_type)
    with saved_checkpoint(config) as (model, directory):
        state = load_file(directory / "model.safetensors")
        state["mtp.fc.weight"] = torch.zeros(4, 4)
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        params = load_fp32(directory)
        tokens = tokens_for(TINY["vocab_size"])
        with torch.no_grad():
            ref = model(tokens).logits
    assert max_rel_error(fnlm.forward(params, tokens), ref) <= FP32_REL_TOL


@pytest.mark.gpu
@FAMILIES
def test_cuda_forward_loss_and_generation_qwen3_5(model_type):
    """On the GPU (Triton scan, compiled decode under CUDA graphs): fp32 logits of 100 tokens
    (two delta-rule chunks) equal transformers' on the CPU, the LoRA loss's gradients equal the
    CPU path's, and greedy generation equals transformers'."""
    config = tiny_config(model_type)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    with saved_checkpoint(config) as (model, directory):
        cpu = load_fp32(directory)
        gpu, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cuda")
        tokens = tokens_for(config.vocab_size, (2, 100))
        with torch.no_grad():
            ref = model(tokens).logits
        assert max_rel_error(fnlm.forward(gpu, tokens.cuda()).cpu(), ref) <= FP32_REL_TOL
        ref_tokens = reference_generate(model, prompts, 6, None)
    assert generate_tokens(gpu, prompts, max_new_tokens=6, eos_token_ids=[]) == ref_tokens

    targets = ["in_qkv", "in_z", "out", "q"]
    start = [
        t.detach() + 0.1 for t in fnlm.lora.parameters(fnlm.lora.init(cpu, r=2, targets=targets))
    ]

    def grads(params, device):
        adapters = fnlm.lora.init(params, r=2, targets=targets)
        for t, value in zip(fnlm.lora.parameters(adapters), start, strict=True):
            t.data.copy_(value)  # the same adapters on both devices, B nonzero
        batch = {"tokens": tokens.to(device), "labels": tokens.to(device)}
        fnlm.loss(params, batch, lora=adapters).backward()
        return [t.grad.cpu() for t in fnlm.lora.parameters(adapters)]

    for ours, theirs in zip(grads(gpu, "cuda"), grads(cpu, "cpu"), strict=True):
        assert max_rel_error(ours, theirs) <= 1e-4
