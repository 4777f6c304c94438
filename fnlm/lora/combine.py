"""Adapters and params combined: `attach` (unmerged, for forward / loss / generate) and
`merge` (folded into plain weights). `with_adapters` is the one call the entry points make."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fnlm import quant
from fnlm.config import ModelConfig
from fnlm.errors import LoraError
from fnlm.lora.leaves import LoraEmbedding, LoraExperts, LoraLinear, SavedEmbedding
from fnlm.lora.targets import Module, modules_by_path
from fnlm.lora.tree import Lora, entries, is_adapter
from fnlm.params import MergeableLeaf, Params, get_path, path_name


def _replace_paths(params: Params, values: dict[tuple, Any], config: ModelConfig) -> Params:
    """A shallow copy of params with the leaves at `values`' paths replaced (nothing else copied)."""

    def copy(node, path):
        children = {p[len(path)] for p in values if len(p) > len(path) and p[: len(path)] == path}
        if not children:
            return values.get(path, node)
        new = list(node) if isinstance(node, list | tuple) else dict(node)
        for key in children:
            new[key] = copy(node[key], (*path, key))
        return new

    return Params(copy(dict(params), ()), config)


def _base_leaf(params: Params, path: tuple):
    try:
        return get_path(params, path)
    except (KeyError, IndexError, TypeError):
        raise LoraError(
            f"the adapter has an entry at {path_name(path)}, which this {params.config.model_type} "
            f"model ({params.config.num_layers} layers) does not have; was it made for another base model?"
        ) from None


def _check_adapter(path: tuple, node: dict, base, module: Module | None) -> None:
    a, b = node["a"], node["b"]
    shape = tuple(base.shape)
    if module is not None and module.embedding:
        want_a, want_b = (a.shape[0], shape[0]), (shape[1], a.shape[0])
    else:
        want_a, want_b = (a.shape[0], shape[1]), (shape[0], a.shape[0])
    if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise LoraError(
            f"adapter {path_name(path)}: a {tuple(a.shape)} and b {tuple(b.shape)} do not fit the base "
            f"weight of shape {shape} (expected a (r, {want_a[1]}) and b ({want_b[0]}, r))"
        )


def _check_expert_adapter(path: tuple, node: dict, base, module: Module) -> None:
    a, b = node["a"], node["b"]
    experts, out_features, in_features = module.shape
    stored = (experts * out_features, in_features) if quant.is_quantized(base) else module.shape
    if tuple(base.shape) != tuple(stored):
        raise LoraError(
            f"adapter {path_name(path)}: the base expert stack has shape {tuple(base.shape)}, "
            f"expected {tuple(stored)} for this model's config"
        )
    rank = a.shape[1] if a.dim() == 3 else None
    want_a, want_b = (experts, rank, in_features), (experts, out_features, rank)
    if a.dim() != 3 or b.dim() != 3 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise LoraError(
            f"adapter {path_name(path)}: a {tuple(a.shape)} and b {tuple(b.shape)} do not fit the "
            f"expert stack [{experts}, {out_features}, {in_features}] (expected a ({experts}, r, "
            f"{in_features}) and b ({experts}, {out_features}, r))"
        )


def attach(params: Params, lora: Lora, *, training: bool | None = None) -> Params:
    """Params whose adapted leaves are `LoraLinear` / `LoraEmbedding` / `LoraExperts` and whose
    saved modules and trainable biases are the lora's tensors. Cheap: nothing is copied but the
    containers on the way to a replaced leaf. `fnlm.forward` / `fnlm.loss` call it when given `lora=`.

    training: dropout on the adapter inputs; default `lora.training` (see `train_mode`).
    Raises LoraError when an entry has no counterpart in params or its shapes do not fit.
    """
    training = lora.training if training is None else training
    config = params.config
    modules = modules_by_path(config)
    values: dict[tuple, Any] = {}
    for path, node in entries(lora):
        base = _base_leaf(params, path)
        module = modules.get(path)
        if not is_adapter(node):
            if tuple(node.shape) != tuple(base.shape):
                raise LoraError(
                    f"adapter entry {path_name(path)} has shape {tuple(node.shape)} but the base "
                    f"tensor has shape {tuple(base.shape)}"
                )
            embed = module is not None and module.embedding
            values[path] = SavedEmbedding(node, _padding_idx(config)) if embed else node
            continue
        names = module.names if module is not None else (path_name(path),)
        if module is not None and module.experts:
            _check_expert_adapter(path, node, base, module)
            scale = lora.config.scale(node["a"].shape[1], names)
            a, b = _compute_copies(node["a"], node["b"], base.dtype)
            values[path] = LoraExperts(base, a, b, scale)
            continue
        _check_adapter(path, node, base, module)
        scale = lora.config.scale(node["a"].shape[0], names)
        if module is not None and module.embedding:
            values[path] = LoraEmbedding(base, node["a"], node["b"], scale, _padding_idx(config))
        else:
            a, b = _compute_copies(node["a"], node["b"], base.dtype)
            values[path] = LoraLinear(base, a, b, scale, lora.config.dropout, training)
    return _replace_paths(params, values, config)


def _compute_copies(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
    """A and B in a 16-bit base's compute dtype (differentiable casts, made once per forward
    rather than in every recomputed layer): the adapter branch runs in the input's dtype anyway
    (fnlm.lora.linear), as under mixed-precision autocast; fp32 bases keep them as is. Without
    autograd (generation) the copies are `_kept_copy`s."""
    if dtype not in (torch.bfloat16, torch.float16) or a.dtype == dtype:
        return a, b
    if torch.is_grad_enabled():
        return a.to(dtype), b.to(dtype)
    return _kept_copy(a, dtype), _kept_copy(b, dtype)


# trained tensor -> its compute-dtype copy for attaches without autograd (dropped with the tensor)
_kept_copies = WeakIdKeyDictionary()


def _kept_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One copy of `t` in `dtype`, kept and refreshed in place from `t` on every attach: a decode
    graph kept by fnlm.generate (found again by its tensors' ids) reads the adapters' current
    values, and its step casts nothing. Fresh copies per call missed that graph cache on every
    GRPO rollout; casting inside the step cost two kernels per adapted linear per token."""
    copy = _kept_copies.get(t)
    if (
        copy is None or copy.dtype != dtype or copy.shape != t.shape or copy.device != t.device
        # an inference-mode tensor cannot be updated outside inference mode (nor used in autograd)
        or copy.is_inference() != torch.is_inference_mode_enabled()
    ):  # fmt: skip
        copy = _kept_copies[t] = t.detach().to(dtype)
    else:
        copy.copy_(t)
    return copy


def _padding_idx(config: ModelConfig) -> int | None:
    pad = config.pad_token_id
    return pad if pad is not None and 0 <= pad < config.vocab_size else None


def merge(params: Params, lora: Lora) -> Params:
    """Plain params with the adapters folded in: W + scale·B·A summed in fp32 (quantized bases
    dequantized first), cast to the base's compute dtype; saved modules and biases copied in.
    The result needs no lora and holds no tensor that requires grad.

    With tied embeddings, adapting embed or lm_head unties them (the other keeps the base
    weight, as the unmerged model computes), and the config says tie_word_embeddings=False.
    """
    attached = attach(params, lora, training=False)
    values = {}
    with torch.no_grad():
        for path, _ in entries(lora):
            leaf = get_path(attached, path)
            merged = leaf.merged_weight() if isinstance(leaf, MergeableLeaf) else leaf
            values[path] = merged.detach().clone()
    config = params.config
    touched = {("embed",), ("lm_head",)} & set(values)
    if config.tie_word_embeddings and touched:
        config = config.replace(tie_word_embeddings=False)
    return _replace_paths(params, values, config)


def with_adapters(params: Params, lora: Lora | None) -> Params:
    """The params that forward, loss and generate run: `attach(params, lora)` (dropout as
    `lora.training` says), or `params` itself when `lora` is None."""
    return params if lora is None else attach(params, lora)
