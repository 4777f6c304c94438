"""Fused linear + cross-entropy: loss of (hidden @ weight.T) without ever building [tokens, vocab].

The tokens are processed in chunks. For each chunk a torch matmul makes the chunk's logits; a
Triton kernel (or the same computation in torch, off CUDA) turns each row, in place, into its loss
and the gradient of the loss w.r.t. those logits (scale and soft-cap included); two more matmuls
turn that into the chunk's grad_hidden and its share of grad_weight. The gradients are therefore
made during the forward (as Liger-Kernel and cut-cross-entropy do) and the backward only scales
them by the incoming gradient. Extra memory: one chunk of logits (256 MB; 512 MB when the lm_head
is trainable) plus the gradients.
"""

import torch
import triton
import triton.language as tl

from fnlm.errors import ArgumentError
from fnlm.kernels.glu import accurate_tanh

# The chunk's logits take at most this many bytes (in the logits' dtype): small next to a
# [16384, 128256] bf16 logits tensor (4 GiB) yet large enough that the matmuls stay efficient.
CHUNK_LOGITS_BYTES = 256 * 2**20

# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _transformed_logits(z, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """(final logits, tanh of the cap) for raw logits z."""
    z = z * logit_scale
    if HAS_SOFTCAP:
        t = accurate_tanh(z / softcap)
        return softcap * t, t
    return z, z


@triton.jit
def _cross_entropy_rows_kernel(
    LOGITS, LABELS, LOSS, GRAD_SCALE, stride_logits, n_cols, ignore_index, logit_scale, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per row: an online logsumexp pass, then (for the gradient) a second pass that
    # overwrites the row with d loss / d raw logits = (softmax - onehot) * d(cap)/dz * scale * g.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_logits
    label = tl.load(LABELS + row)
    cols = tl.arange(0, BLOCK)
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK):
                tl.store(
                    row_ptr + start + cols,
                    tl.zeros([BLOCK], LOGITS.dtype.element_ty),
                    mask=start + cols < n_cols,
                )
    else:
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            z = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            z, _ = _transformed_logits(z, logit_scale, softcap, HAS_SOFTCAP)
            z = tl.where(mask, z, -float("inf"))
            new_max = tl.maximum(running_max, tl.max(z, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
                tl.exp(z - new_max), axis=0
            )
            running_max = new_max
        z_label = tl.load(row_ptr + label).to(tl.float32)
        z_label, _ = _transformed_logits(z_label, logit_scale, softcap, HAS_SOFTCAP)
        # log(sum) - (z_label - max) as log_softmax does: no rounding at the magnitude of max
        tl.store(LOSS + row, tl.log(running_sum) - (z_label - running_max))
        if COMPUTE_GRAD:
            g = tl.load(GRAD_SCALE)
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                z = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                z, t = _transformed_logits(z, logit_scale, softcap, HAS_SOFTCAP)
                dz = tl.exp(z - running_max) / running_sum - tl.where(
                    start + cols == label, 1.0, 0.0
                )
                if HAS_SOFTCAP:
                    dz = dz * (1.0 - t * t)
                dz = dz * (logit_scale * g)
                tl.store(row_ptr + start + cols, dz.to(LOGITS.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers: the per-chunk row kernel (Triton or torch) and the chunked loop around it
# ----------------------------------------------------------------------------------------------


def cross_entropy_rows_triton(
    logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, grad_scale: torch.Tensor,
    ignore_index: int, logit_scale: float, softcap: float | None, compute_grad: bool,
) -> None:  # fmt: skip
    """Write each row's loss into `loss` and, if compute_grad, overwrite `logits` [rows, vocab]
    with d(grad_scale * loss)/d(raw logits). grad_scale is a 1-element fp32 tensor."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block = min(4096, triton.next_power_of_2(n_cols))
    _cross_entropy_rows_kernel[(n_rows,)](
        logits, labels, loss, grad_scale, logits.stride(0), n_cols, ignore_index, logit_scale,
        1.0 if softcap is None else softcap,
        HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip


def cross_entropy_rows_torch(
    logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, grad_scale: torch.Tensor,
    ignore_index: int, logit_scale: float, softcap: float | None, compute_grad: bool,
) -> None:  # fmt: skip
    """The same computation as the Triton row kernel, in torch (fp32), for CPU."""
    z = logits.float() * logit_scale
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0)[:, None]
    log_p = torch.log_softmax(z, dim=-1)
    loss.copy_(torch.where(valid, -log_p.gather(1, safe_labels)[:, 0], 0.0))
    if compute_grad:
        dz = log_p.exp_()
        dz.scatter_add_(1, safe_labels, torch.full_like(safe_labels, -1.0, dtype=dz.dtype))
        dz.mul_((valid * (grad_scale * logit_scale))[:, None])
        if softcap is not None:
            dz.mul_(1.0 - t * t)
        logits.copy_(dz)


def _chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    rows = CHUNK_LOGITS_BYTES // max(1, vocab * dtype.itemsize)
    return max(1, rows // 64 * 64 if rows >= 64 else rows)


def fused_linear_cross_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    ignore_index: int, reduction: str, softcap: float | None, logit_scale: float,
    grad_hidden_needed: bool, grad_weight_needed: bool, grad_bias_needed: bool, use_triton: bool,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The chunked loop. Returns (loss fp32 scalar, grad_hidden, grad_weight, grad_bias) where
    each gradient is d loss / d input (an empty tensor where not needed).

    chunk_rows: tokens per chunk, 0 = from CHUNK_LOGITS_BYTES (tests pass small values).
    """
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    # One host sync per loss call (an out-of-range label would read out of bounds); none inside
    # a CUDA graph capture, where fnlm.train.graphs checks the labels before each replay.
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if not capturing and bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ArgumentError(
            f"fused_linear_cross_entropy: labels[{row}] = {int(labels[row])} is outside the vocabulary "
            f"[0, {vocab}) and is not ignore_index ({ignore_index})"
        )
    if reduction == "mean":
        # 1 / (number of non-ignored tokens); all ignored gives loss 0 and zero gradients
        grad_scale = 1.0 / valid.sum().clamp(min=1).to(torch.float32).reshape(1)
    else:
        grad_scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
    compute_grad = grad_hidden_needed or grad_weight_needed or grad_bias_needed
    loss_rows = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else hidden.new_empty(0)
    # grad_weight accumulates over chunks in the weight's dtype (as Liger-Kernel does): an fp32
    # accumulator would add 4 bytes per weight element (2 GiB at vocab 128256 x 4096)
    grad_weight = torch.zeros_like(weight) if grad_weight_needed else weight.new_empty(0)
    grad_bias = (
        torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if grad_bias_needed else None
    )
    rows_kernel = cross_entropy_rows_triton if use_triton else cross_entropy_rows_torch
    chunk = chunk_rows or _chunk_rows(vocab, torch.promote_types(hidden.dtype, weight.dtype))
    if grad_weight_needed and not chunk_rows:
        # each chunk re-reads and re-writes all of grad_weight (its addmm_): with a trainable
        # lm_head, twice the rows per chunk halve that traffic (~5 ms at 128256 x 4096 bf16)
        chunk *= 2
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        h = hidden[start:end]
        logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        rows_kernel(logits, labels[start:end], loss_rows[start:end], grad_scale,
                    ignore_index, logit_scale, softcap, compute_grad)  # fmt: skip
        dlogits = logits  # overwritten in place by the row kernel
        if grad_hidden_needed:
            torch.mm(dlogits, weight, out=grad_hidden[start:end])
        if grad_weight_needed:
            grad_weight.addmm_(dlogits.T, h)
        if grad_bias_needed:
            grad_bias += dlogits.sum(0, dtype=torch.float32)
        del logits, dlogits  # free this chunk before the next one is allocated
    loss = loss_rows.sum() * grad_scale[0]
    grad_bias = grad_bias.to(bias.dtype) if grad_bias_needed else hidden.new_empty(0)
    return loss, grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------------------------
# Custom op: the forward returns the gradients too; the backward scales them
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fnlm::fused_linear_cross_entropy", mutates_args=())
def fused_linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    ignore_index: int, reduction: str, softcap: float | None, logit_scale: float,
    grad_hidden_needed: bool, grad_weight_needed: bool, grad_bias_needed: bool, use_triton: bool,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(loss, grad_hidden, grad_weight, grad_bias); call through
    `fnlm.kernels.fused_linear_cross_entropy`."""
    return fused_linear_cross_entropy_fwd(
        hidden, weight, bias, labels, ignore_index, reduction, softcap, logit_scale,
        grad_hidden_needed, grad_weight_needed, grad_bias_needed, use_triton, chunk_rows,
    )  # fmt: skip


@fused_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, softcap, logit_scale,
      grad_hidden_needed, grad_weight_needed, grad_bias_needed, use_triton, chunk_rows):  # fmt: skip
    return (
        hidden.new_empty((), dtype=torch.float32),
        torch.empty_like(hidden) if grad_hidden_needed else hidden.new_empty(0),
        torch.empty_like(weight) if grad_weight_needed else weight.new_empty(0),
        torch.empty_like(bias) if grad_bias_needed else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.needed = inputs[8:11]
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias)


def _backward(ctx, grad_loss, *_):
    grads = []
    for grad, needed in zip(ctx.saved_tensors, ctx.needed):
        grads.append(grad * grad_loss.to(grad.dtype) if needed else None)
    grad_hidden, grad_weight, grad_bias = grads
    return (
        grad_hidden,
        grad_weight,
        grad_bias,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


fused_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def cross_entropy_from_logits_reference(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
    softcap: float | None = None, logit_scale: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """Scale, soft-cap and cross-entropy of raw logits, in their dtype; a mean over zero
    non-ignored tokens is 0 (F.cross_entropy would give nan)."""
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    total = torch.nn.functional.cross_entropy(
        logits, labels, ignore_index=ignore_index, reduction="sum"
    )
    if reduction == "mean":
        return total / (labels != ignore_index).sum().clamp(min=1)
    return total


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean", softcap: float | None = None, logit_scale: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """Builds the full fp32 logits (memory [tokens, vocab]): the oracle for the tests only."""
    compute = torch.promote_types(hidden.dtype, torch.float32)  # fp64 stays fp64 (the tests' truth)
    logits = hidden.to(compute) @ weight.to(compute).T
    if bias is not None:
        logits = logits + bias.to(compute)
    return cross_entropy_from_logits_reference(
        logits, labels, ignore_index, reduction, softcap, logit_scale
    )
