"""The params pytree: nested dicts and lists of tensors (or quantized leaves) plus the static config.

`Params` is a dict with a `config` attribute, registered with `torch.utils._pytree` so that
`tree_map(f, params)` maps only the tensors and keeps the config as static context:

    params["embed"]                         [vocab, hidden]
    params["layers"][i]["attn"]["q"]        [heads * head_dim, hidden]
    params["layers"][i]["mlp"]["down"]      [hidden, intermediate]
    params["norm"], params["lm_head"]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from fnlm.config import ModelConfig


class Params(dict):
    """Model weights as a nested dict, with the `ModelConfig` that gives them meaning."""

    def __init__(self, tree: dict, config: ModelConfig):
        super().__init__(tree)
        self.config = config

    def __repr__(self) -> str:
        n = sum(leaf.numel() for leaf in pytree.tree_leaves(self) if isinstance(leaf, torch.Tensor))
        return f"Params({self.config.model_type}, {self.config.num_layers} layers, {n:,} tensor elements)"


def _flatten(p: Params) -> tuple[list[Any], Any]:
    keys = tuple(p.keys())
    return [p[k] for k in keys], (keys, p.config)


def _unflatten(values: list[Any], context: Any) -> Params:
    keys, config = context
    return Params(dict(zip(keys, values, strict=True)), config)


def _flatten_with_keys(p: Params):
    values, context = _flatten(p)
    return [(pytree.MappingKey(k), v) for k, v in zip(context[0], values, strict=True)], context


pytree.register_pytree_node(
    Params,
    _flatten,
    _unflatten,
    serialized_type_name="fnlm.params.Params",
    flatten_with_keys_fn=_flatten_with_keys,
)


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
