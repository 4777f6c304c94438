"""NF4 decode GEMV: x [batch <= 8, in] @ W.T with W read once as 4-bit and never materialized.

The weight is in bitsandbytes' NF4 layout (see `fnlm.kernels.nf4`). Each quantization block's 16
possible weights are built once as byte tables and each packed word is looked up with PTX `prmt`
byte permutes; the weights are rounded to x's dtype as dequantize-then-matmul would see them, the
products accumulated in fp32. Reached through `fnlm.kernels.nf4_gemv`.

The launch configurations (the variants "fixup", "sweep" and "tuned", FNLM_NF4_GEMV) are
chosen in `fnlm.kernels._nf4_gemv_config`.
"""

import torch
import triton
import triton.language as tl

from fnlm.errors import ArgumentError
from fnlm.kernels._nf4_gemv_config import (
    GEMV_MAX_BATCH,
    _fixup_config,
    _gemv_config,
    _tuned_choice,
    gemv_variant,
)
from fnlm.kernels.nf4 import (
    _TRITON_DTYPES,
    _check,
    _nested_args,
    _round_to,
    dequantize_matmul_reference,
)

# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _prmt(a, b, selector, ASM: tl.constexpr):
    """PTX `prmt.b32` (default mode): byte k of the result is byte (selector >> 4k) & 7 of the
    8-byte pair (a, b), a the low half. A 3-bit index per byte: a table lookup of 8 bytes in one
    instruction. Selector nibbles must not have their top bit set (prmt's sign-replicate mode). The
    interpreter (CPU tests) runs the same bytes through shifts."""
    if ASM:
        return tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, selector],
            dtype=tl.uint32, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        pool = a.to(tl.uint64) | (b.to(tl.uint64) << 32)
        out = tl.zeros_like(a)
        for k in tl.static_range(4):
            shift = ((selector >> (4 * k)) & 7) * 8
            out |= ((pool >> shift.to(tl.uint64)) & 0xFF).to(tl.uint32) << (8 * k)
        return out


@triton.jit
def _pack_pair(low, high, W_DTYPE: tl.constexpr, ASM: tl.constexpr):
    """Two fp32 values rounded to nearest-even into W_DTYPE, packed in a uint32 (low half first)."""
    if ASM:
        op: tl.constexpr = "cvt.rn.bf16x2.f32" if W_DTYPE == tl.bfloat16 else "cvt.rn.f16x2.f32"
        return tl.inline_asm_elementwise(
            op + " $0, $1, $2;", "=r,f,f", [high, low], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:  # the interpreter truncates fp32 -> bf16: round by hand there
        if W_DTYPE == tl.bfloat16:
            bits_low = low.to(tl.uint32, bitcast=True)
            bits_high = high.to(tl.uint32, bitcast=True)
            bits_low = (bits_low + 0x7FFF + ((bits_low >> 16) & 1)) >> 16
            bits_high = (bits_high + 0x7FFF + ((bits_high >> 16) & 1)) >> 16
        else:
            bits_low = low.to(W_DTYPE).to(tl.uint16, bitcast=True).to(tl.uint32)
            bits_high = high.to(W_DTYPE).to(tl.uint16, bitcast=True).to(tl.uint32)
        return bits_low | (bits_high << 16)


@triton.jit
def _halves(v, W_DTYPE: tl.constexpr):
    """The two W_DTYPE values packed in uint32 v (low half first), as fp32."""
    if W_DTYPE == tl.bfloat16:  # a bf16 is the top half of its fp32
        return (v << 16).to(tl.float32, bitcast=True), (v & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        low = (v & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        high = (v >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return low, high


@triton.jit
def _pair_table(scale, code_low, code_high, W_DTYPE: tl.constexpr, ASM: tl.constexpr):
    return _pack_pair(code_low * scale, code_high * scale, W_DTYPE, ASM)


@triton.jit
def _lookup4(selector, merge, l0, l1, l2, l3, h0, h1, h2, h3, ASM: tl.constexpr):
    """The weights of the 4 nibbles in the low 16 bits of `selector` (top bit of each nibble
    cleared; `merge` nibble k = k + 4 * that top bit) from the byte tables, as two uint32 pairs
    in value order."""
    low = _prmt(_prmt(l0, l1, selector, ASM), _prmt(l2, l3, selector, ASM), merge, ASM)
    high = _prmt(_prmt(h0, h1, selector, ASM), _prmt(h2, h3, selector, ASM), merge, ASM)
    # byte k of low / high: the low / high byte of nibble k's weight. Nibble 2j is the low nibble
    # of packed byte j, i.e. value 2j + 1: pair up (nibble 1, nibble 0), (nibble 3, nibble 2).
    return _prmt(low, high, 0x4051, ASM), _prmt(low, high, 0x6273, ASM)


@triton.jit
def _fma_pair(acc, w_pair, x_pair, W_DTYPE: tl.constexpr):
    w_low, w_high = _halves(w_pair, W_DTYPE)
    x_low, x_high = _halves(x_pair, W_DTYPE)
    acc = tl.fma(x_low, w_low, acc)
    return tl.fma(x_high, w_high, acc)


@triton.jit
def _fma_word(
    acc, word, x01, x23, x45, x67, l0, l1, l2, l3, h0, h1, h2, h3,
    W_DTYPE: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """acc [B, N, NB, W] += the 8 weights of packed uint32 words [N, NB, W] times x, given as 4
    uint32 pairs [B, NB, W] (values 0-1, 2-3, 4-5, 6-7 of each word), in fp32."""
    selector = word & 0x77777777
    merge = ((word >> 1) & 0x44444444) | 0x32103210
    w01, w23 = _lookup4(selector, merge, l0, l1, l2, l3, h0, h1, h2, h3, ASM)
    w45, w67 = _lookup4(selector >> 16, merge >> 16, l0, l1, l2, l3, h0, h1, h2, h3, ASM)
    acc = _fma_pair(acc, w01, x01, W_DTYPE)
    acc = _fma_pair(acc, w23, x23, W_DTYPE)
    acc = _fma_pair(acc, w45, x45, W_DTYPE)
    return _fma_pair(acc, w67, x67, W_DTYPE)


@triton.jit
def _load_x_pairs(x_ptr, mask):
    """x as 4 uint32 pairs [B, NB, 1, W] for the words at x_ptr (uint64: 2 pairs per load)."""
    x0123 = tl.load(x_ptr, mask=mask, other=0)
    x4567 = tl.load(x_ptr + 1, mask=mask, other=0)
    return (
        x0123.to(tl.uint32),
        (x0123 >> 32).to(tl.uint32),
        x4567.to(tl.uint32),
        (x4567 >> 32).to(tl.uint32),
    )


@triton.jit
def _load_step(
    words, ABSMAX, NESTED_ABSMAX, block, rows, row_blocks, word,
    NESTED: tl.constexpr, WORDS: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
):  # fmt: skip
    """A step's packed words (the two halves of each block, [1, NB, N, WORDS] uint32) and the
    blocks' absmax (+ nested absmax; absmax again without double quantization)."""
    flat_block = block + rows * row_blocks  # [1, NB, N, 1]
    word_ptr = words + flat_block * (2 * WORDS) + word
    half_0 = tl.load(word_ptr, eviction_policy="evict_first")
    half_1 = tl.load(word_ptr + WORDS, eviction_policy="evict_first")
    absmax = tl.load(ABSMAX + flat_block)
    nested_absmax = absmax
    if NESTED:
        nested_absmax = tl.load(NESTED_ABSMAX + flat_block // NESTED_BLOCKSIZE)
    return half_0, half_1, absmax, nested_absmax


@triton.jit
def _nf4_gemv_kernel(
    X, PACKED, ABSMAX, NESTED_ABSMAX, NESTED_CODE, OFFSET, BIAS, Y, OUT, ARRIVED,
    batch, n_out, row_blocks, stride_x, stride_y, stride_split, blocks_per_split, splits, zero,
    NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, W_DTYPE: tl.constexpr, PARTIAL: tl.constexpr,
    FIXUP: tl.constexpr, ASM: tl.constexpr, BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_BLOCKS: tl.constexpr,
):  # fmt: skip
    # y[b, rows] = x[b, :] @ W[rows, :].T for BLOCK_N output rows over one split of the input
    # features (a whole number of quantization blocks: in_features % BLOCKSIZE == 0, so row r is
    # blocks r * row_blocks ...). Each step takes BLOCK_BLOCKS blocks of each row as a
    # [BLOCK_N, BLOCK_BLOCKS] grid of blocks, one block per thread (and its repeats): the block's
    # absmax is computed once, then its 16 possible weights round(code[q] * absmax) (rounded to
    # the compute dtype, as dequantize-then-matmul would see them) are built as byte tables, and
    # each packed uint32 word (8 weights) is looked up with 12 `prmt` byte permutes. Products
    # are accumulated elementwise in fp32 and reduced once at the end. The next step's words are
    # loaded before this step's arithmetic, so two steps of weights are in flight.
    # PARTIAL: several splits write fp32 partial sums to Y, summed by the launcher, or with FIXUP
    # by the tile's last split to arrive (ARRIVED: a zeroed int32 counter per tile), into OUT;
    # otherwise the bias is added and the result rounded once, here.
    WORDS: tl.constexpr = BLOCKSIZE // 16  # uint32 words per block (8 nibbles each), per half
    # every tensor is 4-D, [batch, blocks, rows, words], so that one register layout (the packed
    # words' load: 4 words per thread, lanes along rows) carries through without expand_dims
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, None, :, None]
    row_mask = rows < n_out
    rows = tl.minimum(rows, n_out - 1).to(tl.int64)  # rows past the end re-read the last one
    split = tl.program_id(1)
    batch_index = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None, None, None]
    batch_mask = batch_index < batch
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, row_blocks)
    words = PACKED.to(tl.pointer_type(tl.uint32))
    x_quads = X.to(tl.pointer_type(tl.uint64))  # x as groups of four 16-bit values
    in_block = tl.arange(0, BLOCK_BLOCKS)[None, :, None, None]
    word = tl.arange(0, WORDS)[None, None, None, :]
    offset = 0.0
    if NESTED:
        offset = tl.load(OFFSET)

    # step 0's loads; each step then loads the next step's (clamped into the row: always valid)
    half_0, half_1, absmax, nested_absmax = _load_step(
        words, ABSMAX, NESTED_ABSMAX, tl.minimum(first + in_block, last - 1), rows, row_blocks,
        word, NESTED, WORDS, NESTED_BLOCKSIZE,
    )  # fmt: skip
    # zeros in the words' register layout (not Triton's default), so that x, not the weights,
    # is what gets moved between layouts
    acc = tl.broadcast_to((half_0 & zero).to(tl.float32), [BLOCK_B, BLOCK_BLOCKS, BLOCK_N, WORDS])
    for start in range(first, last, BLOCK_BLOCKS):
        x_block = start + in_block
        x_mask = batch_mask & (x_block < last)
        # [BLOCK_B, BLOCK_BLOCKS, 1, WORDS]: the first of each word's 2 quads
        x_ptr = x_quads + batch_index * (stride_x // 4) + x_block * (BLOCKSIZE // 4) + 2 * word
        if NESTED:
            scale = tl.load(NESTED_CODE + absmax.to(tl.int32)) * nested_absmax
            scale = scale + offset  # two ops, as bitsandbytes runs them (no fused multiply-add)
        else:
            scale = absmax
        # the block's 16 weights as byte tables: low bytes of entries 0-3, 4-7, 8-11, 12-15
        # (l0-l3), then the high bytes (h0-h3), [1, BLOCK_BLOCKS, BLOCK_N, 1]
        p0 = _pair_table(scale, -1.0, -0.6961928009986877, W_DTYPE, ASM)
        p1 = _pair_table(scale, -0.5250730514526367, -0.39491748809814453, W_DTYPE, ASM)
        p2 = _pair_table(scale, -0.28444138169288635, -0.18477343022823334, W_DTYPE, ASM)
        p3 = _pair_table(scale, -0.09105003625154495, 0.0, W_DTYPE, ASM)
        p4 = _pair_table(scale, 0.07958029955625534, 0.16093020141124725, W_DTYPE, ASM)
        p5 = _pair_table(scale, 0.24611230194568634, 0.33791524171829224, W_DTYPE, ASM)
        p6 = _pair_table(scale, 0.44070982933044434, 0.5626170039176941, W_DTYPE, ASM)
        p7 = _pair_table(scale, 0.7229568362236023, 1.0, W_DTYPE, ASM)
        l0, h0 = _prmt(p0, p1, 0x6420, ASM), _prmt(p0, p1, 0x7531, ASM)
        l1, h1 = _prmt(p2, p3, 0x6420, ASM), _prmt(p2, p3, 0x7531, ASM)
        l2, h2 = _prmt(p4, p5, 0x6420, ASM), _prmt(p4, p5, 0x7531, ASM)
        l3, h3 = _prmt(p6, p7, 0x6420, ASM), _prmt(p6, p7, 0x7531, ASM)
        current_0, current_1 = half_0, half_1
        # the next step's loads, before this step's arithmetic
        half_0, half_1, absmax, nested_absmax = _load_step(
            words, ABSMAX, NESTED_ABSMAX, tl.minimum(start + BLOCK_BLOCKS + in_block, last - 1),
            rows, row_blocks, word, NESTED, WORDS, NESTED_BLOCKSIZE,
        )  # fmt: skip
        x01, x23, x45, x67 = _load_x_pairs(x_ptr, x_mask)
        acc = _fma_word(
            acc, current_0, x01, x23, x45, x67, l0, l1, l2, l3, h0, h1, h2, h3, W_DTYPE, ASM
        )
        x01, x23, x45, x67 = _load_x_pairs(x_ptr + 2 * WORDS, x_mask)
        acc = _fma_word(
            acc, current_1, x01, x23, x45, x67, l0, l1, l2, l3, h0, h1, h2, h3, W_DTYPE, ASM
        )
    out = tl.sum(tl.sum(acc, axis=3), axis=1)  # [BLOCK_B, BLOCK_N]
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    batch_index = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < n_out
    y_mask = (batch_index < batch)[:, None] & row_mask[None, :]
    tile = batch_index[:, None] * stride_y + rows[None, :]
    if PARTIAL:
        tl.store(Y + split * stride_split + tile, out, mask=y_mask)
        if FIXUP:
            # every thread's partial stored before the (release) count, the others' partials read
            # after the (acquire) count that shows this split is the tile's last, from L2
            tl.debug_barrier()
            arrived = tl.atomic_add(
                ARRIVED + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0), 1,
                sem="acq_rel",
            )  # fmt: skip
            if arrived == splits - 1:
                out = tl.load(Y + tile, mask=y_mask, other=0.0, cache_modifier=".cg")
                for other in range(1, splits):  # split order: the same sum on every run
                    out += tl.load(
                        Y + other * stride_split + tile, mask=y_mask, other=0.0,
                        cache_modifier=".cg",
                    )  # fmt: skip
                if HAS_BIAS:
                    out += tl.load(BIAS + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
                tl.store(OUT + tile, _round_to(out, W_DTYPE), mask=y_mask)
    else:
        if HAS_BIAS:  # added before the one rounding, as cuBLAS' addmm does
            out += tl.load(BIAS + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + tile, _round_to(out, W_DTYPE), mask=y_mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def gemv_supported(x_dtype: torch.dtype, shape, blocksize: int) -> bool:
    """Whether `nf4_gemv_fwd` takes this case: a 16-bit x and whole quantization blocks per row
    (in_features % blocksize == 0, blocksize >= 16); others need dequantize + matmul."""
    return (
        x_dtype in (torch.bfloat16, torch.float16)
        and blocksize >= 16
        and blocksize & (blocksize - 1) == 0
        and shape[1] % blocksize == 0
    )


def check_gemv(x: torch.Tensor, shape, blocksize: int, nested_blocksize: int) -> None:
    """Raise ArgumentError unless the GEMV takes x [batch, in] for a weight of `shape`."""
    _check(x.dtype, blocksize, nested_blocksize, "nf4_gemv")
    n_in = shape[1]
    if x.dim() != 2 or x.shape[1] != n_in:
        raise ArgumentError(
            f"nf4_gemv: x must be [batch, {n_in}] for a weight of shape {list(shape)}, got {list(x.shape)}"
        )
    if not gemv_supported(x.dtype, shape, blocksize):
        raise ArgumentError(
            f"nf4_gemv: needs a bf16/fp16 x and whole quantization blocks per row, got {x.dtype}, "
            f"in_features={n_in}, blocksize={blocksize}; use dequantize + matmul instead"
        )


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
    variant: str | None = None,
) -> torch.Tensor:
    """Launch the GEMV: x [batch, in] @ W.T (+ bias) -> [batch, out] in x's dtype (bf16 or fp16),
    W given as NF4 parts (see `dequantize_nf4`) with in % blocksize == 0 (`gemv_supported`). The
    weight is dequantized in registers, rounded to x's dtype first, as dequantize-then-matmul
    would. `variant`: "fixup", "sweep" or "tuned" (None: FNLM_NF4_GEMV, default "fixup"; see
    the module docstring). `config` (rows per program, blocks per step, warps, splits) overrides the
    variant's choice (benchmarks, tests). Raises ArgumentError otherwise."""
    check_gemv(x, shape, blocksize, nested_blocksize)
    variant = gemv_variant(variant)
    n_out, n_in = shape
    if packed.data_ptr() % 4:
        raise ArgumentError("nf4_gemv: the packed weight must start on a 4-byte boundary")
    if x.stride(1) != 1 or x.stride(0) % 4 or x.data_ptr() % 8:
        x = x.contiguous()  # read 4 values at a time
    batch = x.shape[0]
    if batch == 0 or n_out == 0:
        return torch.empty((batch, n_out), dtype=x.dtype, device=x.device)
    nested_absmax, nested_code, offset, nested = _nested_args(
        absmax, nested_absmax, nested_code, offset
    )
    args = (x, packed, absmax, nested_absmax, nested_code, offset, nested, n_out, n_in,
            blocksize, nested_blocksize, bias)  # fmt: skip
    if config is None and variant == "tuned" and x.is_cuda:
        launch = lambda c: _launch(*args, c, True)  # noqa: E731
        config = _tuned_choice(n_out, n_in, batch, x.dtype, nested, x.device, blocksize, launch)
    if config is None:
        choose = _gemv_config if variant == "sweep" else _fixup_config
        config = choose(n_out, n_in, batch, x.device, blocksize)
    return _launch(*args, config, variant != "sweep")


def _launch(
    x, packed, absmax, nested_absmax, nested_code, offset, nested, n_out, n_in, blocksize,
    nested_blocksize, bias, config, in_kernel_sum: bool,
) -> torch.Tensor:  # fmt: skip
    """One launch of the kernel with `config`; splits summed in the kernel when
    `in_kernel_sum`, else by torch after it."""
    batch = x.shape[0]
    y = torch.empty((batch, n_out), dtype=x.dtype, device=x.device)
    block_n, block_blocks, num_warps, split_k = config
    block_b = triton.next_power_of_2(min(batch, GEMV_MAX_BATCH))
    row_blocks = n_in // blocksize
    blocks_per_split = triton.cdiv(triton.cdiv(row_blocks, split_k), block_blocks) * block_blocks
    split_k = triton.cdiv(row_blocks, blocks_per_split)
    partial = (
        torch.empty((split_k, batch, n_out), dtype=torch.float32, device=x.device)
        if split_k > 1
        else y
    )
    grid = (triton.cdiv(n_out, block_n), split_k, triton.cdiv(batch, block_b))
    fixup = split_k > 1 and in_kernel_sum
    # a zeroed count per tile (one small fill); unread without the fixup
    arrived = torch.zeros(grid[0] * grid[2], dtype=torch.int32, device=x.device) if fixup else y
    _nf4_gemv_kernel[grid](
        x, packed, absmax, nested_absmax, nested_code, offset, x if bias is None else bias, partial,
        y, arrived,
        batch, n_out, row_blocks, x.stride(0), n_out, batch * n_out, blocks_per_split, split_k, 0,
        NESTED=nested, HAS_BIAS=bias is not None, W_DTYPE=_TRITON_DTYPES[x.dtype],
        PARTIAL=split_k > 1, FIXUP=fixup, ASM=x.is_cuda, BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nested_blocksize, BLOCK_B=block_b, BLOCK_N=block_n,
        BLOCK_BLOCKS=block_blocks, num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    if split_k > 1 and not fixup:  # fp32 sum of the splits (+ bias), rounded once
        total = partial.sum(0)
        if bias is not None:
            total += bias.float()
        y.copy_(total)
    return y


# ----------------------------------------------------------------------------------------------
# Custom op (opaque to torch.compile; no autograd: the weight is frozen)
# ----------------------------------------------------------------------------------------------


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
        x, packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize,
        nested_blocksize, bias,
    )  # fmt: skip


@nf4_gemv_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize,
      nested_blocksize, bias):  # fmt: skip
    return x.new_empty((x.shape[0], shape[0]))


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def nf4_gemv_reference(
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
    """Plain-torch GEMV with the kernel's arithmetic (`dequantize_matmul_reference`), refusing
    what the kernel refuses."""
    check_gemv(x, shape, blocksize, nested_blocksize)
    return dequantize_matmul_reference(
        x, packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize,
        nested_blocksize, bias,
    )  # fmt: skip
