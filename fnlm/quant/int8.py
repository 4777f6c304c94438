"""Int8 weights: bitsandbytes' LLM.int8 row-wise absmax quantization, used weight-only.

The bytes and scales are those of `bnb.nn.Int8Params` (the weight goes through fp16 first, as
bitsandbytes does; code = round(w * 127 / absmax_row)); the matmul dequantizes (code * absmax / 127,
bitsandbytes' `int8_vectorwise_dequant`) and multiplies in the compute dtype, so activations are not
quantized (more accurate than bnb's int8 x int8 matmul, same memory).
"""

from __future__ import annotations

import torch

from fnlm.params import register_pytree

# bitsandbytes' reciprocal of 127 in `int8_vectorwise_dequant` (a float32 literal, not 1/127)
INV_127 = 7.874015718698502e-3
# Bound on |w - dequantize(quantize(w))| per element, for a fp32 compute dtype: half a step of
# the row's grid (absmax / 127 / 2), plus the fp16 rounding of w that bitsandbytes applies before
# quantizing (half an fp16 ulp: 2**-11 relative), plus a few fp32 roundings (tiny). The fp16 range
# (|w| <= 65504) is assumed, as in bitsandbytes.
INT8_GRID_ERROR = 0.5 / 127
INT8_FP16_ERROR = 2.0**-11
INT8_FP32_SLACK = 1e-6


class Int8Weight:
    """A frozen linear weight [out, in] as int8 codes [out, in] and fp32 row absmax [out].

    A pytree node whose children are (data, scale) and whose context is the compute dtype.
    """

    kind = "int8"

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype):
        self.data = data
        self.scale = scale
        self.dtype = dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the weight (the pytree children)."""
        return [self.data, self.scale]

    def meta(self) -> list[int]:
        """Static metadata as ints, for custom-op schemas (inverse: `from_parts`). The shape (also
        in `data`) keeps the list non-empty: torch.library reads an empty list as a tensor list."""
        return list(self.shape)

    @classmethod
    def from_parts(
        cls, tensors: list[torch.Tensor], meta: list[int], dtype: torch.dtype
    ) -> Int8Weight:
        """Rebuild from `tensors()` and `meta()`."""
        return cls(*tensors, dtype=dtype)

    @property
    def nbytes(self) -> int:
        """Bytes the weight occupies on its device."""
        return self.data.nbytes + self.scale.nbytes

    def to(self, device: torch.device | str) -> Int8Weight:
        """A copy with every tensor on `device`."""
        return Int8Weight(self.data.to(device), self.scale.to(device), dtype=self.dtype)

    def dequantize(self, triton: bool | None = None) -> torch.Tensor:
        """The weight in its compute dtype, [out, in] (bitsandbytes' formula, in fp32, rounded
        once). `triton` is accepted for symmetry with NF4Weight; there is no kernel to choose."""
        return (self.data.float() * self.scale[:, None] * INV_127).to(self.dtype)

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


def quantize_int8(w: torch.Tensor, compute_dtype: torch.dtype) -> Int8Weight:
    """Row-wise int8 quantization of w [out, in] on w's device, bytes as bitsandbytes' Int8Params
    (its own kernel: bitsandbytes' CUDA kernel rounds a few values differently from its torch
    formula round(w * (127 / absmax)), which its CPU backend uses)."""
    # bitsandbytes here only: it takes seconds to import, and dequantizing never needs it
    import bitsandbytes.functional as bnb

    data, absmax, _ = bnb.int8_vectorwise_quant(w.to(torch.float16).contiguous())
    # an all-zero row gives 127 / 0 = inf and garbage codes in bitsandbytes; zeros here
    data[absmax == 0] = 0
    return Int8Weight(data, absmax, dtype=compute_dtype)


register_pytree(Int8Weight, children=("data", "scale"), static=("dtype",))
