"""Mixture-of-experts LoRA adapters trained under transformers 4, read by fnlm.lora.load.

Under transformers 4 each expert was an nn.Linear of its own, so peft saved per-expert factors
("...block_sparse_moe.experts.3.w1.lora_A.weight" in Mixtral, "...mlp.experts.3.gate_proj..." in
Qwen2/3-MoE). peft 0.21 converts them on load to transformers 5's stacks
(peft.utils.transformers_weight_conversion): gate and up fused block-diagonally at rank 2r and
alpha 2·alpha. The oracle here is what the adapter computed when it was trained: the transformers
model with every factor's scale·B·A added to its weight by hand. fnlm equals it, and equals peft
wherever peft loads the file faithfully; the cases where peft 0.21 does not (use_rslora, missing
experts or projections, per-expert rank/alpha patterns, Qwen2-MoE) are checked against the oracle
and against peft reading the adapter as fnlm.lora.save re-writes it.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import fnlm
import fnlm.lora
from fnlm.errors import LoraError
from tests.models import FP32_REL_TOL, max_rel_error, saved_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no tokenizer.json"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,
    num_experts_per_tok=2,
)
R, ALPHA = 2, 6


@dataclass(frozen=True)
class Family:
    config: object  # () -> transformers config
    block: str  # the MoE block's module name under transformers 4
    names: dict  # fnlm part -> transformers 4 projection name
    experts: int
    inner: int  # one expert's intermediate size


FAMILIES = {
    "mixtral": Family(
        lambda: transformers.MixtralConfig(
            **BASE, head_dim=8, intermediate_size=48, num_hidden_layers=2, num_local_experts=4
        ),
        "block_sparse_moe",
        {"gate": "w1", "up": "w3", "down": "w2"},
        4,
        48,
    ),
    "qwen3_moe": Family(
        lambda: transformers.Qwen3MoeConfig(
            **BASE,
            head_dim=8,
            intermediate_size=40,
            num_hidden_layers=2,
            num_experts=3,
            moe_intermediate_size=24,
            norm_topk_prob=True,
        ),
        "mlp",
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
        3,
        24,
    ),
    "qwen2_moe": Family(
        lambda: transformers.Qwen2MoeConfig(
            **BASE,
            intermediate_size=40,
            num_hidden_layers=2,
            num_experts=4,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=16,
        ),
        "mlp",
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
        4,
        24,
    ),
}


@dataclass
class Factor:
    """One transformers-4 Linear's adapter and where its delta lands in the transformers 5 model."""

    parameter: str  # transformers 5 parameter name
    index: tuple  # (expert, row slice) within a stack, or () for a whole matrix
    a: torch.Tensor
    b: torch.Tensor
    scale: float


def write_legacy(
    directory: Path,
    config,
    family: str,
    *,
    parts=("gate", "up", "down"),
    experts=None,
    attention=("q_proj",),
    router=False,
    shared=False,
    r=R,
    alpha=ALPHA,
    rank_of=None,
    alpha_of=None,
    rslora=False,
    seed=0,
    extra_config=None,
) -> list[Factor]:
    """A transformers-4 adapter as peft 0.x wrote it: per-expert lora_A/B of `parts` for
    `experts` (default all) in every layer, attention `attention`, the router when `router`, the
    shared expert (Qwen2-MoE) when `shared`. rank_of / alpha_of: {transformers 4 name: value},
    written as rank_pattern / alpha_pattern. Returns the factors for the oracle."""
    spec = FAMILIES[family]
    rank_of, alpha_of = rank_of or {}, alpha_of or {}
    g = torch.Generator().manual_seed(seed)
    hidden, inner = config.hidden_size, spec.inner
    tensors, factors = {}, []

    def add(name, in_features, out_features, parameter, index=()):
        rank, a_value = rank_of.get(name, r), alpha_of.get(name, alpha)
        a = 0.3 * torch.randn(rank, in_features, generator=g)
        b = 0.3 * torch.randn(out_features, rank, generator=g)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        scale = a_value / math.sqrt(rank) if rslora else a_value / rank
        factors.append(Factor(parameter, index, a, b, scale))

    for n in range(config.num_hidden_layers):
        layer = f"model.layers.{n}"
        for proj in attention:
            weight = dict(q_proj=config.num_attention_heads, v_proj=config.num_key_value_heads)[
                proj
            ]
            head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
            add(
                f"{layer}.self_attn.{proj}",
                hidden,
                weight * head_dim,
                f"{layer}.self_attn.{proj}.weight",
            )
        if router:
            add(f"{layer}.{spec.block}.gate", hidden, spec.experts, f"{layer}.mlp.gate.weight")
        if shared:
            s = config.shared_expert_intermediate_size
            for proj, (i, o) in dict(
                gate_proj=(hidden, s), up_proj=(hidden, s), down_proj=(s, hidden)
            ).items():
                name = f"{layer}.mlp.shared_expert.{proj}"
                add(name, i, o, f"{name}.weight")
        for e in range(spec.experts) if experts is None else experts:
            for part in parts:
                name = f"{layer}.{spec.block}.experts.{e}.{spec.names[part]}"
                if part == "down":
                    add(name, inner, hidden, f"{layer}.mlp.experts.down_proj", (e,))
                else:
                    rows = slice(0, inner) if part == "gate" else slice(inner, 2 * inner)
                    add(name, hidden, inner, f"{layer}.mlp.experts.gate_up_proj", (e, rows))

    targets = list(attention) + [spec.names[p] for p in parts]
    targets += ["gate"] * router + [
        "shared_expert." + p for p in ("gate_proj", "up_proj", "down_proj")
    ] * shared
    doc = dict(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        use_rslora=rslora,
        target_modules=sorted(set(targets)),
        rank_pattern=rank_of,
        alpha_pattern=alpha_of,
        peft_version="0.13.2",
    )
    doc.update(extra_config or {})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(doc, indent=2))
    return factors


def oracle_logits(model, factors: list[Factor], tokens) -> torch.Tensor:
    """What the adapter computes under transformers 4: each Linear's W + scale·B·A."""
    merged = copy.deepcopy(model)
    weights = dict(merged.named_parameters())
    with torch.no_grad():
        for f in factors:
            weights[f.parameter][f.index] += f.scale * (f.b @ f.a)
        return merged(tokens).logits


def peft_logits(model, directory, tokens) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
    with torch.no_grad():
        return wrapped(tokens).logits


def load_params(directory):
    params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu")
    return params


def fnlm_logits(params, directory, tokens) -> torch.Tensor:
    lora = fnlm.lora.load(directory, params)
    with torch.no_grad():
        return fnlm.forward(params, tokens, lora=lora)


def tokens_for(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def check_resaved(params, model, legacy: Path, out: Path, tokens, expected) -> None:
    """fnlm.lora.save writes the stacked format; peft reads it with the expected logits."""
    fnlm.lora.save(out, fnlm.lora.load(legacy, params))
    assert not any(".experts.0." in k for k in load_file(out / "adapter_model.safetensors"))
    assert max_rel_error(peft_logits(model, out, tokens), expected) <= FP32_REL_TOL


# ------------------------------------------------------------------------------------------------
# Where peft 0.21 converts the file: fnlm = peft = the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, parts, router",
    [
        ("mixtral", ("gate", "up", "down"), True),
        ("mixtral", ("down",), False),
        ("qwen3_moe", ("gate", "up", "down"), True),
        ("qwen3_moe", ("down",), True),
    ],
)
def test_legacy_adapter_equals_peft_and_oracle(family, parts, router):
    config = FAMILIES[family].config()
    with saved_checkpoint(config) as (model, base), tempfile.TemporaryDirectory() as out:
        legacy = Path(out) / "legacy"
        factors = write_legacy(legacy, config, family, parts=parts, router=router)
        params = load_params(base)
        tokens = tokens_for(config.vocab_size)
        ours = fnlm_logits(params, legacy, tokens)
        ref = peft_logits(model, legacy, tokens)
        oracle = oracle_logits(model, factors, tokens)
        with torch.no_grad():
            plain = model(tokens).logits
        assert max_rel_error(ours, ref) <= FP32_REL_TOL
        assert max_rel_error(ours, oracle) <= FP32_REL_TOL
        assert max_rel_error(ours, plain) > 100 * FP32_REL_TOL  # the adapter does something
        # fnlm's stacks are peft's: the same config, the same tensors under the same keys
        lora = fnlm.lora.load(legacy, params)
        fnlm.lora.save(Path(out) / "ours", lora)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(model), legacy)
            wrapped.save_pretrained(Path(out) / "peft")
        ours_t = load_file(Path(out) / "ours" / "adapter_model.safetensors")
        ref_t = load_file(Path(out) / "peft" / "adapter_model.safetensors")
        ours_doc, ref_doc = (
            json.loads((Path(out) / d / "adapter_config.json").read_text())
            for d in ("ours", "peft")
        )
        for doc in (ours_doc, ref_doc):  # peft keeps the version that wrote the legacy file
            doc.pop("peft_version")
            doc["target_parameters"] = sorted(doc["target_parameters"])
            doc["target_modules"] = sorted(doc["target_modules"])
        assert ours_doc == ref_doc
        assert ours_t.keys() == ref_t.keys()
        for key in ref_t:
            assert torch.equal(ours_t[key], ref_t[key]), key
        check_resaved(params, model, legacy, Path(out) / "again", tokens, oracle)


# ------------------------------------------------------------------------------------------------
# Where peft 0.21 refuses the file or reads it differently: fnlm = the oracle
# ------------------------------------------------------------------------------------------------


def test_qwen2_moe_legacy_experts_are_converted_where_peft_drops_them():
    """peft 0.21 converts no Qwen2-MoE adapter (transformers maps no conversion pattern to
    qwen2_moe itself): it keeps gate_proj/up_proj/down_proj as target_modules (the shared expert)
    and silently drops the experts' factors. fnlm converts them as for Qwen3-MoE."""
    family = "qwen2_moe"
    config = FAMILIES[family].config()
    with saved_checkpoint(config) as (model, base), tempfile.TemporaryDirectory() as out:
        legacy = Path(out) / "legacy"
        factors = write_legacy(legacy, config, family, shared=True)
        params = load_params(base)
        tokens = tokens_for(config.vocab_size, seed=1)
        ours = fnlm_logits(params, legacy, tokens)
        oracle = oracle_logits(model, factors, tokens)
        assert max_rel_error(ours, oracle) <= FP32_REL_TOL
        without_experts = [f for f in factors if ".experts." not in f.parameter]
        dropped = oracle_logits(model, without_experts, tokens)
        assert max_rel_error(peft_logits(model, legacy, tokens), dropped) <= FP32_REL_TOL
        assert max_rel_error(dropped, oracle) > 100 * FP32_REL_TOL
        check_resaved(params, model, legacy, Path(out) / "again", tokens, oracle)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_gate_up_without_down_is_converted_where_peft_drops_it(family):
    """peft 0.21 writes a converted gate_up to the inner wrapper's keys (".experts.base_layer"),
    which exist only when down_proj is targeted too: without it, the factors are dropped."""
    config = FAMILIES[family].config()
    with saved_checkpoint(config) as (model, base), tempfile.TemporaryDirectory() as out:
        legacy = Path(out) / "legacy"
        factors = write_legacy(legacy, config, family, parts=("gate", "up"))
        params = load_params(base)
        tokens = tokens_for(config.vocab_size, seed=4)
        oracle = oracle_logits(model, factors, tokens)
        assert max_rel_error(fnlm_logits(params, legacy, tokens), oracle) <= FP32_REL_TOL
        attention_only = oracle_logits(
            model, [f for f in factors if "experts" not in f.parameter], tokens
        )
        assert max_rel_error(peft_logits(model, legacy, tokens), attention_only) <= FP32_REL_TOL
        assert max_rel_error(attention_only, oracle) > 100 * FP32_REL_TOL
        check_resaved(params, model, legacy, Path(out) / "again", tokens, oracle)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_rslora_keeps_each_projection_scale(family):
    """With use_rslora, peft's fused gate_up at rank 2r / alpha 2·alpha scales by
    2·alpha/sqrt(2r), sqrt(2) times what gate and up had; fnlm keeps alpha/sqrt(r)."""
    config = FAMILIES[family].config()
    with saved_checkpoint(config) as (model, base), tempfile.TemporaryDirectory() as out:
        legacy = Path(out) / "legacy"
        factors = write_legacy(legacy, config, family, rslora=True)
        params = load_params(base)
        tokens = tokens_for(config.vocab_size, seed=2)
        ours = fnlm_logits(params, legacy, tokens)
        oracle = oracle_logits(model, factors, tokens)
        assert max_rel_error(ours, oracle) <= FP32_REL_TOL
        peft_scaled = [
            Factor(
                f.parameter,
                f.index,
                f.a,
                f.b,
                f.scale * (math.sqrt(2) if "gate_up" in f.parameter else 1),
            )
            for f in factors
        ]
        assert (
            max_rel_error(
                peft_logits(model, legacy, tokens), oracle_logits(model, peft_scaled, tokens)
            )
            <= FP32_REL_TOL
        )
        check_resaved(params, model, legacy, Path(out) / "again", tokens, oracle)


@pytest.mark.parametrize(
    "case",
    ["missing experts", "gate only", "up only", "rank and alpha patterns", "lora_dropout"],
)
def test_what_peft_refuses_loads_as_trained(case):
    """Experts absent from the file (zero delta), gate without up (peft: "Cannot convert PEFT
    target(s) w1 without also targeting w3"), per-expert rank/alpha patterns (peft keeps rank 2r
    for every stack: a size mismatch), lora_dropout (most adapters on the hub; peft's ParamWrapper
    refuses it, fnlm applies no dropout to expert stacks)."""
    family = "mixtral"
    config = FAMILIES[family].config()
    kwargs = {
        "missing experts": dict(experts=[0, 2]),
        "gate only": dict(parts=("gate", "down")),
        "up only": dict(parts=("up",)),
        "lora_dropout": dict(extra_config={"lora_dropout": 0.05}),
        "rank and alpha patterns": dict(
            rank_of={
                "model.layers.0.block_sparse_moe.experts.1.w3": 3,
                "model.layers.1.block_sparse_moe.experts.2.w2": 1,
            },
            alpha_of={
                "model.layers.0.block_sparse_moe.experts.2.w1": 10,
                "model.layers.1.block_sparse_moe.experts.0.w2": 2.5,
            },
        ),
    }[case]
    with saved_checkpoint(config) as (model, base), tempfile.TemporaryDirectory() as out:
        legacy = Path(out) / "legacy"
        factors = write_legacy(legacy, config, family, **kwargs)
        params = load_params(base)
        tokens = tokens_for(config.vocab_size, seed=3)
        oracle = oracle_logits(model, factors, tokens)
        assert max_rel_error(fnlm_logits(params, legacy, tokens), oracle) <= FP32_REL_TOL
        refusal = {
            "gate only": "Cannot convert",
            "up only": "Cannot convert",
            "lora_dropout": "lora_dropout != 0",
        }.get(case, "size mismatch|stack expects each tensor")
        with pytest.raises((ValueError, RuntimeError), match=refusal):
            peft_logits(model, legacy, tokens)
        if case != "lora_dropout":  # fnlm.lora.save keeps the dropout, which peft refuses again
            check_resaved(params, model, legacy, Path(out) / "again", tokens, oracle)


# ------------------------------------------------------------------------------------------------
# Errors: the key at fault, named
# ------------------------------------------------------------------------------------------------


def _rewrite(directory: Path, edit) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


KEY = "base_model.model.model.layers.1.block_sparse_moe.experts.2.w1"


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda t: t.update({f"{KEY}.lora_A.weight": torch.zeros(R, 31)}),
            rf"{KEY}\.lora_A.*\(2, 31\).*\(2, 32\)",
        ),
        (
            lambda t: t.update({f"{KEY}.lora_B.weight": torch.zeros(48, 3)}),
            rf"{KEY}\.lora_B.*\(48, 3\).*\(48, 2\)",
        ),
        (
            lambda t: t.update(
                {
                    f"{KEY}.lora_A.weight": torch.zeros(3, 32),
                    f"{KEY}.lora_B.weight": torch.zeros(48, 3),
                }
            ),
            rf"{KEY}\.lora_A.weight has rank 3.*rank 2",
        ),
        (lambda t: t.pop(f"{KEY}.lora_B.weight"), rf"{KEY}\.lora_A.weight has no lora_B"),
        (lambda t: t.pop(f"{KEY}.lora_A.weight"), rf"{KEY}\.lora_B.weight has no lora_A"),
        (
            lambda t: t.update(
                {KEY.replace("experts.2", "experts.4") + ".lora_A.weight": torch.zeros(R, 32)}
            ),
            r"experts\.4\.w1\.lora_A\.weight adapts expert 4.*4 experts",
        ),
        (
            lambda t: t.update(
                {KEY.replace("layers.1", "layers.2") + ".lora_A.weight": torch.zeros(R, 32)}
            ),
            r"layers\.2\..*not a mixture-of-experts layer",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight": torch.zeros(
                        8, 32
                    ),
                    "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight": torch.zeros(
                        96, 8
                    ),
                }
            ),
            r"layers\.1\.mlp\.experts\.base_layer\.lora_A\.weight is in the file.*one or the other",
        ),
    ],
    ids=["A in", "B rank", "rank pattern", "no B", "no A", "expert index", "layer", "both layouts"],
)
def test_inconsistent_legacy_adapter_is_refused(edit, match):
    config = FAMILIES["mixtral"].config()
    with saved_checkpoint(config) as (_, base), tempfile.TemporaryDirectory() as out:
        legacy = Path(out) / "legacy"
        extra = {"target_parameters": ["gate_up_proj"]} if "one or the other" in match else None
        write_legacy(legacy, config, "mixtral", extra_config=extra)
        _rewrite(legacy, edit)
        with pytest.raises(LoraError, match=match):
            fnlm.lora.load(legacy, load_params(base))
