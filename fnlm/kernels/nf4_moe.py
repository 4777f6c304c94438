"""NF4 expert GEMV: each row times its own expert's matrix, read from a quantized expert stack.

A mixture-of-experts decode step has a few rows (tokens x experts per token), each for one of many
experts. Dequantizing the whole stack for a grouped GEMM reads and writes every expert; this
kernel reads only the chosen experts' 4-bit bytes, dequantizes them in registers (rounded to the
compute dtype, as dequantize-then-matmul would) and accumulates in fp32. The expert of each row is
read on the device, so a decode step that calls it can be captured in a CUDA graph.

The stack is the NF4 matrix [E·out, in] of `fnlm.models.moe` (see `fnlm.kernels.nf4` for the
layout); expert e's rows are e·out .. (e+1)·out - 1. It is given as `NF4Weight.tensors()` and
`.meta()`: [packed, absmax, code (, nested_absmax, nested_code, offset)] and
[rows, in, blocksize, nested_blocksize, nested]. Reached through `fnlm.kernels.nf4_expert_gemv`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fnlm.errors import ArgumentError
from fnlm.kernels.nf4 import _block_absmax, _nf4_value, _round_to, dequantize_nf4_reference

_OUT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _expert_gemv_kernel(
    X, OWNER, PACKED, ABSMAX, NESTED_ABSMAX, NESTED_CODE, OFFSET, OUT, N, K,
    NESTED: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, BN: tl.constexpr, BLOCKS: tl.constexpr,
):  # fmt: skip
    # One program: row `row` of x times BN output features of its expert's matrix, BLOCKS whole
    # quantization blocks of K per step as a [BN, BLOCKS, BLOCKSIZE / 2] tile of bytes: one absmax
    # per (feature, block), and each byte's high / low nibble meets x's even / odd element.
    HALF: tl.constexpr = BLOCKSIZE // 2
    row = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < N
    expert = tl.load(OWNER + row).to(tl.int64)
    blocks_per_row = K // BLOCKSIZE
    first_block = (expert * N + n.to(tl.int64)) * blocks_per_row  # [BN]
    b = tl.arange(0, BLOCKS)
    j = tl.arange(0, HALF)
    acc = tl.zeros([BN], dtype=tl.float32)
    for k_block in range(0, blocks_per_row, BLOCKS):
        kb = k_block + b  # [BLOCKS]
        b_ok = kb < blocks_per_row
        even = kb[:, None] * BLOCKSIZE + 2 * j[None, :]  # [BLOCKS, HALF] element index in the row
        x_even = tl.load(X + row * K + even, mask=b_ok[:, None], other=0.0).to(tl.float32)
        x_odd = tl.load(X + row * K + even + 1, mask=b_ok[:, None], other=0.0).to(tl.float32)
        block = first_block[:, None] + kb[None, :]  # [BN, BLOCKS] flat block index
        ok = n_ok[:, None] & b_ok[None, :]
        scale = _block_absmax(
            block, ok, ABSMAX, NESTED_ABSMAX, NESTED_CODE, OFFSET, NESTED, NESTED_BLOCKSIZE
        )[:, :, None]
        byte_index = block[:, :, None] * HALF + j[None, None, :]
        byte = tl.load(PACKED + byte_index, mask=ok[:, :, None], other=0)
        high = _round_to(_nf4_value(byte >> 4) * scale, OUT_DTYPE).to(tl.float32)
        low = _round_to(_nf4_value(byte & 0xF) * scale, OUT_DTYPE).to(tl.float32)
        part = high * x_even[None, :, :] + low * x_odd[None, :, :]
        acc += tl.sum(tl.sum(part, axis=2), axis=1)
    tl.store(OUT + row * N + n, _round_to(acc, OUT_DTYPE), mask=n_ok)


def expert_gemv_supported(x: torch.Tensor, w, experts: int) -> bool:
    """Whether `expert_gemv` takes x [rows, in] with the NF4 stack w: whole quantization blocks
    per row of each expert (in % blocksize == 0) and a float x."""
    return (
        getattr(w, "kind", None) == "nf4"
        and x.dtype in _OUT_DTYPES
        and x.dim() == 2
        and x.shape[1] == w.shape[1]
        and w.shape[1] % w.blocksize == 0
        and w.blocksize >= 2
        and w.blocksize & (w.blocksize - 1) == 0
        and w.shape[0] % experts == 0
    )


def check_expert_gemv(x: torch.Tensor, owner: torch.Tensor, w, experts: int) -> None:
    """Raise ArgumentError unless `expert_gemv_supported` and owner is [rows]."""
    if not expert_gemv_supported(x, w, experts):
        raise ArgumentError(
            f"expert_gemv: needs x [rows, {w.shape[1]}] (float) and an NF4 stack [E·out, in] with "
            f"in % blocksize == 0; got x {list(x.shape)} {x.dtype}, stack {list(w.shape)} "
            f"(blocksize {getattr(w, 'blocksize', None)}) for {experts} experts"
        )
    if owner.shape != (x.shape[0],):
        raise ArgumentError(f"expert_gemv: owner must be [{x.shape[0]}], got {list(owner.shape)}")


def expert_gemv_fwd(
    x: torch.Tensor, owner: torch.Tensor, weight: list[torch.Tensor], meta: list[int], experts: int
) -> torch.Tensor:
    """Launch the kernel: out[i] = x[i] @ W[owner[i]]^T, [rows, out] in x's dtype (x contiguous)."""
    rows, features, blocksize, nested_blocksize, nested = meta
    packed, absmax = weight[0], weight[1]
    nested_absmax, nested_code, offset = weight[3:6] if nested else (absmax, absmax, absmax)
    n_out = rows // experts
    out = torch.empty(x.shape[0], n_out, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    block_n = 32
    grid = (x.shape[0], triton.cdiv(n_out, block_n))
    _expert_gemv_kernel[grid](
        x, owner, packed, absmax, nested_absmax, nested_code, offset, out, n_out, features,
        NESTED=bool(nested), OUT_DTYPE=_OUT_DTYPES[x.dtype], BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nested_blocksize, BN=block_n, BLOCKS=max(1, 128 // blocksize),
        num_warps=4,
    )  # fmt: skip
    return out


@torch.library.custom_op("fnlm::nf4_expert_gemv", mutates_args=())
def expert_gemv_op(
    x: torch.Tensor, owner: torch.Tensor, weight: list[torch.Tensor], meta: list[int], experts: int
) -> torch.Tensor:
    """`expert_gemv_fwd` as a custom op (opaque to torch.compile, capturable in a CUDA graph)."""
    return expert_gemv_fwd(x, owner, weight, meta, experts)


@expert_gemv_op.register_fake
def _(x, owner, weight, meta, experts):
    return x.new_empty((x.shape[0], meta[0] // experts))


def expert_gemv_reference(
    x: torch.Tensor, owner: torch.Tensor, weight: list[torch.Tensor], meta: list[int], experts: int
) -> torch.Tensor:
    """Plain torch with the kernel's arithmetic: the stack dequantized and rounded to x's dtype,
    each row's products summed in fp32, one rounding into x's dtype."""
    rows, features, blocksize, nested_blocksize, nested = meta
    packed, absmax, code = weight[:3]
    nested_parts = weight[3:6] if nested else (None, None, None)
    stack = dequantize_nf4_reference(
        packed, absmax, code, *nested_parts, [rows, features], blocksize, nested_blocksize, x.dtype
    ).view(experts, rows // experts, features)
    y = torch.bmm(stack[owner].float(), x.float()[:, :, None])  # [rows of x, out, 1]
    return y[:, :, 0].to(x.dtype)
