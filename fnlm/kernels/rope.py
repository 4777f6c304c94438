"""Rotary position embedding for q and k in one launch: Triton kernel, custom op, reference.

cos/sin are per token ([batch, seq, rotary_dim // 2], fp32), so packed sequences and left padding
pass the rows of their own positions. The first rotary_dim dims of each head rotate, the rest pass
through (partial rotary). The backward is the same kernel rotating by -theta.
"""

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rope_one_tensor(
    X, OUT, x_base, out_base, stride_xh, stride_oh, n_heads, head_dim, half, cos, sin,
    INTERLEAVED: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
):  # fmt: skip
    heads = tl.arange(0, BLOCK_HEADS)
    i = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:  # pairs (x0, x1), (x2, x3), ... (GPT-J, Cohere)
        first, second = 2 * i, 2 * i + 1
    else:  # halves (x[:half], x[half:2*half]), transformers' rotate_half (Llama)
        first, second = i, i + half
    mask = (heads < n_heads)[:, None] & (i < half)[None, :]
    x_rows = X + x_base + heads[:, None] * stride_xh
    o_rows = OUT + out_base + heads[:, None] * stride_oh
    x1 = tl.load(x_rows + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + second[None, :], mask=mask, other=0.0).to(tl.float32)
    out_dtype = OUT.dtype.element_ty
    tl.store(
        o_rows + first[None, :], (x1 * cos[None, :] - x2 * sin[None, :]).to(out_dtype), mask=mask
    )
    tl.store(
        o_rows + second[None, :], (x2 * cos[None, :] + x1 * sin[None, :]).to(out_dtype), mask=mask
    )
    if BLOCK_REST > 0:  # partial rotary: the dims after rotary_dim are copied unchanged
        rest = 2 * half + tl.arange(0, BLOCK_REST)
        rest_mask = (heads < n_heads)[:, None] & (rest < head_dim)[None, :]
        x = tl.load(x_rows + rest[None, :], mask=rest_mask, other=0.0)
        tl.store(o_rows + rest[None, :], x.to(out_dtype), mask=rest_mask)


@triton.jit
def _rope_kernel(
    Q, K, Q_OUT, K_OUT, COS, SIN,
    seq_len, n_q_heads, n_k_heads, head_dim, half,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_qob, stride_qos, stride_qoh, stride_kob, stride_kos, stride_koh,
    stride_cb, stride_cs, sin_sign,
    INTERLEAVED: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
):  # fmt: skip
    # One program per token: its cos/sin row is read once and applied to every q and k head.
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    i = tl.arange(0, BLOCK_HALF)
    cos = tl.load(COS + b * stride_cb + s * stride_cs + i, mask=i < half, other=0.0).to(tl.float32)
    sin = sin_sign * tl.load(SIN + b * stride_cb + s * stride_cs + i, mask=i < half, other=0.0).to(
        tl.float32
    )
    _rope_one_tensor(
        Q, Q_OUT, b * stride_qb + s * stride_qs, b * stride_qob + s * stride_qos, stride_qh, stride_qoh,
        n_q_heads, head_dim, half, cos, sin, INTERLEAVED, BLOCK_Q_HEADS, BLOCK_HALF, BLOCK_REST,
    )  # fmt: skip
    _rope_one_tensor(
        K, K_OUT, b * stride_kb + s * stride_ks, b * stride_kob + s * stride_kos, stride_kh, stride_koh,
        n_k_heads, head_dim, half, cos, sin, INTERLEAVED, BLOCK_K_HEADS, BLOCK_HALF, BLOCK_REST,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [b, s, hq, d] and k [b, s, hk, d] by the angles of cos/sin [b or 1, s, r/2].

    inverse=True rotates by -theta, which is the backward (the rotation's transpose).
    Returns new contiguous tensors in the dtypes of q and k.
    """
    q, k, cos, sin = (_unit_last_stride(t) for t in (q, k, cos, sin))
    batch, seq_len, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[2]
    half = cos.shape[-1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    if sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    # a cos table with batch 1 serves every batch row (stride 0), as broadcasting would
    stride_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    rest = head_dim - 2 * half
    block_elements = triton.next_power_of_2(max(n_q_heads, 1)) * triton.next_power_of_2(half)
    _rope_kernel[(batch * seq_len,)](
        q, k, q_out, k_out, cos, sin,
        seq_len, n_q_heads, n_k_heads, head_dim, half,
        *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
        stride_cb, cos.stride(1), -1.0 if inverse else 1.0,
        INTERLEAVED=interleaved,
        BLOCK_Q_HEADS=triton.next_power_of_2(max(n_q_heads, 1)),
        BLOCK_K_HEADS=triton.next_power_of_2(max(n_k_heads, 1)),
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_REST=triton.next_power_of_2(rest) if rest > 0 else 0,
        num_warps=min(8, max(1, block_elements // 256)),
    )  # fmt: skip
    return q_out, k_out


# ----------------------------------------------------------------------------------------------
# Custom op (its backward is itself with inverse flipped)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fnlm::rope", mutates_args=())
def rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RoPE for q and k in one launch. Call through `fnlm.kernels.apply_rope`."""
    return rope_fwd(q, k, cos, sin, interleaved, inverse)


@rope_op.register_fake
def _(q, k, cos, sin, interleaved, inverse):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, interleaved, inverse = inputs
    ctx.interleaved, ctx.inverse = interleaved, inverse
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        ctx.save_for_backward(cos, sin, q, k)
    else:
        ctx.save_for_backward(cos, sin)


def _backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors[:2]
    dq, dk = rope_op(grad_q, grad_k, cos, sin, ctx.interleaved, not ctx.inverse)
    grad_cos = grad_sin = None
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        # Rare (learned angles): out1 = x1 c - x2 s, out2 = x2 c + x1 s, summed over heads.
        q, k = ctx.saved_tensors[2:]
        sign = -1.0 if ctx.inverse else 1.0
        grad_cos = torch.zeros_like(cos, dtype=torch.float32).expand(q.shape[0], -1, -1).clone()
        grad_sin = torch.zeros_like(grad_cos)
        for x, g in ((q, grad_q), (k, grad_k)):
            x1, x2 = _pair(x.float(), cos.shape[-1], ctx.interleaved)
            g1, g2 = _pair(g.float(), cos.shape[-1], ctx.interleaved)
            grad_cos += (g1 * x1 + g2 * x2).sum(2)
            grad_sin += sign * (g2 * x1 - g1 * x2).sum(2)
        grad_cos = grad_cos.sum(0, keepdim=True) if cos.shape[0] == 1 else grad_cos
        grad_sin = grad_sin.sum(0, keepdim=True) if sin.shape[0] == 1 else grad_sin
        grad_cos, grad_sin = grad_cos.to(cos.dtype), grad_sin.to(sin.dtype)
    return dq, dk, grad_cos, grad_sin, None, None


rope_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def _pair(x: torch.Tensor, half: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two members of every rotated pair of the first 2 * half dims."""
    if interleaved:
        return x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
    return x[..., :half], x[..., half : 2 * half]


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    half = cos.shape[-1]
    compute = torch.promote_types(x.dtype, torch.float32)  # fp64 stays fp64 (the tests' truth)
    cos, sin = cos[:, :, None, :].to(compute), sin[:, :, None, :].to(compute)
    xf = x.to(compute)
    x1, x2 = _pair(xf, half, interleaved)
    out1, out2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if interleaved:
        rotated = torch.stack((out1, out2), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((out1, out2), dim=-1)
    return torch.cat((rotated, xf[..., 2 * half :]), dim=-1).to(x.dtype)


def apply_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first 2 * cos.shape[-1] dims of every head of q and k; fp32 math, one rounding.

    transformers multiplies in the q/k dtype (it casts cos/sin to bf16 first); computing in fp32
    and rounding once is at least as accurate and agrees exactly in fp32.
    """
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
