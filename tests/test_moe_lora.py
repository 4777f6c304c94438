"""LoRA on mixture-of-experts experts against peft 0.21 under transformers 5.

peft adapts transformers 5's fused expert parameters (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]) with its ParamWrapper: one low-rank pair per expert, saved as
lora_A [E·r, in] and lora_B [out, r·E]. In Mixtral and Qwen3-MoE it converts per-expert targets
(w1/w3/w2, gate_proj/up_proj/down_proj) into those target_parameters, gate and up fused at rank 2r;
Qwen2-MoE it leaves alone (its shared expert and dense MLPs take those names), so there the
experts are targeted as parameters. For each family: the same initial adapter, our adapter loading
in peft and peft's in fnlm with equal logits, equal adapter gradients, an NF4 base, merge = attach.
Then the grouped GEMM over LoRA factors in bf16.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import peft
import pytest
import torch
import torch.utils._pytree as pytree
import transformers
from safetensors.torch import load_file

import fnlm
import fnlm.lora
from fnlm import quant
from fnlm.errors import LoraError
from fnlm.models import moe
from fnlm.params import get_path, leaf_paths, set_path, tree_map
from tests.models import FP32_REL_TOL, max_rel_error, saved_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no tokenizer.json"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

# Gradients sum products over every token in fp32; relative to their scale they agree to rounding
# (tests/test_lora.py uses the same bound).
GRAD_REL_TOL = 1e-4
# NF4 dequantization is exact on both sides; only the order of fp32 sums differs.
NF4_REL_TOL = 1e-4

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    initializer_range=0.2,
    num_experts_per_tok=2,
)

# (transformers config, peft LoraConfig fields, fnlm init targets): the same adapter both ways.
CASES = {
    "mixtral": (
        lambda: transformers.MixtralConfig(
            **BASE, intermediate_size=48, num_hidden_layers=2, num_local_experts=4
        ),
        dict(target_modules=["q_proj", "w1", "w3", "w2"]),
        ("q", "gate", "up", "down"),
    ),
    # a dense layer (0, 2: decoder_sparse_step=2) between MoE layers: peft leaves it unadapted
    "qwen3_moe": (
        lambda: transformers.Qwen3MoeConfig(
            **BASE,
            intermediate_size=40,
            num_hidden_layers=3,
            num_experts=3,
            moe_intermediate_size=24,
            decoder_sparse_step=2,
            norm_topk_prob=True,
        ),  # fmt: skip
        dict(target_modules=["v_proj", "gate_proj", "up_proj", "down_proj"]),
        ("v_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    # shared expert + a dense layer 0, adapted as linears; the experts as parameters
    "qwen2_moe": (
        lambda: transformers.Qwen2MoeConfig(
            **{k: v for k, v in BASE.items() if k != "head_dim"},
            intermediate_size=40,
            num_hidden_layers=2,
            num_experts=4,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=16,
            mlp_only_layers=[0],
        ),  # fmt: skip
        dict(
            target_modules=["q_proj", "gate_proj"], target_parameters=["gate_up_proj", "down_proj"]
        ),
        ("q", "gate", "experts.gate_up", "experts.down"),
    ),
}
FAMILIES = sorted(CASES)
R, ALPHA = 2, 6


def load_fp32(directory, **kwargs):
    params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu", **kwargs)
    return params


def tokens_for(vocab: int, batch: int = 2, seq: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def build_peft(model, family: str, seed: int = 3407):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, task_type="CAUSAL_LM", **CASES[family][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def init_fnlm(params, family: str, **kwargs) -> fnlm.lora.Lora:
    return fnlm.lora.init(params, R, ALPHA, CASES[family][2], **kwargs)


def randomize_fnlm(lora, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return pytree.tree_map(
        lambda t: (t.detach() + 0.3 * torch.randn(t.shape, generator=g)).requires_grad_(True), lora
    )


def randomize_peft(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def read_adapter(directory) -> tuple[dict, dict]:
    doc = json.loads((Path(directory) / "adapter_config.json").read_text())
    return doc, load_file(Path(directory) / "adapter_model.safetensors")


def peft_save(model, directory) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory)


def peft_load(model, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, directory).eval()


def comparable(doc: dict) -> dict:
    """A config with peft's set-valued fields (written in hash order) sorted."""
    doc = dict(doc)
    for key in ("target_modules", "target_parameters"):
        if isinstance(doc.get(key), list):
            doc[key] = sorted(doc[key])
    return doc


def expert_entries(lora) -> list[tuple]:
    return [p for p, node in _adapters(lora) if "experts" in p]


def _adapters(lora):
    out = []

    def walk(node, path):
        if isinstance(node, dict) and set(node) == {"a", "b"}:
            out.append((path, node))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(dict(lora), ())
    return out


# ------------------------------------------------------------------------------------------------
# init and files: the same initial adapter, the same keys and config as peft writes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_init_and_saved_files_equal_peft(family):
    config = CASES[family][0]()
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        lora = init_fnlm(params, family)
        fnlm.lora.save(Path(out) / "ours", lora)
        peft_save(build_peft(model, family), Path(out) / "peft")
        ours_doc, ours = read_adapter(Path(out) / "ours")
        ref_doc, ref = read_adapter(Path(out) / "peft")
    assert comparable(ours_doc) == comparable(ref_doc)
    assert ours.keys() == ref.keys()
    for key in ref:  # A drawn from the same RNG stream in the same order, B zero
        assert torch.equal(ours[key], ref[key]), key
    assert any(".experts.base_layer.lora_A" in k for k in ref)  # both stacks: nested wrappers
    e = config.num_local_experts if family == "mixtral" else config.num_experts
    gate_up = get_path(lora, expert_entries(lora)[0])
    rank = 2 * R if family != "qwen2_moe" else R  # peft fuses gate + up: twice the rank
    assert gate_up["a"].shape == (e, rank, config.hidden_size)
    assert all("router" not in p for p, _ in _adapters(lora))  # the router stays unadapted


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_all_linear_adapts_routers_and_experts_as_peft(family):
    """peft's "all-linear" on the families it converts: attention, both stacks (gate_up at rank
    2r) and the routers ("gate.weight"), drawn in peft's order (Mixtral's router before its
    experts, Qwen3-MoE's after)."""
    config = CASES[family][0]()
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        lora = fnlm.lora.init(params, R, ALPHA, "all-linear")
        fnlm.lora.save(Path(out) / "ours", lora)
        torch.manual_seed(3407)
        settings = peft.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = peft.get_peft_model(model, settings)
        peft_save(peft_model, Path(out) / "peft")
        ours_doc, ours = read_adapter(Path(out) / "ours")
        ref_doc, ref = read_adapter(Path(out) / "peft")
        assert comparable(ours_doc) == comparable(ref_doc)
        assert "gate.weight" in ref_doc["target_parameters"]
        assert ours.keys() == ref.keys()
        for key in ref:
            assert torch.equal(ours[key], ref[key]), key

        randomize_peft(peft_model)
        peft_save(peft_model, Path(out) / "trained")
        loaded = fnlm.lora.load(Path(out) / "trained", params)
        tokens = tokens_for(config.vocab_size, seed=2)
        with torch.no_grad():
            ref_logits = peft_model.eval()(tokens).logits
            ours_logits = fnlm.forward(params, tokens, lora=loaded)
    assert max_rel_error(ours_logits, ref_logits) <= FP32_REL_TOL
    assert isinstance(get_path(loaded, ("layers", 1, "mlp", "router")), dict)


# ------------------------------------------------------------------------------------------------
# fnlm -> peft and peft -> fnlm: same logits; peft re-saves exactly our files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_our_adapter_loads_in_peft_with_same_logits(family):
    config = CASES[family][0]()
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        lora = randomize_fnlm(init_fnlm(params, family))
        fnlm.lora.save(Path(out) / "ours", lora)
        peft_model = peft_load(model, Path(out) / "ours")
        tokens = tokens_for(config.vocab_size)
        with torch.no_grad():
            ref = peft_model(tokens).logits
            ours = fnlm.forward(params, tokens, lora=lora)
            plain = fnlm.forward(params, tokens)
        assert max_rel_error(ours, ref) <= FP32_REL_TOL
        # the experts' adapters alone move the logits well past the tolerance
        experts_only = fnlm.lora.Lora(
            {"layers": [{} for _ in range(config.num_hidden_layers)]},
            lora.config,
            lora.model_config,
        )
        for path in expert_entries(lora):
            set_path(experts_only, path, get_path(lora, path))
        with torch.no_grad():
            moved = fnlm.forward(params, tokens, lora=experts_only)
        assert max_rel_error(moved, plain) > 10 * FP32_REL_TOL

        peft_save(peft_model, Path(out) / "again")
        ours_doc, ours_tensors = read_adapter(Path(out) / "ours")
        ref_doc, ref_tensors = read_adapter(Path(out) / "again")
    assert comparable(ours_doc) == comparable(ref_doc)
    assert ours_tensors.keys() == ref_tensors.keys()
    for key in ours_tensors:
        assert torch.equal(ours_tensors[key], ref_tensors[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_in_fnlm_with_same_logits(family):
    config = CASES[family][0]()
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        peft_model = build_peft(model, family)
        randomize_peft(peft_model)
        peft_save(peft_model, out)
        lora = fnlm.lora.load(out, params)
        mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])
        tokens = tokens_for(config.vocab_size, seed=3)
        with torch.no_grad():
            ref = peft_model.eval()(tokens, attention_mask=mask).logits
            ours = fnlm.forward(params, tokens, lora=lora, attention_mask=mask)
    real = mask.bool()
    assert max_rel_error(ours[real], ref[real]) <= FP32_REL_TOL
    assert len(expert_entries(lora)) == 2 * len(params.config.moe_layers)


# ------------------------------------------------------------------------------------------------
# training: one step's adapter gradients equal peft's
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_gradients_match_peft(family):
    config = CASES[family][0]()
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        peft_model = build_peft(model, family)
        randomize_peft(peft_model)
        peft_save(peft_model, out)
        lora = fnlm.lora.load(out, params)
        tokens = tokens_for(config.vocab_size, seed=5)
        labels = tokens.clone()
        labels[0, :3] = -100

        peft_model.train()
        peft_model(input_ids=tokens, labels=labels).loss.backward()
        fnlm.loss(params, {"tokens": tokens, "labels": labels}, lora=lora).backward()
        # our gradients, written under peft's key names (and layout) by fnlm.lora.save itself
        fnlm.lora.save(out, pytree.tree_map(lambda t: t.grad, lora))
        ours = load_file(Path(out) / "adapter_model.safetensors")
    ref = {
        n.replace(".default", ""): p.grad
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    }
    assert ours.keys() == ref.keys()
    for key, g in ref.items():
        assert g.abs().max() > 0, key
        assert max_rel_error(ours[key], g) <= GRAD_REL_TOL, key


# ------------------------------------------------------------------------------------------------
# NF4 base; merge
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_lora_on_nf4_base_equals_dequantized_base(family):
    """Expert stacks quantized to NF4 (the router kept 16-bit): forward, adapter gradients and merge
    equal those over the dequantized base."""
    config = CASES[family][0]()
    config.hidden_size = 64  # NF4 blocks of 64 along the input
    config.moe_intermediate_size = config.intermediate_size = 64
    if family == "qwen2_moe":
        config.shared_expert_intermediate_size = 64
    with saved_checkpoint(config) as (_, directory):
        qparams, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
    n, e = qparams.config.moe_layers[0], qparams.config.num_experts
    stacks = get_path(qparams, ("layers", n, "mlp", "experts"))
    assert all(quant.is_quantized(w) for w in stacks.values())
    assert not quant.is_quantized(get_path(qparams, ("layers", n, "mlp", "router")))
    dense = tree_map(lambda t: t, qparams)
    for path, leaf in leaf_paths(qparams):
        if quant.is_quantized(leaf):  # a quantized stack is [E·out, in]; dense ones are 3-D
            stack = "experts" in path
            set_path(dense, path, moe.dense(leaf, e) if stack else quant.dequantize(leaf))
    lora = randomize_fnlm(init_fnlm(qparams, family))
    twin = pytree.tree_map(lambda t: t.detach().clone().requires_grad_(), lora)
    batch = {"tokens": tokens_for(config.vocab_size)}

    fnlm.loss(qparams, batch, lora=lora).backward()
    fnlm.loss(dense, batch, lora=twin).backward()
    for ours, ref in zip(fnlm.lora.parameters(lora), fnlm.lora.parameters(twin), strict=True):
        assert ours.grad is not None and ours.grad.abs().sum() > 0
        assert max_rel_error(ours.grad, ref.grad) <= GRAD_REL_TOL
    with torch.no_grad():
        ours = fnlm.forward(qparams, batch["tokens"], lora=lora)
        ref = fnlm.forward(dense, batch["tokens"], lora=lora)
        merged = fnlm.lora.merge(qparams, lora)
        from_merged = fnlm.forward(merged, batch["tokens"])
    assert max_rel_error(ours, ref) <= NF4_REL_TOL
    assert max_rel_error(from_merged, ours) <= NF4_REL_TOL
    gate_up = get_path(merged, ("layers", n, "mlp", "experts", "gate_up"))
    assert isinstance(gate_up, torch.Tensor) and gate_up.shape == moe.stack_shape(
        qparams.config, "gate_up"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_attach(family):
    config = CASES[family][0]()
    with saved_checkpoint(config) as (_, directory):
        params = load_fp32(directory)
    lora = randomize_fnlm(init_fnlm(params, family))
    tokens = tokens_for(config.vocab_size, seed=7)
    with torch.no_grad():
        ours = fnlm.forward(params, tokens, lora=lora)
        merged = fnlm.lora.merge(params, lora)
        from_merged = fnlm.forward(merged, tokens)
    assert max_rel_error(from_merged, ours) <= FP32_REL_TOL
    assert not any(t.requires_grad for t in pytree.tree_leaves(merged))
    # each expert's merged matrix is W_e + scale · B_e A_e
    path = expert_entries(lora)[0]
    node = get_path(lora, path)
    scale = lora.config.scale(
        node["a"].shape[1], (f"model.layers.{path[1]}.mlp.experts.gate_up_proj",)
    )
    w = get_path(params, path)
    for e in range(w.shape[0]):
        want = w[e] + scale * node["b"][e].detach() @ node["a"][e].detach()
        assert torch.allclose(get_path(merged, path)[e], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The grouped GEMM (torch._grouped_mm) over LoRA factors, bf16 on CPU
# ------------------------------------------------------------------------------------------------

# bf16 has 8 mantissa bits: each path rounds its products and sums to bf16 (relative 2^-8), the
# grouped GEMM accumulating in fp32 and the loop in the matmul's own order; four ulps of slack.
BF16_REL_TOL = 4 * 2**-8


def test_grouped_matmul_over_lora_factors_equals_loop_in_bf16():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    config = fnlm.ModelConfig(
        model_type="mixtral", vocab_size=8, hidden_size=32, intermediate_size=16, num_layers=1,
        num_heads=2, num_kv_heads=2, head_dim=16, num_experts=4, experts_per_token=2,
        moe_layers=(0,), moe_renormalize=True,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    tokens, r = 24, 8  # rank and features multiples of 8: _grouped_mm's 16-byte rows
    route = moe.route(config, torch.randn(tokens, 4, generator=g), torch.bfloat16)
    x = torch.randn(tokens, 32, generator=g)[route.tokens].to(torch.bfloat16)
    weight = torch.randn(4, 32, 32, generator=g).to(torch.bfloat16)
    a0 = (torch.randn(4, r, 32, generator=g) / 4).to(torch.bfloat16)
    b0 = (torch.randn(4, 32, r, generator=g) / 4).to(torch.bfloat16)
    cotangent = torch.randn(x.shape[0], 32, generator=g).to(torch.bfloat16)

    def run(grouped: bool):
        xs, a, b = (t.detach().clone().requires_grad_() for t in (x, a0, b0))
        base = moe.matmul(route, xs, weight, grouped=grouped)
        y = base + moe.matmul(route, moe.matmul(route, xs, a, grouped=grouped), b, grouped=grouped)
        y.backward(cotangent)
        return y, xs.grad, a.grad, b.grad

    def reference():  # the loop in fp32
        xs, a, b = (t.detach().float().requires_grad_() for t in (x, a0, b0))
        y = moe.matmul(route, xs, weight.float(), grouped=False)
        y = y + moe.matmul(route, moe.matmul(route, xs, a, grouped=False), b, grouped=False)
        y.backward(cotangent.float())
        return y, xs.grad, a.grad, b.grad

    for grouped, looped, exact in zip(run(True), run(False), reference(), strict=True):
        assert max_rel_error(grouped, exact) <= BF16_REL_TOL
        assert max_rel_error(looped, exact) <= BF16_REL_TOL
        assert max_rel_error(grouped, looped) <= 2 * BF16_REL_TOL


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_bad_expert_targets_and_tensors_raise_lora_error():
    config = CASES["mixtral"][0]()
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        with pytest.raises(LoraError, match="up projections"):
            fnlm.lora.init(params, targets=("gate", "down"))  # gate and up share one stack
        with pytest.raises(LoraError, match="dropout"):
            fnlm.lora.init(params, targets=("down",), dropout=0.1)  # peft's ParamWrapper refuses it
        lora = fnlm.lora.init(params, targets=("down",))
        path = expert_entries(lora)[0]
        node = get_path(lora, path)
        bad = fnlm.lora.Lora(dict(lora), lora.config, lora.model_config)
        set_path(bad, path, {"a": node["a"][:, :, :-1], "b": node["b"]})
        with pytest.raises(LoraError, match="experts.down"):
            fnlm.forward(params, tokens_for(config.vocab_size), lora=bad)

        fnlm.lora.save(out, lora)
        tensors = load_file(Path(out) / "adapter_model.safetensors")
        key = next(k for k in tensors if k.endswith("experts.lora_A.weight"))
        tensors[key] = tensors[key][:-1]
        from safetensors.torch import save_file

        save_file(tensors, Path(out) / "adapter_model.safetensors")
        with pytest.raises(LoraError, match=key.replace(".", r"\.")):
            fnlm.lora.load(out, params)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_with_expert_lora_loads_in_transformers(family):
    """fnlm.save(format="merged") folds the expert (and router) adapters into per-expert
    checkpoint tensors that transformers loads back to the adapted model's logits."""
    config = CASES[family][0]()
    targets = CASES[family][2] if family == "qwen2_moe" else "all-linear"
    with saved_checkpoint(config) as (_, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        lora = randomize_fnlm(fnlm.lora.init(params, R, ALPHA, targets))
        fnlm.save(out, params, lora=lora, format="merged")
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tokens = tokens_for(config.vocab_size, seed=4)
        with torch.no_grad():
            ref = model(tokens).logits
            ours = fnlm.forward(params, tokens, lora=lora)
    assert max_rel_error(ref, ours) <= FP32_REL_TOL
