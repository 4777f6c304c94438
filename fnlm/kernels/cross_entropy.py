"""Fused linear + cross-entropy: plain-torch reference (chunked kernels follow)."""

import torch
import torch.nn.functional as F


def fused_linear_cross_entropy_reference(
    hidden,
    weight,
    labels,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    softcap=None,
    logit_scale=1.0,
):
    """Builds the full fp32 logits; the oracle for tests only."""
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
