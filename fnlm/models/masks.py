"""Attention over packed rows without a dense mask: flex_attention with a block mask.

A packed row holds several documents back to back; each token attends causally inside its own
document (and inside a sliding window where the layer has one). A dense [batch, 1, seq, seq]
boolean mask costs seq² memory and keeps SDPA off its fused kernels; a `BlockMask` stores the
structure per 128 x 128 block, skips blocks with nothing to attend and runs the rest in one
fused kernel (compiled with the layer), with Gemma 2's score soft-capping as a score_mod.
Eager (uncompiled) flex_attention is torch's reference implementation, so the CPU suite checks
the same masks against the dense path.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import (
    BlockMask,
    create_block_mask,
    create_mask,
    flex_attention,
)


def document_mask(segments: torch.Tensor, window: int | None) -> BlockMask:
    """The block mask of packed rows: segments [batch, seq] numbers the documents of each row
    (padding is one more document); a query sees keys of its own document at or before it, and
    within `window` tokens when given (token index, as `decoder.build_mask`)."""

    def same_document(b, h, q, kv):
        allowed = (segments[b, q] == segments[b, kv]) & (kv <= q)
        if window is not None:
            allowed = allowed & (q - kv < window)
        return allowed

    batch, seq = segments.shape
    # compiled on CUDA: evaluated block by block, never as the [batch, seq, seq] mask (eager
    # create_block_mask materializes it: 18 GiB at 49,152 tokens)
    return create_block_mask(
        same_document, batch, None, seq, seq, device=segments.device, _compile=segments.is_cuda
    )


def dense(mask: BlockMask) -> torch.Tensor:
    """The boolean [batch, 1, q_len, k_len] mask a block mask stands for (for paths flex_attention
    cannot take, e.g. attention sinks)."""
    q_len, k_len = mask.seq_lengths
    batch = mask.kv_num_blocks.shape[0]
    return create_mask(mask.mask_mod, batch, 1, q_len, k_len, device=mask.kv_num_blocks.device)


def flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    *,
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Attention of q [batch, heads, q_len, d] over k, v [batch, kv_heads, k_len, d] under a block
    mask; `softcap` caps the scaled scores as cap * tanh(score / cap) before the softmax (Gemma 2,
    as transformers)."""
    score_mod = None
    if softcap is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap

    return flex_attention(
        q, k, v, score_mod=score_mod, block_mask=mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # fmt: skip
