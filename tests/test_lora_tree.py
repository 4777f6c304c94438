"""The lora package's structure: pytree registration (children vs static context declared once),
the weight-leaf protocols the decoder dispatches on, `with_adapters`, and the layering (models
never import lora; a family's PEFT naming is read from the family's own module)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
import transformers

import fnlm
import fnlm.lora
from fnlm import quant
from fnlm.errors import ArgumentError
from fnlm.lora.leaves import LoraEmbedding, LoraExperts, LoraLinear, SavedEmbedding
from fnlm.lora.targets import LAYER_ORDER, family_naming
from fnlm.models import decoder, phi3
from fnlm.params import (
    EmbeddingLeaf,
    ExpertsLeaf,
    LinearLeaf,
    MergeableLeaf,
    Params,
    register_pytree,
    static_field,
)
from tests.models import saved_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no tokenizer.json"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

LLAMA = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
)  # fmt: skip


@pytest.fixture(scope="module")
def params() -> Params:
    with saved_checkpoint(transformers.LlamaConfig(**LLAMA)) as (_, directory):
        params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu")
    return params


def adapters(params: Params) -> fnlm.lora.Lora:
    """Adapters on q, v, down, embed and a saved lm_head, with nonzero B (a visible delta)."""
    lora = fnlm.lora.init(
        params, r=4, targets=("q", "v", "down", "embed"), modules_to_save=("lm_head",), dropout=0.1
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in fnlm.lora.parameters(lora):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return lora


# ------------------------------------------------------------------------------------------
# register_pytree: children and static context declared once
# ------------------------------------------------------------------------------------------


@register_pytree
@dataclasses.dataclass(frozen=True)
class _Scaled:
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float = static_field()
    name: str = static_field("w")


@register_pytree(static=("tag",))
class _Tagged(dict):
    def __init__(self, tree: dict, tag: str):
        super().__init__(tree)
        self.tag = tag


class _Plain:
    def __init__(self, data: torch.Tensor, *, dtype: torch.dtype):
        self.data, self.dtype = data, dtype


register_pytree(_Plain, children=("data",), static=("dtype",))


def test_register_pytree_dataclass_dict_and_plain_class():
    """Children are mapped, static fields ride in the context (and in the structure), key paths
    name the fields and items, None children hold no leaves, and unflatten rebuilds the type."""
    w, b = torch.ones(2, 3), torch.zeros(2)
    tree = _Tagged({"x": _Scaled(w, None, 0.5), "y": _Plain(b, dtype=torch.bfloat16)}, "t")
    leaves, spec = pytree.tree_flatten(tree)
    assert len(leaves) == 2 and leaves[0] is w and leaves[1] is b
    doubled = pytree.tree_map(lambda t: t * 2, tree)
    assert isinstance(doubled, _Tagged) and doubled.tag == "t"
    assert isinstance(doubled["x"], _Scaled) and doubled["x"].scale == 0.5
    assert doubled["x"].name == "w" and doubled["x"].bias is None
    assert torch.equal(doubled["x"].weight, 2 * w)
    assert isinstance(doubled["y"], _Plain) and doubled["y"].dtype == torch.bfloat16
    paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(tree)[0]]
    assert paths == ["['x'].weight", "['y'].data"]
    # static context is part of the structure: another scale is another tree
    _, other = pytree.tree_flatten(_Tagged({"x": _Scaled(w, None, 0.25), "y": tree["y"]}, "t"))
    assert other != spec


def test_adapted_params_round_trip_through_pytree(params):
    """An attached tree (LoraLinear / LoraEmbedding / SavedEmbedding leaves over dense weights)
    flattens to its tensors only and rebuilds with the same leaf types and static fields."""
    lora = fnlm.lora.train_mode(adapters(params))
    attached = fnlm.lora.attach(params, lora)
    leaves, spec = pytree.tree_flatten(attached)
    assert all(isinstance(t, torch.Tensor) for t in leaves)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, Params) and rebuilt.config is params.config
    q, ref = rebuilt["layers"][1]["attn"]["q"], attached["layers"][1]["attn"]["q"]
    assert isinstance(q, LoraLinear) and q.a is ref.a and q.weight is ref.weight
    assert (q.scale, q.dropout, q.training) == (ref.scale, 0.1, True)
    assert isinstance(rebuilt["embed"], LoraEmbedding)
    assert rebuilt["embed"].padding_idx == attached["embed"].padding_idx
    assert type(rebuilt["lm_head"]) is torch.Tensor  # modules_to_save: the lora's full copy
    keys = {pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(attached)[0]}
    assert "['layers'][1]['attn']['q'].a" in keys and "['embed'].b" in keys
    # the Lora itself: its config, model config and mode are context
    back = pytree.tree_unflatten(*pytree.tree_flatten(lora))
    assert isinstance(back, fnlm.lora.Lora) and back.config == lora.config and back.training


def test_quantized_leaves_round_trip_through_pytree(params):
    """NF4 / int8 weights: their tensors are the children (NF4's nested statistics included),
    shape and dtypes the context."""
    w = params["layers"][0]["mlp"]["down"]
    for mode in ("nf4", "int8"):
        leaf = quant.quantize(w, mode, compute_dtype=torch.float32)
        leaves, spec = pytree.tree_flatten(leaf)
        assert [t.data_ptr() for t in leaves] == [t.data_ptr() for t in leaf.tensors()]
        rebuilt = pytree.tree_unflatten(leaves, spec)
        assert type(rebuilt) is type(leaf) and rebuilt.shape == leaf.shape
        assert torch.equal(rebuilt.dequantize(), leaf.dequantize())


# ------------------------------------------------------------------------------------------
# The weight-leaf protocols, and with_adapters
# ------------------------------------------------------------------------------------------


def test_adapted_leaves_implement_the_protocols(params):
    attached = fnlm.lora.attach(params, adapters(params))
    assert isinstance(attached["layers"][0]["attn"]["q"], LinearLeaf)
    assert isinstance(attached["embed"], EmbeddingLeaf)
    assert isinstance(SavedEmbedding(params["embed"]), EmbeddingLeaf)
    for cls, protocol in ((LoraLinear, LinearLeaf), (LoraExperts, ExpertsLeaf)):
        assert issubclass(cls, protocol) and issubclass(cls, MergeableLeaf)
    w = params["layers"][0]["attn"]["q"]
    for plain in (w, quant.quantize(w, "int8", compute_dtype=torch.float32)):
        assert not isinstance(plain, LinearLeaf | EmbeddingLeaf | MergeableLeaf)


def test_a_leaf_of_no_known_kind_is_named():
    x = torch.ones(2, 4)
    with pytest.raises(ArgumentError, match=r"type list is neither a tensor.*LinearLeaf"):
        decoder.linear(x, [[1.0] * 4])
    with pytest.raises(ArgumentError, match=r"type dict .*EmbeddingLeaf"):
        decoder.embedding(torch.tensor([[0]]), {"a": 1})


def test_with_adapters_is_the_one_attach(params):
    """None leaves params as they are; fnlm.forward / fnlm.loss with lora= equal the decoder on
    with_adapters' tree; the decoder's protocol dispatch traces whole under torch.compile."""
    lora = adapters(params)
    assert fnlm.lora.with_adapters(params, None) is params
    tokens = torch.randint(
        0, LLAMA["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(1)
    )
    attached = fnlm.lora.with_adapters(params, lora)
    with torch.no_grad():
        ours = fnlm.forward(params, tokens, lora=lora)
        assert torch.equal(ours, decoder.forward(attached, tokens))
        assert not torch.equal(ours, fnlm.forward(params, tokens))
        compiled = torch.compile(decoder.forward, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(attached, tokens), ours)
        batch = {"tokens": tokens}
        assert torch.equal(fnlm.loss(params, batch, lora=lora), fnlm.loss(attached, batch))


def test_without_autograd_the_adapter_copies_are_kept_and_refreshed(params):
    """A 16-bit base with fp32 adapters: under autograd each attach makes differentiable
    compute-dtype copies of A and B (once per forward, not per recomputed layer); without it
    (generation) every attach hands out the same kept copies, refreshed in place from the trained
    tensors (so a kept decode graph, found again by its tensors' ids, reads the current values),
    with no autograd node; the forward is the same either way."""
    half = tree_cast(params, torch.bfloat16)
    lora = fnlm.lora.init(half, r=4, alpha=4, targets=("q", "v", "down"), dropout=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in fnlm.lora.parameters(lora):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    first = fnlm.lora.parameters(lora)[0]
    assert first.dtype == torch.float32 and first.requires_grad

    def linears(tree):
        return [leaf for leaf in pytree.tree_leaves(tree, is_leaf=lambda x: isinstance(x, LoraLinear))
                if isinstance(leaf, LoraLinear)]  # fmt: skip

    with_grad = linears(fnlm.lora.with_adapters(half, lora))
    assert with_grad and all(leaf.a.dtype == torch.bfloat16 and leaf.a.grad_fn is not None
                             for leaf in with_grad)  # fmt: skip
    with torch.no_grad():
        attached = fnlm.lora.with_adapters(half, lora)
        again = fnlm.lora.with_adapters(half, lora)
    leaves = linears(attached)
    assert all(leaf.a.dtype == torch.bfloat16 and leaf.a.grad_fn is None for leaf in leaves)
    assert [id(t) for t in pytree.tree_leaves(attached)] == [
        id(t) for t in pytree.tree_leaves(again)
    ]
    tokens = torch.randint(0, LLAMA["vocab_size"], (2, 5), generator=g)
    with torch.no_grad():
        kept = decoder.forward(attached, tokens)
        copied = decoder.forward(with_grad_attached(half, lora), tokens)
    assert torch.equal(kept, copied)
    with torch.no_grad():  # an optimizer step: in place
        for t in fnlm.lora.parameters(lora):
            t.add_(0.05)
        refreshed = fnlm.lora.with_adapters(half, lora)
    assert [id(t) for t in pytree.tree_leaves(refreshed)] == [
        id(t) for t in pytree.tree_leaves(attached)
    ]
    trained = [t.detach().to(torch.bfloat16) for t in fnlm.lora.parameters(lora)]
    assert all(any(torch.equal(leaf.a, t) for t in trained if t.shape == leaf.a.shape)
               for leaf in linears(refreshed))  # fmt: skip
    with torch.no_grad():
        after = decoder.forward(refreshed, tokens)
        expected = decoder.forward(with_grad_attached(half, lora), tokens)
    assert torch.equal(after, expected) and not torch.equal(after, kept)
    # copies first made under inference mode are remade outside it (an inference tensor cannot
    # be updated there), and back
    fresh = fnlm.lora.init(half, r=4, alpha=4, targets=("q",), dropout=0.0, seed=1)
    with torch.inference_mode():
        inside = decoder.forward(fnlm.lora.with_adapters(half, fresh), tokens)
    with torch.no_grad():
        assert torch.equal(decoder.forward(fnlm.lora.with_adapters(half, fresh), tokens), inside)
    with torch.inference_mode():
        assert torch.equal(decoder.forward(fnlm.lora.with_adapters(half, fresh), tokens), inside)


def with_grad_attached(params: Params, lora) -> Params:
    """with_adapters as training calls it (fresh differentiable copies)."""
    with torch.enable_grad():
        return fnlm.lora.with_adapters(params, lora)


def tree_cast(params: Params, dtype: torch.dtype) -> Params:
    return pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        params,
    )


# ------------------------------------------------------------------------------------------
# Layering: models never import lora; families declare their PEFT naming
# ------------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_models_never_import_lora():
    models = Path(fnlm.__file__).parent / "models"
    for path in sorted(models.glob("*.py")):
        found = {n for n in _imports(path) if n == "fnlm.lora" or n.startswith("fnlm.lora.")}
        assert not found, f"{path.name} imports {sorted(found)}"


def test_family_naming_is_read_from_the_family():
    assert family_naming("phi3", "PEFT_LAYER_ORDER", LAYER_ORDER) is phi3.PEFT_LAYER_ORDER
    assert family_naming("llama", "PEFT_LAYER_ORDER", LAYER_ORDER) is LAYER_ORDER
    assert family_naming("mixtral", "PEFT_EXPERT_NAMES") == {"w1": "gate", "w3": "up", "w2": "down"}
    assert family_naming("qwen2_moe", "PEFT_EXPERT_NAMES") is None
    assert family_naming("qwen2_moe", "LEGACY_EXPERTS")[0] == "mlp"
