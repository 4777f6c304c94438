"""DeepSeek-V3 (multi-head latent attention, fnlm/models/mla.py) against transformers (+ peft):
the shared per-family checks of tests/family_checks.py on hypothesis-drawn tiny configs — with
and without q_lora_rank, interleaved or half-split rope, yarn with mscale, v heads narrower or
wider than q/k heads, attention biases — plus LoRA on the latent projections (q_a_proj,
q_b_proj, kv_a_proj_with_mqa, kv_b_proj), peft's initial adapters, NF4 and the refusals."""

from __future__ import annotations

import re
import tempfile

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from fnlm.errors import ConfigError, UnsupportedModelError
from fnlm.generate import generate_tokens
from tests.family_checks import (
    EXAMPLES,
    NO_TOKENIZER,
    assert_logits_match,
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
    router_bias_checkpoint,
    tokens_for,
)
from tests.models import FP32_REL_TOL, max_rel_error
from tests.test_generate import reference_generate
from tests.test_lora import assert_saved_equals_peft, build_peft, randomize_fnlm

pytestmark = NO_TOKENIZER
DEEPSEEK_V3 = family("deepseek_v3")
# fnlm's names of MLA's projections (peft's: q_proj | q_a_proj, q_b_proj, kv_a_proj_with_mqa,
# kv_b_proj, o_proj)
ATTENTION_TARGETS = ["q", "q_a", "q_b", "kv_a", "kv_b", "o"]
EXPERT_TARGETS = ["router", "experts.gate_up", "experts.down"]
YARN = {
    "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0,
}  # fmt: skip


@st.composite
def deepseek_v3_configs(
    draw, moe: bool | None = None, q_lora: bool | None = None
) -> transformers.DeepseekV3Config:
    """Tiny configs, all-dense or (moe, drawn when None) with mixture-of-experts layers after
    first_k_dense_replace dense ones: 4 or 8 experts in groups of 2 or 4, of which topk_group
    compete for the top-k; q through q_a / q_b (q_lora, drawn when None) or one q_proj."""
    heads = draw(st.sampled_from([1, 2, 4]))
    layers = draw(st.integers(1, 3))
    theta = draw(st.sampled_from([10000.0, 1e6]))
    rope = draw(st.sampled_from([{"rope_type": "default"}, YARN]))
    experts = draw(st.sampled_from([4, 8]))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if experts // g >= 2]))
    topk_groups = draw(st.integers(1, groups))
    if moe is None:
        moe = draw(st.booleans())
    return transformers.DeepseekV3Config(
        vocab_size=draw(st.integers(64, 128)),
        hidden_size=draw(st.sampled_from([32, 64])),
        intermediate_size=draw(st.sampled_from([40, 64])),
        num_hidden_layers=layers,
        first_k_dense_replace=draw(st.integers(0, layers - 1)) if moe else layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        q_lora_rank=draw(
            st.sampled_from({None: [None, 16, 24], True: [16, 24], False: [None]}[q_lora])
        ),
        kv_lora_rank=draw(st.sampled_from([8, 16])),
        qk_nope_head_dim=draw(st.sampled_from([4, 8, 16])),
        qk_rope_head_dim=draw(st.sampled_from([4, 8])),
        v_head_dim=draw(st.sampled_from([4, 12, 24])),
        attention_bias=draw(st.booleans()),
        rope_interleave=draw(st.booleans()),
        rope_parameters={**rope, "rope_theta": theta},
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])),  # the latent norms keep 1e-6
        tie_word_embeddings=draw(st.booleans()),
        max_position_embeddings=256,
        initializer_range=0.2,  # large enough that logits are far from zero
        n_routed_experts=experts,
        n_group=groups,
        topk_group=topk_groups,
        num_experts_per_tok=draw(st.integers(1, topk_groups * experts // groups)),
        moe_intermediate_size=draw(st.sampled_from([16, 24])),
        n_shared_experts=draw(st.sampled_from([1, 2])),
        norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
    )


def attention_targets(config) -> list[str]:
    """ATTENTION_TARGETS this config has (q without q_lora_rank, else q_a and q_b)."""
    skip = ("q_a", "q_b") if config.q_lora_rank is None else ("q",)
    return [t for t in ATTENTION_TARGETS if t not in skip]


def has_experts(config) -> bool:
    return config.first_k_dense_replace < config.num_hidden_layers


# DeepSeek-V3's config.json (transformers 4's layout: rope_scaling with "type"), less its FP8
# quantization_config
DEEPSEEK_V3_CONFIG = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
    "rope_theta": 10000, "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1,
    "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn",
    },
}  # fmt: skip


@DEEPSEEK_V3
def test_config_translation_deepseek_v3(model_type):
    """DeepSeek-V3's own config.json: MLA sizes, the sparse layers and router, and the softmax
    scale, inverse frequencies and attention factor of its yarn rope equal transformers'."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    from fnlm.models.rope import inverse_frequencies

    config = fnlm.models.config_from_hf(DEEPSEEK_V3_CONFIG)
    assert (config.head_dim, config.rotary_dim, config.num_kv_heads) == (192, 64, 128)
    assert config.latent_attention == (1536, 512, 128, 64, 128) and config.rope_interleaved
    assert config.moe_layers == tuple(range(3, 61)) and config.moe_scoring == "sigmoid"
    assert (config.moe_groups, config.moe_topk_groups, config.experts_per_token) == (8, 4, 8)
    assert (config.moe_routed_scale, config.shared_expert_size) == (2.5, 2048)
    hf = transformers.DeepseekV3Config(**DEEPSEEK_V3_CONFIG)
    assert config.attention_scale == yarn_apply_mscale(hf.rope_parameters, 192**-0.5)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    ours, our_factor = inverse_frequencies(config, torch.device("cpu"))
    assert torch.equal(ours, inv_freq) and our_factor == factor


@DEEPSEEK_V3
@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_config_defaults_equal_transformers_deepseek_v3(model_type, family):
    """A config.json without the router keys (and q_lora_rank) reads them as transformers' config
    class defaults them: DeepseekV3Config's 8 groups of which 4 compete, scale 2.5, q_lora_rank
    1536; Glm4MoeConfig's 1, 1, 1.0."""
    left_out = ("n_group", "topk_group", "routed_scaling_factor", "q_lora_rank")
    if family == "deepseek_v3":
        hf = {k: v for k, v in DEEPSEEK_V3_CONFIG.items() if k not in left_out}
        reference = transformers.DeepseekV3Config(**hf)
    else:
        hf = {
            "model_type": "glm4_moe", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
            "intermediate_size": 64, "moe_intermediate_size": 16, "num_attention_heads": 4,
            "num_key_value_heads": 2, "n_routed_experts": 64, "num_experts_per_tok": 4,
        }  # fmt: skip
        reference = transformers.Glm4MoeConfig(**hf)
    config = fnlm.models.config_from_hf(hf)
    assert (config.moe_groups, config.moe_topk_groups, config.moe_routed_scale) == (
        reference.n_group,
        reference.topk_group,
        reference.routed_scaling_factor,
    )
    if family == "deepseek_v3":
        assert config.latent_attention[0] == reference.q_lora_rank == 1536


# ----------------------------------------------------------------------------------------------
# Forward and generation
# ----------------------------------------------------------------------------------------------


@DEEPSEEK_V3
@EXAMPLES
@given(data=st.data())
def test_logits_match_transformers_deepseek_v3(model_type, data):
    """Logits, and logits of a left-padded batch, equal transformers' (fp32)."""
    config = data.draw(deepseek_v3_configs())
    check_logits_match(data, config, router_bias_checkpoint(config))


@DEEPSEEK_V3
@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_logits_match_transformers_with_and_without_q_lora_rank_deepseek_v3(
    model_type, q_lora_rank
):
    """Both q paths (q_proj; q_a_proj -> q_a_layernorm -> q_b_proj), v heads wider than q/k's."""
    config = transformers.DeepseekV3Config(**{**TINY, "q_lora_rank": q_lora_rank})
    with router_bias_checkpoint(config) as (model, directory):
        params = load_fp32(directory)
        assert ("q" in params["layers"][0]["attn"]) == (q_lora_rank is None)
        mask = torch.tensor([[1] * 10, [0] * 4 + [1] * 6])
        assert_logits_match(model, params, tokens_for(config.vocab_size, (2, 10)), mask)


@DEEPSEEK_V3
@EXAMPLES
@given(data=st.data())
def test_greedy_matches_transformers_deepseek_v3(model_type, data):
    """Greedy generation with fnlm's KV cache (decompressed keys and values, padded to one
    width) equals transformers' (which caches the compressed latent)."""
    config = data.draw(deepseek_v3_configs())
    check_greedy_matches(data, config, router_bias_checkpoint(config), most_new=10)


@DEEPSEEK_V3
def test_compiled_greedy_equals_eager_deepseek_v3(model_type, monkeypatch):
    """The compiled prefill and decode layers (dynamo traces MLA: the latent split, rope on the
    rope parts, the padded cache writes; CPU test with a backend that runs the traced graph) give
    eager's tokens, which are transformers'."""
    checkpoint = router_bias_checkpoint(transformers.DeepseekV3Config(**TINY))
    check_compiled_generation_equals_eager(monkeypatch, checkpoint)


@DEEPSEEK_V3
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_packed_rows_equal_separate_documents_deepseek_v3(model_type, data):
    """Packed rows (segments, positions restarting per document): each document's logits are
    those of the document alone."""
    config = data.draw(deepseek_v3_configs())
    check_packed_rows_equal_documents(data, config, router_bias_checkpoint(config))


# ----------------------------------------------------------------------------------------------
# LoRA, training, export
# ----------------------------------------------------------------------------------------------


@DEEPSEEK_V3
@EXAMPLES
@given(data=st.data())
def test_saved_adapter_loads_in_peft_with_same_logits_deepseek_v3(
    model_type, data, tmp_path_factory
):
    """LoRA on the latent projections (biases with "lora_only") and, with MoE layers, on the
    router and the expert stacks (peft's target_parameters): peft loads our adapter with our
    logits and re-saves the same files."""
    config = data.draw(deepseek_v3_configs())
    names = attention_targets(config)
    targets = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    if has_experts(config):
        targets += data.draw(st.lists(st.sampled_from(EXPERT_TARGETS), unique=True))
    bias = data.draw(st.sampled_from(["none", "lora_only"]))
    check_adapter_matches_peft(
        config, router_bias_checkpoint(config), tmp_path_factory, targets=targets, bias=bias
    )


@DEEPSEEK_V3
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_init_equals_peft_init_deepseek_v3(model_type, data):
    """fnlm.lora.init draws the initial adapters peft draws with the same seed (the layer's
    modules in transformers' order: PEFT_LAYER_ORDER)."""
    config = data.draw(deepseek_v3_configs())
    seed = data.draw(st.integers(0, 2**31 - 1))
    with router_bias_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        peft_names = fnlm.lora.target_names(params.config)
        targets = [peft_names[t] for t in attention_targets(config)]
        lora = fnlm.lora.init(params, 4, 8, targets, seed=seed)
        settings_ = dict(
            r=4, alpha=8, targets=targets, names={t: t for t in targets}, bias="none",
            rslora=False, modules_to_save=[], rank_pattern={}, alpha_pattern={},
        )  # fmt: skip
        fnlm.lora.save(out, lora)
        assert_saved_equals_peft(out, build_peft(model, settings_, seed=seed))


@DEEPSEEK_V3
@pytest.mark.parametrize("moe", [False, True])
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_lora_training_matches_peft_deepseek_v3(model_type, moe, data, tmp_path_factory):
    """Six LoRA steps lose what peft's do: all-dense with "all-linear" (q_a, q_b, kv_a, kv_b, o:
    peft's all-linear skips the dense MLPs), or with MoE layers on q, q_b, kv_b, the router and
    both expert stacks."""
    config = data.draw(deepseek_v3_configs(moe=moe, q_lora=not moe or None))
    targets = ["q", "q_b", "kv_b", *EXPERT_TARGETS] if moe else "all-linear"
    check_training_matches_peft(config, router_bias_checkpoint(config), tmp_path_factory, targets)


@DEEPSEEK_V3
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_merged_export_loads_in_transformers_deepseek_v3(model_type, data, tmp_path_factory):
    """The merged export (expert stacks merged too) loads in transformers with fnlm's adapted
    logits, and in fnlm again."""
    config = data.draw(deepseek_v3_configs())
    targets = attention_targets(config) + (EXPERT_TARGETS[1:] if has_experts(config) else [])
    check_merged_export_matches(config, router_bias_checkpoint(config), tmp_path_factory, targets)


# ----------------------------------------------------------------------------------------------
# NF4 and refusals
# ----------------------------------------------------------------------------------------------

TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=64,
    kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=32,
    rms_norm_eps=1e-5, max_position_embeddings=256, initializer_range=0.2,
    n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, moe_intermediate_size=64,
)  # fmt: skip


@DEEPSEEK_V3
def test_nf4_logits_match_transformers_on_the_dequantized_weights_deepseek_v3(model_type, tmp_path):
    """NF4 params (the latent projections and the expert stacks too) give the logits
    transformers gives on their dequantized weights (written by fnlm's merged export without a
    16-bit source); the NF4 error is real. With the checkpoint at hand, NF4 params + LoRA
    (latent projections, expert stacks) merge into its 16-bit weights: transformers then gives
    the fp32 params' adapted logits."""
    config = transformers.DeepseekV3Config(**TINY)
    tokens = tokens_for(config.vocab_size, (2, 10))
    with router_bias_checkpoint(config) as (model, directory):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
        targets = ["q_a", "kv_b", "experts.gate_up", "experts.down"]
        lora = randomize_fnlm(fnlm.lora.init(params, r=2, targets=targets))
        fnlm.save(tmp_path / "exact", params, lora=lora, format="merged")
        with torch.no_grad():
            exact = transformers.AutoModelForCausalLM.from_pretrained(
                tmp_path / "exact", dtype=torch.float32
            )
            adapted = fnlm.forward(load_fp32(directory), tokens, lora=lora)
            assert max_rel_error(exact(tokens).logits, adapted) <= FP32_REL_TOL
    attn = params["layers"][0]["attn"]
    assert all(fnlm.quant.is_quantized(attn[leaf]) for leaf in ("q_a", "q_b", "kv_a", "kv_b"))
    assert fnlm.quant.is_quantized(params["layers"][1]["mlp"]["experts"]["gate_up"])
    assert params["layers"][1]["mlp"]["router"].dtype == torch.float32  # as transformers keeps it
    assert_nf4_matches_dequantized(model, params, tokens, tmp_path / "nf4")


@DEEPSEEK_V3
def test_config_refusals_deepseek_v3(model_type):
    """kv heads other than the heads are a ConfigError naming both (kv_b_proj makes a key and a
    value per head), so is a MoE without shared experts; FP8 checkpoints (DeepSeek's releases)
    are refused naming the way out; multi-token-prediction layers past num_hidden_layers are
    skipped on load."""
    hf = transformers.DeepseekV3Config(**TINY).to_dict()
    with pytest.raises(ConfigError, match=r"num_key_value_heads \(1\) must equal"):
        fnlm.models.config_from_hf({**hf, "num_key_value_heads": 1})
    with pytest.raises(ConfigError, match="n_shared_experts 0 is not supported"):
        fnlm.models.config_from_hf({**hf, "n_shared_experts": 0})
    fp8 = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(UnsupportedModelError, match="quantized with 'fp8'.*dequantize them"):
        fnlm.models.config_from_hf({**hf, "quantization_config": fp8})
    config = fnlm.models.config_from_hf(hf)
    stream = [(f"model.layers.{i}.input_layernorm.weight", None, None) for i in range(3)]
    kept = fnlm.models.checkpoint_stream(config, iter(stream))
    assert [name for name, _, _ in kept] == [name for name, _, _ in stream[:2]]


@DEEPSEEK_V3
@pytest.mark.parametrize(
    "key, value, said",
    [
        ("qk_rope_head_dim", 7, "qk_rope_head_dim must be an even integer >= 2; got 7"),
        ("kv_lora_rank", 0, "kv_lora_rank must be an integer >= 1; got 0"),
        ("qk_nope_head_dim", -2, "qk_nope_head_dim must be an integer >= 0; got -2"),
        ("v_head_dim", "16", "v_head_dim must be an integer >= 1; got '16'"),
    ],
)
def test_config_checks_latent_sizes_deepseek_v3(model_type, key, value, said):
    """MLA sizes a checkpoint could not have (an odd rope width, no kv latent, a negative or
    non-integer width) are a ConfigError naming the config.json field when translated, not a
    shape error at the first forward; q_lora_rank null (a plain q projection) is accepted."""
    hf = transformers.DeepseekV3Config(**TINY).to_dict()
    assert fnlm.models.config_from_hf({**hf, "q_lora_rank": None}).latent_attention[0] == 0
    with pytest.raises(ConfigError, match=re.escape(said)):
        fnlm.models.config_from_hf({**hf, key: value})


@pytest.mark.gpu
@DEEPSEEK_V3
def test_cuda_forward_loss_and_generation_deepseek_v3(model_type):
    """On the GPU (Triton rope on the rope parts, compiled decode under CUDA graphs, packed rows
    through flex_attention with q/k heads of 24 and v heads of 32): fp32 logits equal
    transformers' on the CPU, greedy generation equals transformers', and the LoRA loss of packed
    rows and its gradients (latent projections, router, expert stacks) equal the CPU path's."""
    config = transformers.DeepseekV3Config(**TINY)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    with router_bias_checkpoint(config) as (model, directory):
        cpu = load_fp32(directory)
        gpu, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cuda")
        tokens = tokens_for(config.vocab_size, (2, 100))
        with torch.no_grad():
            ref = model(tokens).logits
        assert max_rel_error(fnlm.forward(gpu, tokens.cuda()).cpu(), ref) <= FP32_REL_TOL
        ref_tokens = reference_generate(model, prompts, 6, None)
    assert generate_tokens(gpu, prompts, max_new_tokens=6, eos_token_ids=[]) == ref_tokens

    targets = ["q_a", "q_b", "kv_a", "kv_b", "o", *EXPERT_TARGETS]
    start = [
        t.detach() + 0.1 for t in fnlm.lora.parameters(fnlm.lora.init(cpu, r=2, targets=targets))
    ]
    segments = torch.tensor([[0] * 40 + [1] * 60, [0] * 100])
    positions = torch.cat([torch.arange(40), torch.arange(60)])[None].expand(2, -1).clone()
    positions[1] = torch.arange(100)

    def loss_and_grads(params, device):
        adapters = fnlm.lora.init(params, r=2, targets=targets)
        for t, value in zip(fnlm.lora.parameters(adapters), start, strict=True):
            t.data.copy_(value)  # the same adapters on both devices, B nonzero
        batch = {"tokens": tokens, "segments": segments, "positions": positions}
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = fnlm.loss(params, batch, lora=adapters)
        loss.backward()
        return [loss.detach().cpu()] + [t.grad.cpu() for t in fnlm.lora.parameters(adapters)]

    for ours, theirs in zip(loss_and_grads(gpu, "cuda"), loss_and_grads(cpu, "cpu"), strict=True):
        assert max_rel_error(ours, theirs) <= 1e-4
