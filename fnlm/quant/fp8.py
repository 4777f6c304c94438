"""FP8 weights: float8 e4m3 (e4m3fn) codes with fp32 scales per row or per square block.

code = w / scale rounded to e4m3 (nearest-even), scale = absmax / 448 over the row (default) or over
a block_size x block_size tile (the DeepSeek-V3 / "fp8 block" checkpoint layout). The matmul
dequantizes (code * scale, fp32, rounded once to the compute dtype) and multiplies in the compute
dtype. CUDA devices need fp8 support (compute capability 8.9: Ada, Hopper, later); CPU always works.
"""

from __future__ import annotations

import torch

from fnlm.errors import ArgumentError, QuantError
from fnlm.params import register_pytree

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
# Bound on |w - dequantize(quantize(w))| per element, for a fp32 compute dtype, in the two ranges of
# e4m3 (3 mantissa bits): normal codes round with a relative error of at most half an ulp,
# 2**-4 of |w|; subnormal codes (|code| < 2**-6) sit on a grid of 2**-9, so at most 2**-10 * scale.
# The bound used is the sum of both, plus fp32 slack for the division and the multiplication.
FP8_RELATIVE_ERROR = 2.0**-4
FP8_SUBNORMAL_ERROR = 2.0**-10
FP8_FP32_SLACK = 1e-6
FP8_MIN_CAPABILITY = (8, 9)


class FP8Weight:
    """A frozen linear weight [out, in] as float8_e4m3fn codes and fp32 scales.

    `scale` is [out] (per row, block_size 0) or [ceil(out / b), ceil(in / b)] (per b x b block).
    A pytree node whose children are (data, scale) and whose context is (compute dtype, block_size).
    """

    kind = "fp8"

    def __init__(
        self, data: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype, block_size: int = 0
    ):
        self.data = data
        self.scale = scale
        self.dtype = dtype
        self.block_size = block_size

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
        """Static metadata as ints, for custom-op schemas (inverse: `from_parts`)."""
        return [self.block_size]

    @classmethod
    def from_parts(
        cls, tensors: list[torch.Tensor], meta: list[int], dtype: torch.dtype
    ) -> FP8Weight:
        """Rebuild from `tensors()` and `meta()`."""
        return cls(*tensors, dtype=dtype, block_size=meta[0])

    @property
    def nbytes(self) -> int:
        """Bytes the weight occupies on its device."""
        return self.data.nbytes + self.scale.nbytes

    def to(self, device: torch.device | str) -> FP8Weight:
        """A copy with every tensor on `device`."""
        return FP8Weight(
            self.data.to(device),
            self.scale.to(device),
            dtype=self.dtype,
            block_size=self.block_size,
        )

    def element_scale(self) -> torch.Tensor:
        """The fp32 scale of every element, broadcastable to [out, in]."""
        return _element_scale(self.scale, self.shape, self.block_size)

    def dequantize(self, triton: bool | None = None) -> torch.Tensor:
        """The weight in its compute dtype, [out, in]. `triton` is accepted for symmetry with
        NF4Weight; there is no kernel to choose."""
        return (self.data.float() * self.element_scale()).to(self.dtype)

    def __repr__(self) -> str:
        return (
            f"FP8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"block_size={self.block_size or 'row'})"
        )


def check_fp8_device(device: torch.device) -> None:
    """Raise QuantError when `device` is a CUDA GPU without fp8 (capability < 8.9)."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise QuantError(
                f"quant='fp8' needs a GPU with fp8 support (compute capability >= 8.9: Ada, Hopper or "
                f"later); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. "
                f"Use quant='nf4' or quant='int8' on this GPU."
            )


def quantize_fp8(
    w: torch.Tensor, compute_dtype: torch.dtype, block_size: int | None = None
) -> FP8Weight:
    """Quantize w [out, in] to e4m3 with a scale per row (block_size None) or per square block."""
    check_fp8_device(w.device)
    if block_size is not None and block_size <= 0:
        raise ArgumentError(
            f"quantize_fp8: block_size must be a positive int or None (per row), got {block_size}"
        )
    wf = w.float()
    out_features, in_features = wf.shape
    if block_size is None:
        absmax = wf.abs().amax(dim=1)
    else:
        b = block_size
        padded = torch.nn.functional.pad(wf.abs(), (0, -in_features % b, 0, -out_features % b))
        absmax = padded.view(padded.shape[0] // b, b, padded.shape[1] // b, b).amax(dim=(1, 3))
    # all-zero rows / blocks get scale 1 (codes 0) instead of 0 / 0
    scale = torch.where(absmax > 0, absmax / E4M3_MAX, torch.ones_like(absmax))
    codes = (wf / _element_scale(scale, wf.shape, block_size or 0)).clamp(-E4M3_MAX, E4M3_MAX)
    return FP8Weight(
        codes.to(torch.float8_e4m3fn), scale, dtype=compute_dtype, block_size=block_size or 0
    )


def _element_scale(scale: torch.Tensor, shape: torch.Size, block_size: int) -> torch.Tensor:
    """Scales per row [out] or per block [out / b, in / b] -> broadcastable to [out, in]."""
    if not block_size:
        return scale[:, None]
    out_features, in_features = shape
    expanded = scale.repeat_interleave(block_size, 0)[:out_features]
    return expanded.repeat_interleave(block_size, 1)[:, :in_features]


register_pytree(FP8Weight, children=("data", "scale"), static=("dtype", "block_size"))
