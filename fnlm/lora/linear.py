"""Fused LoRA linear: y = x @ W.T (+ bias) + scale * (drop(x) @ A.T) @ B.T over a frozen W.

W is a plain tensor or a quantized weight (fnlm.quant); A [r, in], B [out, r] are the adapter.
The forward and backward are one custom op each, so what the backward keeps is exactly: the
adapter input drop(x), the small x_lora @ A.T [tokens, r], and the (already resident) weight
tensors. The dequantized W is recomputed in the backward, never stored, and W gets no gradient.

Arithmetic: the adapter branch runs in the input's dtype, with A and scale * B (tiny; the product
taken in the adapters' dtype, fp32 master copies in training) cast to it; the adapter's output is
written first and the base GEMM accumulates into it. The gradients of A and B come back in
the adapters' own dtype. In fp32 this is PEFT's arithmetic up to the order of the sums (a few
ulps); with a 16-bit input it is what PEFT computes under bf16/fp16 autocast (the HF Trainer's
mixed precision). Casting the input
up to fp32 instead, as PEFT does without autocast, costs fp32 GEMMs and [tokens, out] fp32 sums
on every projection (measured on the H200: a third of a Llama-3.2-1B QLoRA step).
When the adapter input is x itself (no dropout), the backward adds its part of grad_x into the
base matmul's output in place instead of returning a second [tokens, in] gradient to sum.

This file has no Triton kernel of its own: the work is the NF4 dequantize (or GEMV) of
`fnlm.kernels.nf4` and cuBLAS matmuls; fusing the thin r-wide matmuls into the dequantize would
save little, since they move r / out as many bytes as the base matmul.
"""

import torch
import torch.nn.functional as F

from fnlm.errors import ArgumentError
from fnlm.kernels import use_triton
from fnlm.quant import (
    dequantize,
    matmul_weight,
    matmul_weight_into,
    matmul_weight_t_into,
    weight_from_parts,
    weight_parts,
)

# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def lora_linear_fwd(
    x: torch.Tensor,
    x_lora: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    w,
    triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on 2-D inputs [tokens, in]: returns (y [tokens, out] in x's dtype, x_lora @ A.T
    [tokens, r] in x's dtype, kept for the backward)."""
    xa = x_lora @ a.to(x.dtype).t()
    b_scaled = (b * scale).to(x.dtype)
    # the adapter's output first, then the base GEMM accumulates into it (beta=1): one pass over
    # [tokens, out] less than adding the adapter after (H200, 4,096 tokens: 761 vs 854 us at
    # 14336 x 4096; scripts/bench_quant.py --lora)
    y = xa @ b_scaled.t() if bias is None else torch.addmm(bias.to(x.dtype), xa, b_scaled.t())
    return matmul_weight_t_into(y, x, w, triton), xa


def lora_linear_bwd(
    grad: torch.Tensor,
    x_lora: torch.Tensor,
    xa: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    w,
    triton: bool,
    need_x: bool,
    shared: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward on 2-D inputs: (grad_x or an empty tensor, grad_x_lora, grad_a, grad_b). With
    `shared` (x_lora is x) the adapter's input gradient is added into grad_x and grad_x_lora is
    empty."""
    a_c, b_scaled = a.to(grad.dtype), (b * scale).to(grad.dtype)
    grad_b = (grad.t() @ xa).mul_(scale).to(b.dtype)
    grad_xa = grad @ b_scaled  # [tokens, r]
    grad_a = (grad_xa.t() @ x_lora).to(a.dtype)
    if shared and need_x:
        # the thin product first and the base GEMM accumulating into it where that measured
        # faster (out <= in: 768 vs 813 us at 4096 x 14336), after it otherwise (706 vs 730 us at
        # 14336 x 4096); scripts/bench_quant.py --lora, H200
        if w.shape[0] <= w.shape[1]:
            grad_x = matmul_weight_into(grad_xa @ a_c, grad, w, triton)
        else:
            grad_x = matmul_weight(grad, w, triton).addmm_(grad_xa, a_c)
        return grad_x, grad.new_empty(0), grad_a, grad_b
    grad_x_lora = grad_xa @ a_c
    grad_x = matmul_weight(grad, w, triton) if need_x else grad.new_empty(0)
    return grad_x, grad_x_lora, grad_a, grad_b


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fnlm::lora_linear", mutates_args=())
def lora_linear_op(
    x: torch.Tensor,
    x_lora: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    weight: list[torch.Tensor],
    kind: str,
    meta: list[int],
    dtype: torch.dtype,
    triton: bool,
    shared: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x_lora @ A.T) for x, x_lora [..., in]; the weight given by `fnlm.quant.weight_parts`;
    `shared`: x_lora is x (no dropout). Call through `lora_linear`."""
    w = weight_from_parts(kind, weight, meta, dtype)
    y, xa = lora_linear_fwd(
        x.reshape(-1, x.shape[-1]), x_lora.reshape(-1, x.shape[-1]), a, b, scale, bias, w, triton
    )
    return y.view(*x.shape[:-1], y.shape[-1]), xa


@lora_linear_op.register_fake
def _(x, x_lora, a, b, scale, bias, weight, kind, meta, dtype, triton, shared):
    tokens = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], b.shape[0])), x.new_empty((tokens, a.shape[0]))


@torch.library.custom_op("fnlm::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    grad: torch.Tensor,
    x_lora: torch.Tensor,
    xa: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    weight: list[torch.Tensor],
    kind: str,
    meta: list[int],
    dtype: torch.dtype,
    triton: bool,
    need_x: bool,
    shared: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x or empty, grad_x_lora or empty (shared), grad_a, grad_b) for grad [..., out]."""
    w = weight_from_parts(kind, weight, meta, dtype)
    grad_x, grad_x_lora, grad_a, grad_b = lora_linear_bwd(
        grad.reshape(-1, grad.shape[-1]),
        x_lora.reshape(-1, x_lora.shape[-1]),
        xa,
        a,
        b,
        scale,
        w,
        triton,
        need_x,
        shared,
    )
    lead = grad.shape[:-1]
    grad_x = grad_x.view(*lead, grad_x.shape[-1]) if need_x else grad_x
    if grad_x_lora.numel():
        grad_x_lora = grad_x_lora.view(*lead, grad_x_lora.shape[-1])
    return grad_x, grad_x_lora, grad_a, grad_b


@lora_linear_backward_op.register_fake
def _(grad, x_lora, xa, a, b, scale, weight, kind, meta, dtype, triton, need_x, shared):
    grad_x = torch.empty_like(x_lora) if need_x else grad.new_empty(0)
    grad_x_lora = grad.new_empty(0) if shared and need_x else torch.empty_like(x_lora)
    return grad_x, grad_x_lora, torch.empty_like(a), torch.empty_like(b)


def _setup_context(ctx, inputs, output):
    x, x_lora, a, b, scale, bias, weight, kind, meta, dtype, triton, shared = inputs
    ctx.save_for_backward(x_lora, output[1], a, b, *weight)
    ctx.args = (scale, kind, meta, dtype, triton, shared)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_xa):
    x_lora, xa, a, b, *weight = ctx.saved_tensors
    scale, kind, meta, dtype, triton, shared = ctx.args
    need_x = ctx.needs_input_grad[0]
    grad = grad.to(ctx.x_dtype)
    grad_x, grad_x_lora, grad_a, grad_b = lora_linear_backward_op(
        grad, x_lora, xa, a, b, scale, weight, kind, meta, dtype, triton, need_x, shared
    )
    if shared and need_x:
        grad_x_lora = None  # already inside grad_x
    grad_bias = None
    if ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return (
        grad_x if need_x else None,
        grad_x_lora,
        grad_a,
        grad_b,
        None,
        grad_bias,
        [None] * len(weight),
        None,
        None,
        None,
        None,
        None,
    )


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(
    x: torch.Tensor,
    w,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    *,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) + scale * (dropout(x) @ A.T) @ B.T, for x [..., in], A [r, in], B [out, r].

    W (a tensor or an fnlm.quant quantized weight) is frozen: gradients flow to x, A, B (and bias),
    and nothing of W's size [out, in] is kept for the backward. Dropout (on the adapter input only,
    as PEFT) applies when `training` and dropout > 0.
    """
    if (
        a.dim() != 2
        or b.dim() != 2
        or a.shape[0] != b.shape[1]
        or a.shape[1] != x.shape[-1]
        or b.shape[0] != w.shape[0]
    ):
        raise ArgumentError(
            f"lora_linear: shapes do not chain: x {tuple(x.shape)}, W {tuple(w.shape)}, A {tuple(a.shape)} "
            f"(expected [r, {x.shape[-1]}]), B {tuple(b.shape)} (expected [{w.shape[0]}, r])"
        )
    x_lora = F.dropout(x, dropout, training=True) if training and dropout > 0 else x
    kind, tensors, meta, dtype = weight_parts(w)
    if kind == "dense":
        tensors = [tensors[0].detach()]  # frozen: the op gives W no gradient
    y, _ = lora_linear_op(
        x, x_lora, a, b, scale, bias, tensors, kind, meta, dtype, use_triton(x), x_lora is x
    )
    return y


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def lora_linear_reference(
    x: torch.Tensor,
    w,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain autograd version (stores the dequantized W): PEFT's LoRA Linear forward (under
    autocast to x's dtype, see the module docstring), with x_lora the (dropped-out) adapter
    input, x itself when None."""
    base = F.linear(x, dequantize(w).to(x.dtype), bias)
    x_lora = x if x_lora is None else x_lora
    lora = F.linear(F.linear(x_lora, a.to(x.dtype)), b.to(x.dtype)) * scale
    return base + lora
