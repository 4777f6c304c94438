"""Quantized weights (NF4, int8, fp8) as pytree leaves, and the linear layer that dispatches on them.

    w = fnlm.quant.quantize(weight, "nf4", compute_dtype=torch.bfloat16)   # NF4Weight
    y = fnlm.quant.linear(x, w, bias)         # x @ W.T + bias, whatever w is
    W = fnlm.quant.dequantize(w)              # [out, in] in the compute dtype

A quantized weight is frozen: `linear` gives gradients for x (and bias) only, and its backward
recomputes the dequantized weight instead of keeping it (the whole linear is one custom op, so
torch.compile cannot decide to save the 16-bit weight either).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fnlm.errors import ArgumentError, QuantError
from fnlm.kernels.nf4 import gemv_supported, nf4_gemv_fwd
from fnlm.quant.fp8 import FP8Weight, quantize_fp8
from fnlm.quant.int8 import Int8Weight, quantize_int8
from fnlm.quant.nf4 import NF4Weight, quantize_nf4

__all__ = [
    "MODES",
    "FP8Weight",
    "Int8Weight",
    "NF4Weight",
    "QuantizedWeight",
    "dequantize",
    "is_quantized",
    "linear",
    "quantize",
]

MODES = ("nf4", "int8", "fp8")
QuantizedWeight = NF4Weight | Int8Weight | FP8Weight
_WEIGHT_TYPES = {"nf4": NF4Weight, "int8": Int8Weight, "fp8": FP8Weight}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# `linear` sends NF4 inputs of at most this many rows (bf16/fp16, whole quantization blocks per
# row) to the fused GEMV on the Triton path. On the H200 (scripts/bench_quant.py --sweep, 2026-12-03,
# us, best config) it beats dequantize + cuBLAS at every measured shape up to 8 rows:
#   4096x4096    b1 10.2 vs 40.0, b4 20.3 vs 39.6, b8 28.7 vs 38.8 (bnb gemv_4bit b1: 10.4)
#   14336x4096   b1 23.4 vs 131,  b4 51.5 vs 132,  b8 83.7 vs 131  (bnb b1: 28.7)
#   4096x14336   b1 28.1 vs 131,  b4 53.7 vs 131,  b8 81.1 vs 131  (bnb b1: 28.8)
#   128256x2048  b1 84.8 vs 547,  b4 155 vs 550,   b8 405 vs 549   (bnb b1: 116)
# 8 is also the most rows fnlm.kernels.nf4.GEMV_MAX_BATCH takes in one launch.
GEMV_MAX_ROWS = 8


def quantize(
    w: torch.Tensor, mode: str, *, compute_dtype: torch.dtype, fp8_block_size: int | None = None
) -> QuantizedWeight:
    """Quantize a 16/32-bit linear weight [out, in] on its own device.

    mode: "nf4" (bitsandbytes NF4, blocksize 64, double quant: the bytes of bnb.nn.Linear4bit),
    "int8" (bitsandbytes row-wise int8, as Int8Params) or "fp8" (e4m3, a scale per row, or per
    fp8_block_size x fp8_block_size block). compute_dtype: the dtype the layer computes in.
    Raises QuantError for an unknown mode or fp8 on a GPU without fp8, ArgumentError for a weight
    that is not a 2-D float tensor.
    """
    if mode not in MODES:
        raise QuantError(
            f"quantize: unknown quantization mode {mode!r}; expected one of {MODES} (or no quantization)"
        )
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in _FLOAT_DTYPES:
        what = (
            f"a {w.dim()}-D {w.dtype} tensor" if isinstance(w, torch.Tensor) else type(w).__name__
        )
        raise ArgumentError(
            f"quantize: expected a 2-D float weight [out, in] (fp32, fp16 or bf16), got {what}"
        )
    if compute_dtype not in _FLOAT_DTYPES:
        raise ArgumentError(
            f"quantize: compute_dtype must be one of {_FLOAT_DTYPES}, got {compute_dtype}"
        )
    with torch.no_grad():
        if mode == "nf4":
            return quantize_nf4(w, compute_dtype)
        if mode == "int8":
            return quantize_int8(w, compute_dtype)
        return quantize_fp8(w, compute_dtype, fp8_block_size)


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
    from fnlm.kernels import use_triton

    if x.shape[-1] != w.shape[1]:
        raise ArgumentError(
            f"linear: x has {x.shape[-1]} features, the weight {tuple(w.shape)} expects {w.shape[1]}"
        )
    return quant_linear_op(x, w.tensors(), w.kind, w.meta(), w.dtype, bias, use_triton(x))


# ----------------------------------------------------------------------------------------------
# Helpers shared with fnlm.kernels.lora_linear: a weight as custom-op arguments, and its matmuls
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
    if (
        triton
        and isinstance(w, NF4Weight)
        and x.shape[0] <= GEMV_MAX_ROWS
        and x.dtype == w.dtype
        and gemv_supported(x.dtype, w.shape, w.blocksize)
    ):
        return nf4_gemv_fwd(
            x, w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset,
            list(w.shape), w.blocksize, w.nested_blocksize, bias,
        )  # fmt: skip
    return F.linear(x, w.dequantize(triton).to(x.dtype), bias)


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
    return grad_x, [None] * len(ctx.saved_tensors), None, None, None, grad_bias, None


quant_linear_op.register_autograd(_backward, setup_context=_setup_context)
