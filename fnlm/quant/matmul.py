"""A weight of any precision as data the linear layers multiply by: dense tensors, NF4, int8, fp8.

    y = linear(x, w, bias)                              # x @ W.T + bias, whatever w is
    y = stack_matmul(x, offsets, stack, experts, grouped)   # MoE rows times their expert's matrix

A quantized weight is frozen: its matmuls are custom ops (opaque to torch.compile) whose backward
gives gradients for x (and bias) only and recomputes the dequantized weight instead of keeping it,
so neither autograd nor the compiler can decide to save the 16-bit weight. They reach the Triton
kernels through fnlm.kernels (NF4 dequantize, the decode GEMV). These ops live here, not in
fnlm.kernels, because they rebuild the quantized leaves, which the kernels never import.
`weight_parts` / `weight_from_parts` flatten a weight into custom-op arguments (also used by
fnlm.lora.linear).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fnlm import kernels
from fnlm.errors import ArgumentError
from fnlm.quant.fp8 import FP8Weight
from fnlm.quant.int8 import Int8Weight
from fnlm.quant.nf4 import NF4Weight

QuantizedWeight = NF4Weight | Int8Weight | FP8Weight
_WEIGHT_TYPES = {"nf4": NF4Weight, "int8": Int8Weight, "fp8": FP8Weight}

# `linear` sends NF4 inputs of at most this many rows (bf16/fp16, whole quantization blocks per
# row) to the fused GEMV on the Triton path. On the H200 (scripts/bench_quant.py --sweep, 2026-12-03,
# us, best config) it beats dequantize + cuBLAS at every measured shape up to 8 rows:
#   4096x4096    b1 10.2 vs 40.0, b4 20.3 vs 39.6, b8 28.7 vs 38.8 (bnb gemv_4bit b1: 10.4)
#   14336x4096   b1 23.4 vs 131,  b4 51.5 vs 132,  b8 83.7 vs 131  (bnb b1: 28.7)
#   4096x14336   b1 28.1 vs 131,  b4 53.7 vs 131,  b8 81.1 vs 131  (bnb b1: 28.8)
#   128256x2048  b1 84.8 vs 547,  b4 155 vs 550,   b8 405 vs 549   (bnb b1: 116)
# 8 is also the most rows fnlm.kernels.GEMV_MAX_BATCH takes in one launch.
GEMV_MAX_ROWS = 8

# Past GEMV_MAX_ROWS, up to fnlm.kernels.SMALL_GEMM_MAX_ROWS rows may go to the fused small-batch
# NF4 GEMM (the weight dequantized in registers, not written out: batched decode, GRPO rollouts)
# instead of dequantize + cuBLAS. Off until timed on a GPU (scripts/bench_quant.py --small-gemm);
# FNLM_NF4_SMALL_GEMM=1 turns it on.
SMALL_GEMM = os.environ.get("FNLM_NF4_SMALL_GEMM", "0") not in ("", "0")


def is_quantized(w) -> bool:
    """Whether w is one of the quantized weight types."""
    return isinstance(w, NF4Weight | Int8Weight | FP8Weight)


def dequantize(w: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """The weight as a tensor in its compute dtype; plain tensors are returned as they are."""
    return w.dequantize() if is_quantized(w) else w


def linear(
    x: torch.Tensor, w: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x [..., in], dispatching on the type of w.

    Plain tensors go to F.linear. Quantized weights go through one custom op: on CUDA the Triton
    NF4 dequantize + cuBLAS (or the fused GEMV for at most GEMV_MAX_ROWS rows), elsewhere the
    plain-torch dequantize + matmul. Backward: grads of x and bias only; the dequantized weight is
    recomputed, never saved. The result has x's dtype (the weight is cast to it, as bitsandbytes does).
    """
    if not is_quantized(w):
        return F.linear(x, w, bias)
    if x.shape[-1] != w.shape[1]:
        raise ArgumentError(
            f"linear: x has {x.shape[-1]} features, the weight {tuple(w.shape)} expects {w.shape[1]}"
        )
    return quant_linear_op(x, w.tensors(), w.kind, w.meta(), w.dtype, bias, kernels.use_triton(x))


def stack_matmul(
    x: torch.Tensor, offsets: torch.Tensor, w, experts: int, grouped: bool
) -> torch.Tensor:
    """Rows x [P, in], sorted by expert (`offsets` [E] int32: the end row of each expert), times
    their expert's matrix: [P, out], row i = x[i] @ W[e]^T.

    w: a stack, dense [E, out, in] or quantized [E·out, in]. grouped: one torch._grouped_mm (CUDA,
    bf16, sm90+) instead of a loop over the experts. Differentiable in x and in a dense w; a
    quantized stack is frozen (one custom op whose backward dequantizes again).
    """
    if is_quantized(w):
        kind, tensors, meta, dtype = weight_parts(w)
        return quant_stack_matmul_op(
            x, offsets, tensors, kind, meta, dtype, experts, False, grouped
        )
    return _grouped_matmul(x, offsets, w.to(x.dtype), grouped)


# ----------------------------------------------------------------------------------------------
# A weight as custom-op arguments, and its matmuls without autograd
# ----------------------------------------------------------------------------------------------


def weight_parts(
    w: torch.Tensor | QuantizedWeight,
) -> tuple[str, list[torch.Tensor], list[int], torch.dtype]:
    """(kind, tensors, meta, dtype): w flattened into custom-op arguments; kind "dense" for tensors."""
    if is_quantized(w):
        return w.kind, w.tensors(), w.meta(), w.dtype
    return "dense", [w], list(w.shape), w.dtype  # meta non-empty: see Int8Weight.meta


def weight_from_parts(kind: str, tensors: list[torch.Tensor], meta: list[int], dtype: torch.dtype):
    """Inverse of `weight_parts`."""
    if kind == "dense":
        return tensors[0]
    return _WEIGHT_TYPES[kind].from_parts(tensors, meta, dtype)


def matmul_weight_t(
    x: torch.Tensor,
    w: torch.Tensor | QuantizedWeight,
    triton: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(x, W, bias) for x [rows, in] -> [rows, out] in x's dtype, without autograd. NF4 on
    the Triton path with at most GEMV_MAX_ROWS rows uses the fused GEMV (weight read once, never
    materialized)."""
    if not is_quantized(w):
        return F.linear(x, w, bias)
    if _takes_gemv(x, w, triton):
        return kernels.nf4_gemv(x, w, bias, triton=True)
    if _takes_small_gemm(x, w, triton):
        return kernels.nf4_small_gemm(x, w, bias, triton=True)
    return F.linear(x, w.dequantize(triton).to(x.dtype), bias)


def _takes_gemv(x: torch.Tensor, w, triton: bool) -> bool:
    """Whether x [rows, in] @ W.T runs as the fused NF4 GEMV: NF4 on the Triton path, at most
    GEMV_MAX_ROWS rows of W's dtype, a shape the kernel takes."""
    return (
        triton
        and isinstance(w, NF4Weight)
        and x.shape[0] <= GEMV_MAX_ROWS
        and x.dtype == w.dtype
        and kernels.nf4_gemv_supported(x.dtype, w.shape, w.blocksize)
    )


def _takes_small_gemm(x: torch.Tensor, w, triton: bool) -> bool:
    """Whether x [rows, in] @ W.T runs as the fused small-batch NF4 GEMM: SMALL_GEMM on, NF4 on
    the Triton path, more rows than the GEMV takes and a shape the kernel takes."""
    return (
        SMALL_GEMM
        and triton
        and isinstance(w, NF4Weight)
        and x.shape[0] > GEMV_MAX_ROWS
        and x.dtype == w.dtype
        and kernels.nf4_small_gemm_supported(x.shape[0], x.dtype, w.shape, w.blocksize)
    )


def matmul_weight_t_into(
    out: torch.Tensor, x: torch.Tensor, w: torch.Tensor | QuantizedWeight, triton: bool
) -> torch.Tensor:
    """out += x @ W.T in place (out [rows, out] in x's dtype), no autograd: the GEMM accumulates
    into out in its epilogue (beta=1), so a term written into out first (a LoRA branch) costs no
    separate pass over [rows, out]. Where `matmul_weight_t` takes the GEMV, so does this."""
    if _takes_gemv(x, w, triton):
        return out.add_(kernels.nf4_gemv(x, w, None, triton=True))
    if _takes_small_gemm(x, w, triton):
        return out.add_(kernels.nf4_small_gemm(x, w, None, triton=True))
    dense = w.dequantize(triton).to(x.dtype) if is_quantized(w) else w
    return out.addmm_(x, dense.t())


def matmul_weight_into(
    out: torch.Tensor, g: torch.Tensor, w: torch.Tensor | QuantizedWeight, triton: bool
) -> torch.Tensor:
    """out += g @ W in place (out [rows, in] in g's dtype), no autograd; see `matmul_weight_t_into`."""
    dense = w.dequantize(triton).to(g.dtype) if is_quantized(w) else w
    return out.addmm_(g, dense)


def matmul_weight(g: torch.Tensor, w: torch.Tensor | QuantizedWeight, triton: bool) -> torch.Tensor:
    """g [rows, out] @ W -> [rows, in] in g's dtype (the input gradient of a linear), no autograd."""
    if not is_quantized(w):
        return g @ w
    return g @ w.dequantize(triton).to(g.dtype)


# ----------------------------------------------------------------------------------------------
# The quantized linear as a custom op
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fnlm::quant_linear", mutates_args=())
def quant_linear_op(
    x: torch.Tensor,
    weight: list[torch.Tensor],
    kind: str,
    meta: list[int],
    dtype: torch.dtype,
    bias: torch.Tensor | None,
    triton: bool,
) -> torch.Tensor:
    """x @ W.T (+ bias) for a weight given by `weight_parts`; call through `linear`."""
    w = weight_from_parts(kind, weight, meta, dtype)
    x2 = x.reshape(-1, x.shape[-1])
    y = matmul_weight_t(x2, w, triton, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


@quant_linear_op.register_fake
def _(x, weight, kind, meta, dtype, bias, triton):
    out_features = weight_from_parts(kind, weight, meta, dtype).shape[0]
    out_dtype = torch.promote_types(x.dtype, bias.dtype) if bias is not None else x.dtype
    return x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype)


@torch.library.custom_op("fnlm::quant_linear_grad_input", mutates_args=())
def quant_linear_grad_input_op(
    grad: torch.Tensor,
    weight: list[torch.Tensor],
    kind: str,
    meta: list[int],
    dtype: torch.dtype,
    triton: bool,
) -> torch.Tensor:
    """grad [..., out] @ W -> [..., in], recomputing the dequantized weight."""
    w = weight_from_parts(kind, weight, meta, dtype)
    g = matmul_weight(grad.reshape(-1, grad.shape[-1]), w, triton)
    return g.view(*grad.shape[:-1], g.shape[-1])


@quant_linear_grad_input_op.register_fake
def _(grad, weight, kind, meta, dtype, triton):
    in_features = weight_from_parts(kind, weight, meta, dtype).shape[1]
    return grad.new_empty((*grad.shape[:-1], in_features))


def _setup_context(ctx, inputs, output):
    x, weight, kind, meta, dtype, bias, triton = inputs
    ctx.save_for_backward(*weight)
    ctx.n_weight = len(weight)  # saved_tensors unpacks once under checkpointing: count them here
    ctx.args = (kind, meta, dtype, triton)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = quant_linear_grad_input_op(
            grad.to(ctx.x_dtype), list(ctx.saved_tensors), *ctx.args
        )
    if ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, [None] * ctx.n_weight, None, None, None, grad_bias, None


quant_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# The expert-stack matmul (mixture of experts), a custom op for quantized stacks
# ----------------------------------------------------------------------------------------------


def _grouped_matmul(
    x: torch.Tensor, offsets: torch.Tensor, stack: torch.Tensor, grouped: bool
) -> torch.Tensor:
    """x [P, in] (rows sorted by expert, `offsets` their ends) @ stack[e]^T per expert: one
    torch._grouped_mm, or a loop over the experts (it reads the row counts on the host)."""
    if grouped:
        return torch._grouped_mm(x, stack.transpose(-2, -1), offs=offsets)
    ends = offsets.tolist()  # the loop reads the counts on the host
    pieces, start = [], 0
    for e, end in enumerate(ends):
        if end > start:
            pieces.append(x[start:end] @ stack[e].t())
        start = end
    if not pieces:
        return x.new_zeros(0, stack.shape[1])
    return torch.cat(pieces)


@torch.library.custom_op("fnlm::quant_stack_matmul", mutates_args=())
def quant_stack_matmul_op(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight: list[torch.Tensor],
    kind: str,
    meta: list[int],
    dtype: torch.dtype,
    experts: int,
    transpose: bool,
    grouped: bool,
) -> torch.Tensor:
    """`_grouped_matmul` over a quantized stack given by `weight_parts`, dequantized inside;
    transpose: multiply by W_e instead of W_e^T (the input gradient)."""
    w = weight_from_parts(kind, weight, meta, dtype)
    stack = w.dequantize().view(experts, -1, w.shape[1]).to(x.dtype)
    if transpose:
        stack = stack.transpose(-2, -1)
    return _grouped_matmul(x, offsets, stack, grouped)


@quant_stack_matmul_op.register_fake
def _(x, offsets, weight, kind, meta, dtype, experts, transpose, grouped):
    rows, features = weight_from_parts(kind, weight, meta, dtype).shape
    return x.new_empty((x.shape[0], features if transpose else rows // experts))


def _stack_setup_context(ctx, inputs, output):
    x, offsets, weight, *args = inputs
    ctx.save_for_backward(offsets, *weight)
    ctx.args = args


def _stack_backward(ctx, grad):
    offsets, *weight = ctx.saved_tensors
    kind, meta, dtype, experts, transpose, grouped = ctx.args
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = quant_stack_matmul_op(
            grad.contiguous(), offsets, weight, kind, meta, dtype, experts, not transpose, grouped
        )
    return grad_x, None, [None] * len(weight), None, None, None, None, None, None


quant_stack_matmul_op.register_autograd(_stack_backward, setup_context=_stack_setup_context)
