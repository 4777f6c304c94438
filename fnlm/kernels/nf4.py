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
and one round-to-nearest-even into the output dtype at the end.
"""

import torch
import triton
import triton.language as tl

from fnlm.errors import ArgumentError

# ----------------------------------------------------------------------------------------------
# Triton kernels
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
def _block_absmax(
    block, mask, ABSMAX, NESTED_ABSMAX, NESTED_CODE, OFFSET, nested_blocksize, NESTED: tl.constexpr
):
    """The fp32 absmax of each (flat) block index in `block`."""
    if NESTED:
        q = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(NESTED_CODE + q) * tl.load(
            NESTED_ABSMAX + block // nested_blocksize, mask=mask, other=0.0
        )
        return scale + tl.load(OFFSET)
    else:
        return tl.load(ABSMAX + block, mask=mask, other=0.0)


@triton.jit
def _dequantize_nf4_kernel(
    PACKED, ABSMAX, CODE, NESTED_ABSMAX, NESTED_CODE, OFFSET, OUT,
    n, blocksize, nested_blocksize,
    NESTED: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):  # fmt: skip
    # One program expands BLOCK_BYTES packed bytes into 2 * BLOCK_BYTES contiguous outputs.
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    byte_mask = byte < (n + 1) // 2
    packed = tl.load(PACKED + byte, mask=byte_mask, other=0)
    # blocksize is even, so both nibbles of a byte share one block
    scale = _block_absmax(
        (byte * 2) // blocksize,
        byte_mask,
        ABSMAX,
        NESTED_ABSMAX,
        NESTED_CODE,
        OFFSET,
        nested_blocksize,
        NESTED,
    )
    high = tl.load(CODE + (packed >> 4).to(tl.int32)) * scale
    low = tl.load(CODE + (packed & 0xF).to(tl.int32)) * scale
    out = tl.interleave(high, low)  # [2 * BLOCK_BYTES]: high0, low0, high1, low1, ...
    index = pid * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    tl.store(OUT + index, _round_to(out, OUT_DTYPE), mask=index < n)


@triton.jit
def _nf4_gemv_kernel(
    X, PACKED, ABSMAX, CODE, NESTED_ABSMAX, NESTED_CODE, OFFSET, BIAS, Y,
    batch, n_out, n_in, stride_x, stride_y, blocksize, nested_blocksize,
    NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, W_DTYPE: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
):  # fmt: skip
    # y[b, rows] = x[b, :] @ W[rows, :].T for BLOCK_N output rows, streaming W once through
    # registers. n_in is even, so row r starts at byte r * n_in / 2 and each byte holds the pair
    # (W[r, 2j], W[r, 2j + 1]): high nibbles meet the even columns of x, low nibbles the odd ones.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    batch_index = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < n_out
    batch_mask = batch_index < batch
    pairs_per_row = n_in // 2
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for start in range(0, pairs_per_row, BLOCK_PAIRS):
        pair = start + tl.arange(0, BLOCK_PAIRS)
        pair_mask = pair < pairs_per_row
        w_mask = row_mask[:, None] & pair_mask[None, :]
        byte = rows[:, None] * pairs_per_row + pair[None, :]  # [BLOCK_N, BLOCK_PAIRS]
        packed = tl.load(PACKED + byte, mask=w_mask, other=0)
        scale = _block_absmax(
            (byte * 2) // blocksize,
            w_mask,
            ABSMAX,
            NESTED_ABSMAX,
            NESTED_CODE,
            OFFSET,
            nested_blocksize,
            NESTED,
        )
        # the weight rounded to the compute dtype, as dequantize-then-matmul would see it
        w_even = _round_to(tl.load(CODE + (packed >> 4).to(tl.int32)) * scale, W_DTYPE)
        w_odd = _round_to(tl.load(CODE + (packed & 0xF).to(tl.int32)) * scale, W_DTYPE)
        x_offset = batch_index[:, None] * stride_x + 2 * pair[None, :]
        x_mask = batch_mask[:, None] & pair_mask[None, :]
        x_even = tl.load(X + x_offset, mask=x_mask, other=0.0)  # [BLOCK_B, BLOCK_PAIRS]
        x_odd = tl.load(X + x_offset + 1, mask=x_mask, other=0.0)
        if USE_DOT and DOT_IN_FP32:
            # the Triton interpreter (CPU tests) multiplies bf16 dot operands wrongly; fp32 holds
            # them exactly and accumulates in fp32 like the tensor cores do
            acc += tl.dot(
                x_even.to(tl.float32), tl.trans(w_even.to(tl.float32)), input_precision="ieee"
            )
            acc += tl.dot(
                x_odd.to(tl.float32), tl.trans(w_odd.to(tl.float32)), input_precision="ieee"
            )
        elif USE_DOT:
            acc += tl.dot(x_even, tl.trans(w_even)) + tl.dot(x_odd, tl.trans(w_odd))
        else:
            acc += tl.sum(
                x_even.to(tl.float32)[:, None, :] * w_even.to(tl.float32)[None, :, :], axis=2
            )
            acc += tl.sum(
                x_odd.to(tl.float32)[:, None, :] * w_odd.to(tl.float32)[None, :, :], axis=2
            )
    if HAS_BIAS:  # added before the one rounding, as cuBLAS' addmm does
        acc += tl.load(BIAS + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    y_offset = batch_index[:, None] * stride_y + rows[None, :]
    tl.store(Y + y_offset, _round_to(acc, W_DTYPE), mask=batch_mask[:, None] & row_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# The GEMV is meant for decode; beyond this batch dequantize + cuBLAS matmul is faster.
GEMV_MAX_BATCH = 8


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in _TRITON_DTYPES:
        raise ArgumentError(
            f"{what}: dtype {dtype} is not supported; expected one of {tuple(_TRITON_DTYPES)}"
        )


def _nested_args(absmax, nested_absmax, nested_code, offset):
    """Pointer arguments for the kernels; without double quantization absmax stands in for the
    unused nested tensors (never read)."""
    if nested_absmax is None:
        return absmax, absmax, absmax, False
    return nested_absmax, nested_code, offset, True


def dequantize_nf4(
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
    """Triton NF4 dequantize; bit-exact with `bitsandbytes.functional.dequantize_4bit`.

    packed: uint8, (n + 1) // 2 bytes (any shape, e.g. bnb's [bytes, 1]); absmax: fp32 [blocks], or
    uint8 [blocks] with nested_absmax (fp32 [groups]), nested_code (fp32 [256]) and offset (fp32
    scalar) for double quantization (else those three are None); code: fp32 [16]. Returns `dtype`
    [*shape].
    """
    _check_dtype(dtype, "dequantize_nf4")
    if blocksize % 2:
        raise ArgumentError(f"dequantize_nf4: blocksize must be even, got {blocksize}")
    n = 1
    for size in shape:
        n *= size
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    nested_absmax, nested_code, offset, nested = _nested_args(
        absmax, nested_absmax, nested_code, offset
    )
    # the interpreter pays per program, the GPU wants many small ones
    block_bytes = 1024 if packed.is_cuda else 8192
    grid = (triton.cdiv((n + 1) // 2, block_bytes),)
    _dequantize_nf4_kernel[grid](
        packed, absmax, code, nested_absmax, nested_code, offset, out,
        n, blocksize, nested_blocksize,
        NESTED=nested, OUT_DTYPE=_TRITON_DTYPES[dtype], BLOCK_BYTES=block_bytes,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def nf4_gemv_fwd(
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
    """Launch the GEMV: x [batch, in] @ W.T (+ bias) -> [batch, out] in x's dtype, W given as NF4
    parts (see `dequantize_nf4`). The weight is dequantized in registers, rounded to x's dtype
    first, as dequantize-then-matmul would."""
    _check_dtype(x.dtype, "nf4_gemv")
    n_out, n_in = shape
    if x.dim() != 2 or x.shape[1] != n_in:
        raise ArgumentError(
            f"nf4_gemv: x must be [batch, {n_in}] for a weight of shape {list(shape)}, got {list(x.shape)}"
        )
    if n_in % 2 or blocksize % 2:
        raise ArgumentError(
            f"nf4_gemv: needs an even in_features and blocksize (rows must start on a byte), got "
            f"in_features={n_in}, blocksize={blocksize}; use dequantize + matmul instead"
        )
    x = x if x.stride(1) == 1 else x.contiguous()
    batch = x.shape[0]
    y = torch.empty((batch, n_out), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    nested_absmax, nested_code, offset, nested = _nested_args(
        absmax, nested_absmax, nested_code, offset
    )
    # tl.dot needs 16 rows and 16-bit inputs; batch 1 (and fp32) use a multiply-and-reduce instead
    use_dot = batch > 1 and x.dtype != torch.float32
    block_b = 16 if use_dot else triton.next_power_of_2(min(batch, GEMV_MAX_BATCH))
    block_n = 16 if use_dot else 8
    block_pairs = 64 if x.is_cuda else 256
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(batch, block_b))
    _nf4_gemv_kernel[grid](
        x, packed, absmax, code, nested_absmax, nested_code, offset, x if bias is None else bias, y,
        batch, n_out, n_in, x.stride(0), y.stride(0), blocksize, nested_blocksize,
        NESTED=nested, HAS_BIAS=bias is not None, W_DTYPE=_TRITON_DTYPES[x.dtype], USE_DOT=use_dot,
        DOT_IN_FP32=not x.is_cuda,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_PAIRS=block_pairs, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return y


def nf4_gemv(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Fused NF4 GEMV for decode: x [batch <= ~8, in] @ dequantize(w).T (+ bias) -> [batch, out],
    reading each weight byte once and never materializing the 16-bit weight. `w` is an `NF4Weight`."""
    return nf4_gemv_fwd(x, *_weight_parts(w), bias)


def _weight_parts(w) -> tuple:
    return (
        w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset,
        list(w.shape), w.blocksize, w.nested_blocksize,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; no autograd: the quantized weight is frozen, and the
# differentiable linear ops in fnlm.quant / fnlm.kernels.lora_linear call the launchers directly)
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


@torch.library.custom_op("fnlm::nf4_gemv", mutates_args=())
def nf4_gemv_op(
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
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Triton NF4 GEMV as a custom op (see `nf4_gemv_fwd`)."""
    return nf4_gemv_fwd(
        x,
        packed,
        absmax,
        code,
        nested_absmax,
        nested_code,
        offset,
        shape,
        blocksize,
        nested_blocksize,
        bias,
    )


@nf4_gemv_op.register_fake
def _(
    x,
    packed,
    absmax,
    code,
    nested_absmax,
    nested_code,
    offset,
    shape,
    blocksize,
    nested_blocksize,
    bias,
):
    return x.new_empty((x.shape[0], shape[0]))


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
