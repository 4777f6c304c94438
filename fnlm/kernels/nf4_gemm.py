"""NF4 small-batch GEMM: x [rows, in] @ W.T for a few dozen rows (batched decode, GRPO rollouts),
the NF4 weight dequantized tile by tile in registers and never written out.

Past `GEMV_MAX_BATCH` rows the decode GEMV stops paying and fnlm.quant dequantizes the whole weight
to 16 bits and calls cuBLAS: per linear that writes and reads back 2 bytes per weight, four times
the 0.5 byte the NF4 weight itself takes. Here each program dequantizes a [BLOCK_N, BLOCK_K] tile
of W (a 4-bit index per value looked up in the 16-entry table, times its quantization block's
absmax, rounded to x's dtype as the dequantize would round it) and feeds it to the tensor cores
against every row of x, so the ALU work per weight is amortized over the rows. The reduction over
`in` is split over SPLIT_K programs when the output tiles alone would not fill the GPU; their fp32
partials are summed by torch afterwards (deterministic, unlike atomics).

Equal to dequantize-then-matmul up to the order of the fp32 sums. Reached through
`fnlm.kernels.nf4_small_gemm`; fnlm.quant sends rows to it only where `FNLM_NF4_SMALL_GEMM`
enables it (not yet timed on a GPU; scripts/bench_quant.py --small-gemm times it).
"""

import torch
import triton
import triton.language as tl

from fnlm.errors import ArgumentError
from fnlm.kernels.nf4 import (
    _TRITON_DTYPES,
    _block_absmax,
    _interpreting,
    _nested_args,
    _round_fast,
    dequantize_matmul_reference,
)

SMALL_GEMM_MAX_ROWS = 128  # past this the dequantize's cost is small beside the GEMM's
_BLOCK_N, _BLOCK_K = 64, 128
_TARGET_PROGRAMS = 264  # two per SM of an H200


@triton.jit
def _nf4_gemm_kernel(
    X, PACKED, ABSMAX, NESTED_ABSMAX, NESTED_CODE, OFFSET, CODE, OUT,
    M, N, K, stride_xm, k_per_split,
    NESTED: tl.constexpr, W_DTYPE: tl.constexpr, BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    # OUT [SPLIT_K, M, N] fp32: program (n, m, s) sums x[m tile, k] * W[n tile, k] over its slice
    # of k. K is a multiple of BLOCKSIZE and BLOCK_K of it, so a tile's columns are whole
    # quantization blocks of one weight row: one absmax per (row, block).
    HALF: tl.constexpr = BLOCK_K // 2
    PER_ROW: tl.constexpr = BLOCK_K // BLOCKSIZE
    pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN] weight rows
    k_start = pid_s * k_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)  # fmt: skip
        # the tile's bytes: W[n, k0 + 2j] in the high nibble, W[n, k0 + 2j + 1] in the low one
        byte = (cols[:, None] * K + k0) // 2 + tl.arange(0, HALF)[None, :]  # [BN, HALF]
        live = (cols[:, None] < N) & (k0 + 2 * tl.arange(0, HALF)[None, :] < K)
        packed = tl.load(PACKED + byte, mask=live, other=0)
        values = tl.interleave(tl.load(CODE + (packed >> 4)), tl.load(CODE + (packed & 0xF)))
        block = (cols[:, None] * K + k0) // BLOCKSIZE + tl.arange(0, PER_ROW)[None, :]
        block_live = (cols[:, None] < N) & (k0 + BLOCKSIZE * tl.arange(0, PER_ROW)[None, :] < K)
        scale = _block_absmax(
            block, block_live, ABSMAX, NESTED_ABSMAX, NESTED_CODE, OFFSET, NESTED, NESTED_BLOCKSIZE
        )  # fmt: skip  [BN, PER_ROW]
        w = tl.reshape(
            tl.reshape(values, (BLOCK_N, PER_ROW, BLOCKSIZE)) * scale[:, :, None],
            (BLOCK_N, BLOCK_K),
        )
        w = tl.trans(_round_fast(w, W_DTYPE, not DOT_FP32))  # the hardware's RNE on a GPU
        if DOT_FP32:  # the interpreter's 16-bit dots are not exact: the same products in fp32
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x.to(W_DTYPE), w, acc)
    out = OUT + pid_s * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out, acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


def small_gemm_supported(rows: int, dtype: torch.dtype, shape, blocksize: int) -> bool:
    """Whether `nf4_small_gemm` takes x [rows, in] of `dtype` against an NF4 weight of `shape`
    [out, in] and `blocksize`: 16-bit x, whole quantization blocks per row that tile BLOCK_K."""
    return (
        1 <= rows <= SMALL_GEMM_MAX_ROWS
        and dtype in (torch.bfloat16, torch.float16)
        and len(shape) == 2
        and _BLOCK_K % blocksize == 0
        and shape[1] % blocksize == 0
    )


def check_small_gemm(x: torch.Tensor, shape, blocksize: int) -> None:
    """ArgumentError naming x's and the weight's shapes unless `small_gemm_supported`."""
    k = shape[1]
    if (
        x.dim() != 2
        or x.shape[1] != k
        or not small_gemm_supported(x.shape[0], x.dtype, shape, blocksize)
    ):
        raise ArgumentError(
            f"nf4_small_gemm: expected x [1..{SMALL_GEMM_MAX_ROWS}, {k}] in bf16/fp16 and whole "
            f"quantization blocks (blocksize dividing {_BLOCK_K} and the {k} inputs); got x "
            f"{tuple(x.shape)} {x.dtype}, weight {tuple(shape)}, blocksize {blocksize}"
        )


def nf4_small_gemm_fwd(
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
    """x [rows, in] @ dequantize(W).T (+ bias) -> [rows, out] in x's dtype (the NF4 layout of
    fnlm.kernels.nf4). Raises ArgumentError outside `small_gemm_supported`."""
    check_small_gemm(x, shape, blocksize)
    rows, n, k = x.shape[0], shape[0], shape[1]
    x = x.contiguous()
    block_m = max(16, triton.next_power_of_2(rows))
    tiles = triton.cdiv(n, _BLOCK_N) * triton.cdiv(rows, block_m)
    k_blocks = triton.cdiv(k, _BLOCK_K)
    split = max(1, min(k_blocks, _TARGET_PROGRAMS // max(tiles, 1)))
    k_per_split = triton.cdiv(k_blocks, split) * _BLOCK_K
    split = triton.cdiv(k, k_per_split)
    partial = torch.empty((split, rows, n), dtype=torch.float32, device=x.device)
    nested_absmax, nested_code, offset, nested = _nested_args(
        absmax, nested_absmax, nested_code, offset
    )
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(rows, block_m), split)
    _nf4_gemm_kernel[grid](
        x, packed, absmax, nested_absmax, nested_code, offset, code, partial,
        rows, n, k, x.stride(0), k_per_split,
        NESTED=nested, W_DTYPE=_TRITON_DTYPES[x.dtype], BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nested_blocksize, BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
        DOT_FP32=_interpreting(), num_warps=8 if block_m >= 128 else 4, num_stages=3,
    )  # fmt: skip
    out = partial[0] if split == 1 else partial.sum(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@torch.library.custom_op("fnlm::nf4_small_gemm", mutates_args=())
def nf4_small_gemm_op(
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
    """The small-batch NF4 GEMM as a custom op (see `nf4_small_gemm_fwd`): what
    `fnlm.kernels.nf4_small_gemm` calls under torch.compile."""
    return nf4_small_gemm_fwd(
        x, packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize,
        nested_blocksize, bias,
    )  # fmt: skip


@nf4_small_gemm_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize,
      nested_blocksize, bias):  # fmt: skip
    return x.new_empty((x.shape[0], shape[0]))


def nf4_small_gemm_reference(
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
    """Plain torch with the kernel's arithmetic (`dequantize_matmul_reference`), refusing what
    the kernel refuses."""
    check_small_gemm(x, shape, blocksize)
    return dequantize_matmul_reference(
        x, packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize,
        nested_blocksize, bias,
    )  # fmt: skip
