"""Quantized weights (NF4, int8, fp8) as pytree leaves, and the linear layer that dispatches on them.

    w = fnlm.quant.quantize(weight, "nf4", compute_dtype=torch.bfloat16)   # NF4Weight
    y = fnlm.quant.linear(x, w, bias)         # x @ W.T + bias, whatever w is
    W = fnlm.quant.dequantize(w)              # [out, in] in the compute dtype

One file per format (nf4.py, int8.py, fp8.py: the leaf type, its quantizer, its pytree
registration) and matmul.py (the linear and expert-stack matmuls over any of them, as custom ops).
A quantized weight is frozen: `linear` gives gradients for x (and bias) only, and its backward
recomputes the dequantized weight instead of keeping it (the whole linear is one custom op, so
torch.compile cannot decide to save the 16-bit weight either).
"""

from __future__ import annotations

import torch

from fnlm.errors import ArgumentError, QuantError
from fnlm.quant.fp8 import FP8Weight, quantize_fp8
from fnlm.quant.int8 import Int8Weight, quantize_int8
from fnlm.quant.matmul import (
    GEMV_MAX_ROWS,
    QuantizedWeight,
    dequantize,
    is_quantized,
    linear,
    matmul_weight,
    matmul_weight_into,
    matmul_weight_t,
    matmul_weight_t_into,
    stack_matmul,
    weight_from_parts,
    weight_parts,
)
from fnlm.quant.nf4 import NF4Weight, quantize_nf4

__all__ = [
    "GEMV_MAX_ROWS",
    "MODES",
    "FP8Weight",
    "Int8Weight",
    "NF4Weight",
    "QuantizedWeight",
    "dequantize",
    "is_quantized",
    "linear",
    "matmul_weight",
    "matmul_weight_into",
    "matmul_weight_t",
    "matmul_weight_t_into",
    "quantize",
    "stack_matmul",
    "weight_from_parts",
    "weight_parts",
]

MODES = ("nf4", "int8", "fp8")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
