"""`fnlm.loss`: next-token cross-entropy through the fused linear + CE kernel (no full logits)."""

from __future__ import annotations

import torch

from fnlm import kernels, quant
from fnlm.errors import ArgumentError
from fnlm.lora import Lora, with_adapters
from fnlm.models.decoder import check_tokens, hidden_states
from fnlm.params import MergeableLeaf, Params, expect_leaf

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the tokens (transformers' convention) -> the target of each position."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def loss(
    params: Params,
    batch: dict,
    *,
    lora: Lora | None = None,
    reduction: str = "mean",
    layer_fn=None,
) -> torch.Tensor:
    """Mean (or summed) next-token cross-entropy of `batch` under the model.

    batch: {"tokens": [b, s] int, "labels": [b, s] (aligned with tokens as in transformers: the
    loss predicts labels[:, t+1] from position t; -100 is ignored; default: the tokens themselves,
    with padding ignored), optional "positions", "attention_mask", "segments" as in `fnlm.forward`}.
    reduction: "mean" over predicted tokens, or "sum" (divide by an external token count when
    accumulating gradients over micro-batches).
    lora: adapters applied unmerged (`fnlm.lora.with_adapters`); `fnlm.lora.train_mode` for dropout.
    """
    if "tokens" not in batch:
        raise ArgumentError(f"batch needs a 'tokens' entry; got keys {sorted(batch)}")
    tokens = batch["tokens"]
    check_tokens(params.config, tokens)
    labels = batch.get("labels")
    if labels is None:
        labels = (
            tokens.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            if "attention_mask" in batch
            else tokens
        )
    if labels.shape != tokens.shape:
        raise ArgumentError(
            f"labels shape {tuple(labels.shape)} differs from tokens shape {tuple(tokens.shape)}"
        )
    params = with_adapters(params, lora)
    extra = {"layer_fn": layer_fn} if layer_fn is not None else {}
    x = hidden_states(
        params,
        tokens,
        positions=batch.get("positions"),
        attention_mask=batch.get("attention_mask"),
        segments=batch.get("segments"),
        **extra,
    )
    targets = shift_labels(labels.long()).reshape(-1)
    return lm_head_loss(params, x.reshape(-1, x.shape[-1]), targets, reduction=reduction)


def lm_head_loss(
    params: Params, x: torch.Tensor, targets: torch.Tensor, *, reduction: str
) -> torch.Tensor:
    """CE of hidden rows x [n, hidden] against targets [n] through the lm head, never materializing logits."""
    head = params["lm_head"]
    if isinstance(head, torch.Tensor) or quant.is_quantized(head):
        weight = quant.dequantize(head)
    else:
        weight = expect_leaf(head, MergeableLeaf).merged_weight()
    config = params.config
    return kernels.fused_linear_cross_entropy(
        x,
        weight,
        targets,
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
        softcap=config.final_softcap,
        logit_scale=config.logit_scale,
    )
