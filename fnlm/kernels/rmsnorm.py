"""RMSNorm: Triton forward and backward (with the weight gradient), its custom op, its reference.

y = x * rsqrt(mean(x^2) + eps), scaled by `weight` (Llama, Qwen, Mistral: offset 0) or by
`1 + weight` (Gemma: offset 1). Statistics are always fp32, also for bf16/fp16 inputs.
"""

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    stride_x, stride_y, n_rows, n_cols, eps, offset,
    OFFSET_ZERO: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None]
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    if OFFSET_ZERO:
        # transformers rounds the normalized x to the input dtype before the weight multiplies it
        y = y.to(X.dtype.element_ty).to(tl.float32) * w[None, :]
    else:
        y = y * (offset + w[None, :])
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_x, stride_dx, n_rows, n_cols, offset, rows_per_program,
    OFFSET_ZERO: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    # Persistent: each program walks `rows_per_program` rows and keeps its own fp32 partial sum of
    # the weight gradient, so the reduction over rows needs no atomics (summed by the launcher).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale = w if OFFSET_ZERO else offset + w
    dw = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < last
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]
        if COMPUTE_DW:
            if OFFSET_ZERO:
                dw += tl.sum(dy * x_hat.to(X.dtype.element_ty).to(tl.float32), axis=0)
            else:
                dw += tl.sum(dy * x_hat, axis=0)
        # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat)), g = dy * scale
        g = dy * scale[None, :]
        dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None])
        tl.store(
            DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask
        )
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [rows, n] with unit column stride (a view when the layout allows)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_shape(n_cols: int) -> tuple[int, int, int]:
    """(rows per block, columns per block, warps): at least ~2K elements per block for small rows."""
    block_cols = triton.next_power_of_2(n_cols)
    block_rows = max(1, min(16, 2048 // block_cols))
    num_warps = min(16, max(1, block_cols * block_rows // 256))
    return block_rows, block_cols, num_warps


def _num_programs(device: torch.device) -> int:
    if device.type == "cuda":
        # 2 per SM measured best on an H100 at 8192 x 4096 bf16 (86 us; 4 per SM: 98 us)
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another; few keep the Python overhead low


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: returns (y shaped like x, rstd [rows] fp32)."""
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if offset == 0.0 else x.dtype
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_rows, block_cols, num_warps = _block_shape(n_cols)
    grid = (triton.cdiv(n_rows, block_rows),)
    _rms_norm_fwd_kernel[grid](
        x2, weight, y, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps, offset,
        OFFSET_ZERO=offset == 0.0, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps,
    )  # fmt: skip
    return y.view(x.shape), rstd


def rms_norm_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: returns (grad_x shaped like x, grad_weight or an empty tensor)."""
    x2, dy2 = _as_rows(x), _as_rows(grad_y)
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block_rows, block_cols, num_warps = _block_shape(n_cols)
    n_programs = max(1, min(_num_programs(x.device), triton.cdiv(n_rows, block_rows)))
    rows_per_program = triton.cdiv(n_rows, n_programs)
    dw_partial = torch.empty(
        (n_programs, n_cols) if compute_dw else (0,), dtype=torch.float32, device=x.device
    )
    _rms_norm_bwd_kernel[(n_programs,)](
        dy2, x2, weight, rstd, dx, dw_partial,
        dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, offset, rows_per_program,
        OFFSET_ZERO=offset == 0.0, COMPUTE_DW=compute_dw,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps,
    )  # fmt: skip
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else dw_partial
    return dx.view(x.shape), dw


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, differentiable through register_autograd)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fnlm::rms_norm", mutates_args=())
def rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm forward; returns (y, rstd). Call through `fnlm.kernels.rms_norm`."""
    return rms_norm_fwd(x, weight, eps, offset)


@rms_norm_op.register_fake
def _(x, weight, eps, offset):
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if offset == 0.0 else x.dtype
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(
        x.numel() // x.shape[-1], dtype=torch.float32
    )


@torch.library.custom_op("fnlm::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm backward; returns (grad_x, grad_weight or an empty tensor)."""
    return rms_norm_bwd(grad_y, x, weight, rstd, offset, compute_dw)


@rms_norm_backward_op.register_fake
def _(grad_y, x, weight, rstd, offset, compute_dw):
    return torch.empty_like(x), weight.new_empty(weight.shape if compute_dw else (0,))


def _setup_context(ctx, inputs, output):
    x, weight, _, offset = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset = offset
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    compute_dw = ctx.needs_input_grad[1]
    dx, dw = rms_norm_backward_op(grad_y, x, weight, rstd, ctx.offset, compute_dw)
    return dx, (dw if compute_dw else None), None, None


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> torch.Tensor:
    """RMSNorm exactly as transformers computes it (fp32 statistics, then the dtype dance).

    fp64 inputs stay fp64 throughout (the tests' truth).
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * y.to(x.dtype)
    return (y * (offset + weight.to(xf.dtype))).to(x.dtype)
