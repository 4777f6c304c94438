"""NF4 (bitsandbytes 4-bit NormalFloat): Triton dequantize and decode GEMV, custom ops, reference.

The bitsandbytes layout, which every function here reads:
- the weight [out, in] is flattened row-major and cut into blocks of `blocksize` values (the last
  block may be short); a block's values are code[q] * absmax[block], q a 4-bit index into the
  16-entry NF4 table `code`;
- two values per byte, the first in the high nibble (an odd count leaves the last low nibble unused);
- with double quantization ("compress_statistics") absmax itself is stored as uint8 indices into a
  256-entry signed dynamic map `nested_code`, scaled per group of `nested_blocksize` blocks by the fp32
  `nested_absmax`, plus one fp32 `offset` (the mean absmax, subtracted before quantizing):
  absmax[block] = nested_code[q] * nested_absmax[block // nested_blocksize] + offset.

Bit-exact with bitsandbytes means computing as it does: every product in fp32, the two steps of the
absmax as a separate multiply and add (no fused multiply-add: bitsandbytes runs them as two kernels),
and one round-to-nearest-even into the output dtype at the end. The dequantize gathers the code
values from the weight's 16-entry table (a cached load: twice as fast as arithmetic here); the
GEMV kernels hold the table as constants (a select tree, as bitsandbytes' CUDA kernel does);
`fnlm.quant.NF4Weight` checks a loaded table against NF4_CODE.

Reached through `fnlm.kernels` (`nf4_dequantize`, `nf4_gemv`), which switches between the Triton
launchers, their custom ops (under torch.compile) and the plain-torch references: the dequantize
here, the decode GEMV in `nf4_gemv.py`, the expert GEMV in `nf4_moe.py`. The
kernels read a weight through the attributes of `NF4Layout` (fnlm.quant.NF4Weight has them);
this file never imports fnlm.quant.
"""

import os
from typing import Protocol

import torch
import triton
import triton.language as tl

from fnlm.errors import ArgumentError

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")), as fp32
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


class NF4Layout(Protocol):
    """What the NF4 kernels read of a weight (the bitsandbytes layout above); `dtype` is the
    compute dtype, `nested_*` and `offset` are None without double quantization."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    nested_blocksize: int


def nf4_args(w: NF4Layout) -> tuple:
    """The launchers' and custom ops' leading arguments for w: (packed, absmax, code,
    nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize)."""
    return (
        w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset,
        list(w.shape), w.blocksize, w.nested_blocksize,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Triton kernel (and the helpers the GEMV kernels share)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _round_to(v, OUT_DTYPE: tl.constexpr):
    """fp32 -> OUT_DTYPE with round-to-nearest-even. bf16 is rounded by hand because the Triton
    interpreter (CPU tests) truncates on that cast; on the GPU both give the same bits."""
    if OUT_DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(OUT_DTYPE)


@triton.jit
def _nf4_value(q):
    """NF4_CODE[q] for 4-bit q by a select tree: arithmetic only, no table load in the hot loop."""
    b3 = (q & 8) != 0
    b2 = (q & 4) != 0
    b1 = (q & 2) != 0
    b0 = (q & 1) != 0
    negative = tl.where(
        b2,
        tl.where(
            b1,
            tl.where(b0, 0.0, -0.09105003625154495),
            tl.where(b0, -0.18477343022823334, -0.28444138169288635),
        ),
        tl.where(
            b1,
            tl.where(b0, -0.39491748809814453, -0.5250730514526367),
            tl.where(b0, -0.6961928009986877, -1.0),
        ),
    )
    positive = tl.where(
        b2,
        tl.where(
            b1,
            tl.where(b0, 1.0, 0.7229568362236023),
            tl.where(b0, 0.5626170039176941, 0.44070982933044434),
        ),
        tl.where(
            b1,
            tl.where(b0, 0.33791524171829224, 0.24611230194568634),
            tl.where(b0, 0.16093020141124725, 0.07958029955625534),
        ),
    )
    return tl.where(b3, positive, negative)


@triton.jit
def _block_absmax(
    block, mask, ABSMAX, NESTED_ABSMAX, NESTED_CODE, OFFSET,
    NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
):  # fmt: skip
    """The fp32 absmax of each (flat) block index in `block`."""
    if NESTED:
        q = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(NESTED_CODE + q) * tl.load(
            NESTED_ABSMAX + block // NESTED_BLOCKSIZE, mask=mask, other=0.0
        )
        return scale + tl.load(OFFSET)
    else:
        return tl.load(ABSMAX + block, mask=mask, other=0.0)


@triton.jit
def _round_fast(v, OUT_DTYPE: tl.constexpr, HW_ROUND: tl.constexpr):
    """`_round_to`, or the hardware's conversion (also round-to-nearest-even) when HW_ROUND: one
    instruction per pair of values instead of five per value. Never under the interpreter."""
    if HW_ROUND:
        return v.to(OUT_DTYPE)
    else:
        return _round_to(v, OUT_DTYPE)


@triton.jit
def _dequantize_nf4_kernel(
    PACKED, ABSMAX, NESTED_ABSMAX, NESTED_CODE, OFFSET, OUT, n, CODE,
    NESTED: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCK_BYTES: tl.constexpr,
    TABLE: tl.constexpr = False, HW_ROUND: tl.constexpr = False,
):  # fmt: skip
    # One program expands BLOCK_BYTES packed bytes (a whole number of quantization blocks) into
    # 2 * BLOCK_BYTES contiguous outputs, as a [blocks, BLOCKSIZE / 2] tile: one absmax per row.
    # TABLE: the code values gathered from the 16-entry table (cached) instead of the select tree.
    HALF: tl.constexpr = BLOCKSIZE // 2
    ROWS: tl.constexpr = BLOCK_BYTES // HALF
    pid = tl.program_id(0).to(tl.int64)
    block = pid * ROWS + tl.arange(0, ROWS)  # [ROWS]
    byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [ROWS, HALF]
    n_bytes = (n + 1) // 2
    packed = tl.load(PACKED + byte, mask=byte < n_bytes, other=0, eviction_policy="evict_first")
    scale = _block_absmax(
        block,
        block * BLOCKSIZE < n,
        ABSMAX,
        NESTED_ABSMAX,
        NESTED_CODE,
        OFFSET,
        NESTED,
        NESTED_BLOCKSIZE,
    )[:, None]
    if TABLE:
        high = tl.load(CODE + (packed >> 4)) * scale
        low = tl.load(CODE + (packed & 0xF)) * scale
    else:
        high = _nf4_value(packed >> 4) * scale
        low = _nf4_value(packed & 0xF) * scale
    out = tl.interleave(high, low)  # [ROWS, BLOCKSIZE]: high0, low0, high1, low1, ...
    index = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(OUT + index, _round_fast(out, OUT_DTYPE, HW_ROUND), mask=index < n)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _check(dtype: torch.dtype, blocksize: int, nested_blocksize: int, what: str) -> None:
    if dtype not in _TRITON_DTYPES:
        raise ArgumentError(
            f"{what}: dtype {dtype} is not supported; expected one of {tuple(_TRITON_DTYPES)}"
        )
    for name, size in (("blocksize", blocksize), ("nested_blocksize", nested_blocksize)):
        if size < 2 or size & (size - 1):
            raise ArgumentError(
                f"{what}: {name} must be a power of two >= 2 (as in bitsandbytes), got {size}"
            )


def _nested_args(absmax, nested_absmax, nested_code, offset):
    """Pointer arguments for the kernels; without double quantization absmax stands in for the
    unused nested tensors (never read)."""
    if nested_absmax is None:
        return absmax, absmax, absmax, False
    return nested_absmax, nested_code, offset, True


def _numel(shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Triton NF4 dequantize; bit-exact with `bitsandbytes.functional.dequantize_4bit`.

    packed: uint8, (n + 1) // 2 bytes (any shape, e.g. bnb's [bytes, 1]); absmax: fp32 [blocks], or
    uint8 [blocks] with nested_absmax (fp32 [groups]), nested_code (fp32 [256]) and offset (fp32
    scalar) for double quantization (else those three are None); code: the NF4 table (fp32 [16];
    None for NF4_CODE), which the kernel gathers from. Returns `dtype` [*shape].
    """
    _check(dtype, blocksize, nested_blocksize, "dequantize_nf4")
    n = _numel(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    nested_absmax, nested_code, offset, nested = _nested_args(
        absmax, nested_absmax, nested_code, offset
    )
    if code is None:
        code = torch.tensor(NF4_CODE, device=packed.device)
    # Whole quantization blocks per program; the interpreter pays per program, the GPU wants many.
    # On the H200 (scripts/bench_quant.py --sweep, 2026-12-03; 14336 x 4096 -> bf16) the code values
    # gathered from the (cached) 16-entry table and the hardware's bf16 rounding take 49.0 us against
    # 94.7 for the select tree and hand rounding (3.0 vs 1.6 TB/s; bitsandbytes: 70.6 us), with
    # 2048 bytes per program and 4 warps the best of 80 configurations on both 8B shapes.
    block_bytes = max(blocksize // 2, 2048 if packed.is_cuda else 8192)
    grid = (triton.cdiv((n + 1) // 2, block_bytes),)
    _dequantize_nf4_kernel[grid](
        packed, absmax, nested_absmax, nested_code, offset, out, n, code,
        NESTED=nested, OUT_DTYPE=_TRITON_DTYPES[dtype],
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, BLOCK_BYTES=block_bytes,
        TABLE=True, HW_ROUND=packed.is_cuda and not _interpreting(),
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Custom op (opaque to torch.compile; no autograd: the quantized weight is frozen, and the
# differentiable linear ops of fnlm.quant.matmul / fnlm.lora.linear run eagerly inside their own
# custom ops, where fnlm.kernels calls the launchers directly)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fnlm::nf4_dequantize", mutates_args=())
def nf4_dequantize_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Triton NF4 dequantize as a custom op (see `dequantize_nf4`)."""
    return dequantize_nf4(
        packed,
        absmax,
        code,
        nested_absmax,
        nested_code,
        offset,
        shape,
        blocksize,
        nested_blocksize,
        dtype,
    )


@nf4_dequantize_op.register_fake
def _(
    packed,
    absmax,
    code,
    nested_absmax,
    nested_code,
    offset,
    shape,
    blocksize,
    nested_blocksize,
    dtype,
):
    return packed.new_empty(shape, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def dequantize_nf4_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Plain-torch NF4 dequantize with the same arithmetic as bitsandbytes (and the Triton kernel)."""
    n = 1
    for size in shape:
        n *= size
    blocks = absmax.numel()
    if nested_absmax is not None:
        group = torch.arange(blocks, device=absmax.device) // nested_blocksize
        # two separate ops, as bitsandbytes runs them: no fused multiply-add
        absmax = nested_code[absmax.long()] * nested_absmax[group]
        absmax = absmax + offset
    data = packed.reshape(-1)
    index = torch.stack((data >> 4, data & 0xF), dim=-1).reshape(-1)[:n]
    values = code[index.long()]
    values = torch.nn.functional.pad(values, (0, blocks * blocksize - n))
    values = (values.view(blocks, blocksize) * absmax[:, None]).view(-1)[:n]
    return values.to(dtype).view(shape)


def dequantize_matmul_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W.T (+ bias) in plain torch with the fused NF4 matmuls' arithmetic (the GEMV's and the
    small GEMM's references): W dequantized and rounded to x's dtype, the products summed in fp32
    (bias there too), one rounding into x's dtype."""
    w = dequantize_nf4_reference(
        packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize,
        nested_blocksize, x.dtype,
    )  # fmt: skip
    y = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
    return y.to(x.dtype)
