"""Gated linear units act(gate) * up (SwiGLU, GeGLU exact and tanh): Triton kernels, custom op, reference.

The forward computes in fp32 and rounds once; the backward recomputes act(gate) from gate and up,
so nothing but the two inputs is kept for it (no activation product is stored).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# activation codes of the kernels' ACTIVATION argument
_ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
# constants the kernels read (Triton only reads module globals declared constexpr)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_GELU_TANH_CUBIC = tl.constexpr(0.044715)

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def accurate_tanh(x):
    """tanh to ~2 ulp relative error, in kernels the interpreter can also run (Triton has no
    portable tanh). 2 * sigmoid(2x) - 1 has 1e-7 *absolute* error, too coarse where the result is
    small and then scaled up (logit soft-capping, the gelu slope); below |x| = 0.625 Cephes'
    tanhf polynomial keeps the relative error. Also used by cross_entropy.py."""
    z = x * x
    small = (
        (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1)
        * z
        - 3.33332819422e-1
    ) * z * x + x
    large = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(x)) + 1.0)
    return tl.where(tl.abs(x) < 0.625, small, tl.where(x < 0, -large, large))


@triton.jit
def _activation_and_slope(g, ACTIVATION: tl.constexpr):
    """act(g) and act'(g) in fp32."""
    if ACTIVATION == 0:  # silu(g) = g * sigmoid(g)
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    elif ACTIVATION == 1:  # exact gelu: g * Phi(g)
        cdf = 0.5 * (1.0 + tl.math.erf(g * _INV_SQRT_2))
        return g * cdf, cdf + g * tl.exp(-0.5 * g * g) * _INV_SQRT_2PI
    else:  # tanh gelu
        # tensor first: constexpr * tensor stays a constexpr in the interpreter
        t = accurate_tanh((g + g * g * g * _GELU_TANH_CUBIC) * _SQRT_2_OVER_PI)
        slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (
            1.0 + 3.0 * _GELU_TANH_CUBIC * g * g
        )
        return 0.5 * g * (1.0 + t), slope


@triton.jit
def _glu_fwd_kernel(
    GATE, UP, OUT, stride_gate, stride_up, stride_out, n_cols,
    ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(GATE + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation_and_slope(g, ACTIVATION)
    tl.store(OUT + row * stride_out + cols, (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    DOUT, GATE, UP, DGATE, DUP, stride_dout, stride_gate, stride_up, stride_dgate, stride_dup, n_cols,
    ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dout = tl.load(DOUT + row * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    act, slope = _activation_and_slope(g, ACTIVATION)
    tl.store(
        DGATE + row * stride_dgate + cols, (dout * u * slope).to(DGATE.dtype.element_ty), mask=mask
    )
    tl.store(DUP + row * stride_dup + cols, (dout * act).to(DUP.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_BLOCK = 1024


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [rows, n] with unit column stride; row-strided views (halves of a fused
    gate_up projection) stay views."""
    t = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t if t.stride(-1) == 1 else t.contiguous()


def glu_fwd(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Launch the forward kernel: act(gate) * up, shaped and typed like gate."""
    gate2, up2 = _as_rows(gate), _as_rows(up)
    n_rows, n_cols = gate2.shape
    out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if out.numel():
        _glu_fwd_kernel[(n_rows, triton.cdiv(n_cols, _BLOCK))](
            gate2, up2, out, gate2.stride(0), up2.stride(0), out.stride(0), n_cols,
            ACTIVATION=_ACTIVATIONS[activation], BLOCK=_BLOCK, num_warps=4,
        )  # fmt: skip
    return out.view(gate.shape)


def glu_bwd(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: (grad_gate, grad_up)."""
    dout2, gate2, up2 = _as_rows(grad_out), _as_rows(gate), _as_rows(up)
    n_rows, n_cols = gate2.shape
    dgate = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    dup = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    if dgate.numel():
        _glu_bwd_kernel[(n_rows, triton.cdiv(n_cols, _BLOCK))](
            dout2, gate2, up2, dgate, dup,
            dout2.stride(0), gate2.stride(0), up2.stride(0), dgate.stride(0), dup.stride(0), n_cols,
            ACTIVATION=_ACTIVATIONS[activation], BLOCK=_BLOCK, num_warps=4,
        )  # fmt: skip
    return dgate.view(gate.shape), dup.view(up.shape)


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fnlm::glu", mutates_args=())
def glu_op(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Triton act(gate) * up; activation "silu" | "gelu" | "gelu_tanh". Call through
    `fnlm.kernels.swiglu` / `geglu`."""
    return glu_fwd(gate, up, activation)


@glu_op.register_fake
def _(gate, up, activation):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("fnlm::glu_backward", mutates_args=())
def glu_backward_op(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward of act(gate) * up: (grad_gate, grad_up)."""
    return glu_bwd(grad_out, gate, up, activation)


@glu_backward_op.register_fake
def _(grad_out, gate, up, activation):
    return (
        torch.empty_like(gate, memory_format=torch.contiguous_format),
        torch.empty_like(up, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    dgate, dup = glu_backward_op(grad_out, gate, up, ctx.activation)
    return dgate, dup, None


glu_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed as transformers does (in the input dtype)."""
    return F.silu(gate) * up


def geglu_reference(
    gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh"
) -> torch.Tensor:
    """gelu(gate) * up with gelu exact ("none") or tanh-approximated ("tanh")."""
    return F.gelu(gate, approximate=approximate) * up
