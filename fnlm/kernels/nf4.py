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
and one round-to-nearest-even into the output dtype at the end. The kernels hold the NF4 table as
constants (a select tree, as bitsandbytes' CUDA kernel does); `fnlm.quant.NF4Weight` checks a
loaded table against it.
"""

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
def _dequantize_nf4_kernel(
    PACKED, ABSMAX, NESTED_ABSMAX, NESTED_CODE, OFFSET, OUT, n,
    NESTED: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):  # fmt: skip
    # One program expands BLOCK_BYTES packed bytes (a whole number of quantization blocks) into
    # 2 * BLOCK_BYTES contiguous outputs, as a [blocks, BLOCKSIZE / 2] tile: one absmax per row.
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
    high = _nf4_value(packed >> 4) * scale
    low = _nf4_value(packed & 0xF) * scale
    out = tl.interleave(high, low)  # [ROWS, BLOCKSIZE]: high0, low0, high1, low1, ...
    index = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(OUT + index, _round_to(out, OUT_DTYPE), mask=index < n)


@triton.jit
def _nf4_gemv_kernel(
    X, PACKED, ABSMAX, NESTED_ABSMAX, NESTED_CODE, OFFSET, BIAS, Y,
    batch, n_out, n_in, stride_x, stride_y, stride_split, pairs_per_split,
    NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, W_DTYPE: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
):  # fmt: skip
    # y[b, rows] = x[b, :] @ W[rows, :].T for BLOCK_N output rows over one split of the input
    # features, streaming W once through registers. n_in is even, so row r starts at byte
    # r * n_in / 2 and each byte holds the pair (W[r, 2j], W[r, 2j + 1]): high nibbles meet the
    # even columns of x, low nibbles the odd ones. PARTIAL: several splits write fp32 partial sums
    # (summed by the launcher); otherwise the bias is added and the result rounded once, here.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    batch_index = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < n_out
    batch_mask = batch_index < batch
    pairs_per_row = n_in // 2
    first = split * pairs_per_split
    last = tl.minimum(first + pairs_per_split, pairs_per_row)
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for start in range(first, last, BLOCK_PAIRS):
        pair = start + tl.arange(0, BLOCK_PAIRS)
        pair_mask = pair < last
        w_mask = row_mask[:, None] & pair_mask[None, :]
        byte = rows[:, None] * pairs_per_row + pair[None, :]  # [BLOCK_N, BLOCK_PAIRS]
        packed = tl.load(PACKED + byte, mask=w_mask, other=0, eviction_policy="evict_first")
        scale = _block_absmax(
            byte // (BLOCKSIZE // 2),
            w_mask,
            ABSMAX,
            NESTED_ABSMAX,
            NESTED_CODE,
            OFFSET,
            NESTED,
            NESTED_BLOCKSIZE,
        )
        # the weight rounded to the compute dtype, as dequantize-then-matmul would see it
        w_even = _round_to(_nf4_value(packed >> 4) * scale, W_DTYPE).to(tl.float32)
        w_odd = _round_to(_nf4_value(packed & 0xF) * scale, W_DTYPE).to(tl.float32)
        x_offset = batch_index[:, None] * stride_x + 2 * pair[None, :]
        x_mask = batch_mask[:, None] & pair_mask[None, :]
        x_even = tl.load(X + x_offset, mask=x_mask, other=0.0).to(
            tl.float32
        )  # [BLOCK_B, BLOCK_PAIRS]
        x_odd = tl.load(X + x_offset + 1, mask=x_mask, other=0.0).to(tl.float32)
        acc += tl.sum(
            x_even[:, None, :] * w_even[None, :, :] + x_odd[:, None, :] * w_odd[None, :, :], axis=2
        )
    y_mask = batch_mask[:, None] & row_mask[None, :]
    if PARTIAL:
        tl.store(
            Y + split * stride_split + batch_index[:, None] * stride_y + rows[None, :],
            acc,
            mask=y_mask,
        )
    else:
        if HAS_BIAS:  # added before the one rounding, as cuBLAS' addmm does
            acc += tl.load(BIAS + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            Y + batch_index[:, None] * stride_y + rows[None, :],
            _round_to(acc, W_DTYPE),
            mask=y_mask,
        )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# Rows of x the GEMV kernel takes in one launch (it is meant for decode batches).
GEMV_MAX_BATCH = 8


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
    scalar) for double quantization (else those three are None); code: the NF4 table (fp32 [16]),
    which the kernel holds as constants. Returns `dtype` [*shape].
    """
    _check(dtype, blocksize, nested_blocksize, "dequantize_nf4")
    n = _numel(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    nested_absmax, nested_code, offset, nested = _nested_args(
        absmax, nested_absmax, nested_code, offset
    )
    # whole quantization blocks per program; the interpreter pays per program, the GPU wants many
    block_bytes = max(
        blocksize // 2, 2048 if packed.is_cuda else 8192
    )  # 2048: best of a sweep, H100
    grid = (triton.cdiv((n + 1) // 2, block_bytes),)
    _dequantize_nf4_kernel[grid](
        packed, absmax, nested_absmax, nested_code, offset, out, n,
        NESTED=nested, OUT_DTYPE=_TRITON_DTYPES[dtype],
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, BLOCK_BYTES=block_bytes,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def _gemv_config(
    n_out: int, n_in: int, batch: int, device: torch.device
) -> tuple[int, int, int, int]:
    """(rows per program, byte pairs per step, warps, splits of the input features).

    The [batch, rows, pairs] products stay near 1K fp32 per parity per 128 threads; the input
    features are split until there are ~16 programs per SM, enough bytes in flight to stream W."""
    block_b = triton.next_power_of_2(min(batch, GEMV_MAX_BATCH))
    block_n = 4
    block_pairs = max(32, 256 // block_b) if device.type == "cuda" else 256
    split_k = 1
    if device.type == "cuda":
        target = 16 * torch.cuda.get_device_properties(device).multi_processor_count
        programs = triton.cdiv(n_out, block_n)
        while (
            split_k < 8
            and programs * split_k < target
            and n_in // 2 // (2 * split_k) >= 2 * block_pairs
        ):
            split_k *= 2
    return block_n, block_pairs, 4, split_k


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
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Launch the GEMV: x [batch, in] @ W.T (+ bias) -> [batch, out] in x's dtype, W given as NF4
    parts (see `dequantize_nf4`). The weight is dequantized in registers, rounded to x's dtype
    first, as dequantize-then-matmul would. `config` overrides `_gemv_config` (benchmarks)."""
    _check(x.dtype, blocksize, nested_blocksize, "nf4_gemv")
    n_out, n_in = shape
    if x.dim() != 2 or x.shape[1] != n_in:
        raise ArgumentError(
            f"nf4_gemv: x must be [batch, {n_in}] for a weight of shape {list(shape)}, got {list(x.shape)}"
        )
    if n_in % 2:
        raise ArgumentError(
            f"nf4_gemv: needs an even in_features (rows must start on a byte), got in_features={n_in}; "
            f"use dequantize + matmul instead"
        )
    x = x if x.stride(1) == 1 else x.contiguous()
    batch = x.shape[0]
    y = torch.empty((batch, n_out), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    nested_absmax, nested_code, offset, nested = _nested_args(
        absmax, nested_absmax, nested_code, offset
    )
    block_n, block_pairs, num_warps, split_k = config or _gemv_config(n_out, n_in, batch, x.device)
    block_b = triton.next_power_of_2(min(batch, GEMV_MAX_BATCH))
    pairs_per_split = triton.cdiv(triton.cdiv(n_in // 2, split_k), block_pairs) * block_pairs
    partial = (
        torch.empty((split_k, batch, n_out), dtype=torch.float32, device=x.device)
        if split_k > 1
        else y
    )
    grid = (triton.cdiv(n_out, block_n), split_k, triton.cdiv(batch, block_b))
    _nf4_gemv_kernel[grid](
        x, packed, absmax, nested_absmax, nested_code, offset, x if bias is None else bias, partial,
        batch, n_out, n_in, x.stride(0), n_out, batch * n_out, pairs_per_split,
        NESTED=nested, HAS_BIAS=bias is not None, W_DTYPE=_TRITON_DTYPES[x.dtype], PARTIAL=split_k > 1,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_PAIRS=block_pairs, num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    if split_k > 1:  # fp32 sum of the splits (+ bias), rounded once
        total = partial.sum(0)
        if bias is not None:
            total += bias.float()
        y.copy_(total)
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
