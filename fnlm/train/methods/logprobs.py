"""Log-probabilities of the labelled tokens under the model, without the [tokens, vocab] logits.

`sequence_logprobs` (DPO, ORPO) sums them per row through the fused linear + cross-entropy
kernel, one call per row, so the lm head runs in chunks as in `fnlm.loss`. `token_logprobs`
(GRPO's per-token ratios) keeps one value per token: the positions go through the lm head in
chunks, each chunk's log-softmax recomputed in the backward (activation checkpointing), so at
most one chunk of logits exists at a time. Both keep fixed shapes (no boolean indexing, no host
sync), so a training step over them can be captured as a CUDA graph.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from fnlm import kernels, quant
from fnlm.lora import with_adapters
from fnlm.loss import IGNORE_INDEX, shift_labels
from fnlm.models.decoder import hidden_states
from fnlm.params import Params

# A chunk's fp32 logits take at most this many bytes (as fnlm.kernels.cross_entropy's chunks).
CHUNK_LOGITS_BYTES = 256 * 2**20


def head_weight(params: Params) -> torch.Tensor:
    """The lm head as a dense weight [vocab, hidden] (dequantized NF4, or merged LoRA/trained)."""
    head = params["lm_head"]
    return head.merged_weight() if hasattr(head, "merged_weight") else quant.dequantize(head)


def final_hidden(params: Params, batch: dict, *, lora=None, layer_fn=None):
    """(hidden [b, s, h], targets [b, s]): the final-normed hidden states of the batch's tokens
    and, at position t, the label of token t + 1 (-100 where nothing is scored)."""
    params = with_adapters(params, lora)
    extra = {"layer_fn": layer_fn} if layer_fn is not None else {}
    x = hidden_states(
        params, batch["tokens"], positions=batch.get("positions"),
        attention_mask=batch.get("attention_mask"), segments=batch.get("segments"), **extra,
    )  # fmt: skip
    return params, x, shift_labels(batch["labels"].long())


def sequence_logprobs(
    params: Params, batch: dict, *, lora=None, layer_fn=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs [b], scored tokens [b]) of each row's labelled tokens (labels aligned
    with the tokens as in `fnlm.loss`; -100 is not scored). Differentiable."""
    params, x, targets = final_hidden(params, batch, lora=lora, layer_fn=layer_fn)
    weight = head_weight(params)
    config = params.config
    rows = [
        -kernels.fused_linear_cross_entropy(
            x[i],
            weight.to(x.dtype),
            targets[i],
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            softcap=config.final_softcap,
            logit_scale=config.logit_scale,
        )  # fmt: skip
        for i in range(x.shape[0])
    ]
    return torch.stack(rows), (targets != IGNORE_INDEX).sum(1)


def _chunk_logprobs(h, weight, labels, scale: float, softcap: float | None, temperature: float):
    logits = (h @ weight.T).float() * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(1, labels[:, None])[:, 0]


def token_logprobs(
    params: Params, batch: dict, *, lora=None, layer_fn=None, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs [b, s] fp32: at position t, log p(token t + 1) under softmax(logits / temperature)
    where labels[t + 1] is not -100, else 0. Differentiable; the lm head runs over every position
    (fixed shapes, no host sync: the step can be a CUDA graph) in chunks recomputed in the
    backward, and the unscored positions are masked out."""
    params, x, targets = final_hidden(params, batch, lora=lora, layer_fn=layer_fn)
    weight = head_weight(params).to(x.dtype)
    config = params.config
    scored = targets != IGNORE_INDEX
    h, labels = x.reshape(-1, x.shape[-1]), targets.clamp(min=0).reshape(-1)
    chunk = max(1, CHUNK_LOGITS_BYTES // (4 * weight.shape[0]))
    pieces = []
    for start in range(0, h.shape[0], chunk):
        args = (h[start : start + chunk], weight, labels[start : start + chunk],
                float(config.logit_scale), config.final_softcap, float(temperature))  # fmt: skip
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            # no RNG in a chunk: no RNG state read (which a CUDA graph capture refuses)
            pieces.append(
                checkpoint(_chunk_logprobs, *args, use_reentrant=False, preserve_rng_state=False)
            )
        else:
            pieces.append(_chunk_logprobs(*args))
    values = torch.cat(pieces).view(scored.shape)
    return torch.where(scored, values, 0.0)
