"""The params pytree: nested dicts and lists of tensors (or quantized leaves) plus the static config.

`Params` is a dict with a `config` attribute, registered with `torch.utils._pytree` (through
`register_pytree`, the one registration helper) so that `tree_map(f, params)` maps only the
tensors and keeps the config as static context:

    params["embed"]                         [vocab, hidden]
    params["layers"][i]["attn"]["q"]        [heads * head_dim, hidden]
    params["layers"][i]["mlp"]["down"]      [hidden, intermediate]
    params["norm"], params["lm_head"]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
import torch.utils._pytree as pytree

from fnlm.config import ModelConfig
from fnlm.errors import ArgumentError

L = TypeVar("L")


# ---------------------------------------------------------------------------------------------
# Pytree registration: children and static context declared once, on the type
# ---------------------------------------------------------------------------------------------


def static_field(default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A dataclass field kept as pytree context, not a child (equinox's `field(static=True)`):
    `scale: float = static_field()`. Tree maps leave it alone; it is part of the tree's structure
    (compared, hashed). The other fields are children."""
    return dataclasses.field(default=default, metadata={"static": True}, **kwargs)


def register_pytree(cls: type | None = None, *, children: tuple = (), static: tuple = ()):
    """Register `cls` with torch's pytree (`torch.utils._pytree`); usable as a class decorator.

    - a dataclass: fields marked `static_field()` are context, the others children;
    - a dict subclass (`Params`, `Lora`): the items are children, the attributes named in
      `static` context; rebuilt as `cls(dict_of_items, **static)`;
    - any other class: `children` and `static` name its attributes; rebuilt as
      `cls(**children, **static)`, so its constructor takes them by those names.
    A None child is no leaf (left out, and given back as None). Key paths name the items and
    attributes.
    """
    if cls is None:
        return lambda c: register_pytree(c, children=children, static=static)
    if dataclasses.is_dataclass(cls) and not children:
        fields = [f for f in dataclasses.fields(cls) if f.init]
        children = tuple(f.name for f in fields if not f.metadata.get("static"))
        static = tuple(f.name for f in fields if f.metadata.get("static"))
    names, statics = tuple(children), tuple(static)
    mapping = issubclass(cls, dict)

    def flatten(node):
        context = tuple(getattr(node, s) for s in statics)
        if mapping:
            keys = tuple(node.keys())
            return [node[k] for k in keys], (keys, *context)
        # torch's pytree takes None for a leaf: a None child is left out, its name kept out of
        # the context's first entry (the children present).
        present = tuple(c for c in names if getattr(node, c) is not None)
        return [getattr(node, c) for c in present], (present, *context)

    def unflatten(values, context):
        keys, *context = context
        if mapping:
            return cls(dict(zip(keys, values, strict=True)), **dict(zip(statics, context)))
        absent = dict.fromkeys(c for c in names if c not in keys)
        children = dict(zip(keys, values, strict=True))
        return cls(**children, **absent, **dict(zip(statics, context)))

    def flatten_with_keys(node):
        values, context = flatten(node)
        make_key = pytree.MappingKey if mapping else pytree.GetAttrKey
        return [(make_key(k), v) for k, v in zip(context[0], values, strict=True)], context

    pytree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )
    return cls


@register_pytree(static=("config",))
class Params(dict):
    """Model weights as a nested dict, with the `ModelConfig` that gives them meaning."""

    def __init__(self, tree: dict, config: ModelConfig):
        super().__init__(tree)
        self.config = config

    def __repr__(self) -> str:
        n = sum(leaf.numel() for leaf in pytree.tree_leaves(self) if isinstance(leaf, torch.Tensor))
        return f"Params({self.config.model_type}, {self.config.num_layers} layers, {n:,} tensor elements)"


# ---------------------------------------------------------------------------------------------
# Weight leaves that compute their own products (the LoRA-adapted leaves of fnlm.lora.leaves)
# ---------------------------------------------------------------------------------------------
# A params leaf is a dense tensor, a quantized weight (fnlm.quant), or one of these. The decoder
# tests for the first two first, then `expect_leaf` (cheap for classes that name the protocol as
# a base: a Protocol isinstance costs tens of microseconds on every call).


@runtime_checkable
class MergeableLeaf(Protocol):
    """A leaf standing for a weight it can compute: `merged_weight()` in the base's compute
    dtype, differentiable in what the leaf trains (read by the fused lm-head loss and `merge`)."""

    def merged_weight(self) -> torch.Tensor: ...


@runtime_checkable
class LinearLeaf(MergeableLeaf, Protocol):
    """A linear weight that computes x @ W.T (+ bias) itself: `leaf.linear(x, bias)`."""

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class EmbeddingLeaf(MergeableLeaf, Protocol):
    """An embedding table that looks rows up itself: `leaf.embedding(tokens)`."""

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ExpertsLeaf(MergeableLeaf, Protocol):
    """An expert stack that multiplies expert-sorted rows itself (`fnlm.models.moe.Route`):
    `leaf.expert_matmul(route, rows)`."""

    def expert_matmul(self, route: Any, rows: torch.Tensor) -> torch.Tensor: ...


def expect_leaf(leaf: Any, protocol: type[L]) -> L:
    """`leaf`, checked to implement `protocol`; ArgumentError naming its type otherwise.

    A class that lists the protocol among its bases (fnlm.lora's leaves do) passes by a lookup
    in its MRO (0.1 us); only other classes pay for the structural isinstance, which on Python
    3.11 costs tens of microseconds: milliseconds per forward over a few hundred adapted leaves.
    """
    if protocol not in type(leaf).__mro__ and not isinstance(leaf, protocol):
        raise ArgumentError(
            f"a params leaf of type {type(leaf).__name__} is neither a tensor, a quantized weight "
            f"(fnlm.quant) nor a {protocol.__name__} (fnlm.params)"
        )
    return leaf


def tree_map(fn, tree):
    """Map `fn` over the tensor leaves of a pytree (other leaves, e.g. None, pass through)."""
    return pytree.tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, tree)


def get_path(tree: Any, path: tuple) -> Any:
    """`get_path(params, ("layers", 3, "attn", "q"))` -> that leaf; KeyError/IndexError if absent."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple, value: Any) -> None:
    """Set a leaf in a nested dict/list tree, creating dicts (and list slots) along the way."""
    node = tree
    for key, nxt in zip(path[:-1], path[1:], strict=True):
        if isinstance(node, list):
            while len(node) <= key:
                node.append({})
            node = node[key]
            continue
        if key not in node:
            node[key] = [] if isinstance(nxt, int) else {}
        node = node[key]
    if isinstance(node, list):
        while len(node) <= path[-1]:
            node.append(None)
    node[path[-1]] = value


def leaf_paths(tree: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """All (path, leaf) pairs of a nested dict/list tree, in a stable order."""
    if isinstance(tree, dict):
        out = []
        for k, v in tree.items():
            out.extend(leaf_paths(v, (*prefix, k)))
        return out
    if isinstance(tree, list):
        out = []
        for i, v in enumerate(tree):
            out.extend(leaf_paths(v, (*prefix, i)))
        return out
    return [(prefix, tree)]


def path_name(path: tuple) -> str:
    """("layers", 3, "attn", "q") -> "layers.3.attn.q" (for messages)."""
    return ".".join(str(p) for p in path)
