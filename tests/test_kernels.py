"""Every kernel against its plain-torch reference: forward and all gradients.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest) with the backend forced to
"triton"; the @pytest.mark.gpu tests repeat the comparisons with larger sizes on CUDA.

Tolerances are earned: the truth is the reference on fp64 copies of the inputs, and the kernel's
largest error may exceed the largest error of the reference run in the tested dtype itself (plain
torch's own error, fp32 included) by at most ULP_SLACK units of the dtype's eps times the largest
magnitude of the truth.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fnlm.kernels as K
from fnlm.errors import ArgumentError

# The interpreter's sigmoid overflows exp() for very negative inputs and returns the right limit (0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# Allowed excess over plain torch's own error, in eps(dtype) x max|truth|:
# - fp32: the kernels reassociate sums of at most a few hundred terms and use rsqrt / exp / tanh
#   of other libraries than torch: a few ulps of the terms. Gradients that are sums cancelling to
#   a result ~10x smaller than their terms (softmax gradients sum to zero; RMSNorm's dx removes the
#   component along x) turn that into a few dozen ulps of the result: 32 (4e-6 relative).
# - bf16: the Triton interpreter (CPU tests) truncates fp32 -> bf16 instead of rounding to nearest
#   (triton/runtime/interpreter.py cast_impl), so each rounding costs up to 1 ulp instead of 0.5,
#   and RMSNorm rounds twice (x_hat to bf16, then the product), as transformers does: 2 ulps.
# - fp16: numpy rounds to nearest; 1 ulp covers the kernels' single rounding.
ULP_SLACK = {torch.float32: 32.0, torch.bfloat16: 2.0, torch.float16: 1.0}
# The fused cross-entropy accumulates grad_weight in the weight dtype, one rounding per token
# chunk (Liger-Kernel does the same, to save an fp32 copy of the lm_head): half an ulp per chunk.
ULP_PER_CHUNK = 0.5
# Its gradients are made in the forward for d(loss) = 1, rounded to the dtype, and multiplied by
# the incoming gradient in the backward: one rounding more than autograd's path, where the incoming
# gradient multiplies before the rounding.
ULP_RESCALE = 1.0

dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
# The kernels are cheap even interpreted (~0.1 s an example): more examples than the CI profile's 6.
kernel_examples = settings(max_examples=max(20, settings.default.max_examples))


def assert_earned(
    name: str,
    kernel: torch.Tensor,
    lowp: torch.Tensor,
    truth: torch.Tensor,
    dtype,
    extra_ulps=0.0,
    term_scale=0.0,
):
    """max|kernel - truth| <= max|lowp - truth| + (ULP_SLACK + extra) * eps * scale, where scale is
    max|truth|, or the magnitude of the terms that a cancelling sum adds up (term_scale) if larger."""
    assert kernel.shape == truth.shape, (
        f"{name}: shape {tuple(kernel.shape)} != {tuple(truth.shape)}"
    )
    truth = truth.double()
    err_kernel = (kernel.double() - truth).abs().max().item() if truth.numel() else 0.0
    err_torch = (lowp.double() - truth).abs().max().item() if truth.numel() else 0.0
    scale = max(truth.abs().max().item() if truth.numel() else 0.0, term_scale)
    bound = err_torch + (ULP_SLACK[dtype] + extra_ulps) * torch.finfo(dtype).eps * scale + 1e-30
    assert err_kernel <= bound, (
        f"{name} ({dtype}): kernel error {err_kernel:.3g} > {bound:.3g} (torch's own {err_torch:.3g}, scale {scale:.3g})"
    )


def grads(out, inputs, grad_out):
    """Gradients of <out, grad_out> w.r.t. inputs (None for those that do not require grad)."""
    outs = out if isinstance(out, tuple) else (out,)
    gouts = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    wanted = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad(outs, wanted, [g.to(o.dtype) for o, g in zip(outs, gouts)]))
    return [next(got) if t.requires_grad else None for t in inputs]


def leaf(t: torch.Tensor, dtype=None, requires_grad=True) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).requires_grad_(requires_grad)


def compare(
    name, fn_kernel, fn_reference, inputs, grad_out_fn, dtype, extra_ulps=None, term_scales=None
):
    """Run the kernel in dtype, the reference in dtype and the reference in fp64 (the truth) on the
    same values; compare outputs and every gradient. inputs: fp32 tensors (requires_grad marks
    the differentiable ones)."""
    extra_ulps, term_scales = extra_ulps or {}, term_scales or {}
    low = [leaf(t, dtype if t.is_floating_point() else None, t.requires_grad) for t in inputs]
    high = [
        leaf(t, torch.float64 if t.is_floating_point() else None, t.requires_grad) for t in inputs
    ]
    low_ref = [leaf(t, None, t.requires_grad) for t in low]
    out_kernel = fn_kernel(*low)
    out_lowp = fn_reference(*low_ref)
    out_truth = fn_reference(*high)
    outs_k = out_kernel if isinstance(out_kernel, tuple) else (out_kernel,)
    outs_l = out_lowp if isinstance(out_lowp, tuple) else (out_lowp,)
    outs_t = out_truth if isinstance(out_truth, tuple) else (out_truth,)
    for i, (k, lo, t) in enumerate(zip(outs_k, outs_l, outs_t)):
        assert k.dtype == lo.dtype, (
            f"{name} output {i}: dtype {k.dtype}, reference gives {lo.dtype}"
        )
        assert_earned(f"{name} output {i}", k, lo, t, dtype)
    grad_out = grad_out_fn(outs_t)
    for i, (gk, gl, gt) in enumerate(
        zip(
            grads(out_kernel, low, grad_out),
            grads(out_lowp, low_ref, grad_out),
            grads(out_truth, high, grad_out),
        )
    ):
        if gt is None:
            continue
        assert gk is not None and gk.dtype == low[i].dtype, (
            f"{name}: gradient of input {i} missing or of wrong dtype"
        )
        assert_earned(
            f"{name} grad of input {i}",
            gk,
            gl,
            gt,
            dtype,
            extra_ulps.get(i, 0.0),
            term_scales.get(i, 0.0),
        )


def random_like_outputs(outs, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(o.shape, generator=g).to(o.device) for o in outs)


@contextlib.contextmanager
def triton_backend():
    with K.kernel_backend("triton"):
        yield


def randn(*shape, seed, scale=1.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device)


# ------------------------------------------------------------------------------------------------
# The door: one file per op, each with its four parts
# ------------------------------------------------------------------------------------------------


def test_every_kernel_file_has_kernels_launchers_a_custom_op_and_a_reference():
    """Liger-Kernel's layout: a kernel file holds its @triton.jit kernels, the custom-op
    registration and a plain-torch reference (a function named *_reference); fnlm.kernels is the
    door, so each file's reference is reachable and tested from here. A private module (a leading
    underscore, e.g. _nf4_gemv_config.py: the GEMV's launch configurations) serves one kernel file
    and holds no kernel of its own."""
    folder = Path(K.__file__).parent
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        decorators = [ast.unparse(d) for f in functions for d in f.decorator_list]
        assert "triton.jit" in decorators, f"{path.name} has no @triton.jit kernel"
        assert any(d.startswith("torch.library.custom_op") for d in decorators), (
            f"{path.name} registers no torch custom op"
        )
        assert any(f.name.endswith("_reference") for f in functions), (
            f"{path.name} has no plain-torch *_reference"
        )


# ------------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------------


def check_rms_norm(lead, hidden, dtype, offset, weight_fp32, seed):
    x = randn(*lead, hidden, seed=seed, scale=3.0)
    w = randn(hidden, seed=seed + 1, scale=0.2) + (0.0 if offset else 1.0)
    eps = 1e-5

    def kernel(x, w):
        with triton_backend():
            return K.rms_norm(x, w, eps, offset=offset)

    def reference(x, w):
        return K.rms_norm_reference(x, w, eps, offset)

    if weight_fp32:  # fp32 weight with a low-precision input: the output promotes to fp32
        x_low = leaf(x, dtype)
        w32 = leaf(w)
        out = kernel(x_low, w32)
        ref = reference(leaf(x_low), leaf(w32))
        assert out.dtype == ref.dtype == (torch.float32 if offset == 0 else dtype)
        g = randn(*out.shape, seed=seed + 2).to(out.dtype)
        gk = torch.autograd.grad(out, (x_low, w32), g)
        x_ref, w_ref = leaf(x_low), leaf(w32)
        gr = torch.autograd.grad(reference(x_ref, w_ref), (x_ref, w_ref), g)
        assert_earned("rms_norm out (fp32 weight)", out, ref, ref, dtype)
        for name, a, b in zip(("dx", "dw"), gk, gr):
            assert_earned(f"rms_norm {name} (fp32 weight)", a, b, b, dtype)
        return
    compare(
        "rms_norm",
        kernel,
        reference,
        [x.requires_grad_(), w.requires_grad_()],
        random_like_outputs,
        dtype,
    )


@kernel_examples
@given(
    lead=st.lists(st.integers(1, 7), min_size=1, max_size=2),
    # hidden 1 is degenerate (y = sign(x), whose gradient is pure cancellation): from 2 up
    hidden=st.integers(2, 300),
    dtype=dtypes,
    offset=st.sampled_from([0.0, 1.0]),
    weight_fp32=st.booleans(),
)
def test_rms_norm(lead, hidden, dtype, offset, weight_fp32):
    check_rms_norm(lead, hidden, dtype, offset, weight_fp32 and dtype != torch.float32, seed=hidden)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(4, 1000, 4096), (3, 77, 128), (513, 5120)])
def test_rms_norm_gpu(shape, dtype, offset):
    check_rms_norm(list(shape[:-1]), shape[-1], dtype, offset, False, seed=shape[-1])


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------


def check_rope(
    batch,
    seq,
    q_heads,
    kv_heads,
    head_dim,
    rotary_half,
    interleaved,
    cos_batch,
    fused_qkv,
    dtype,
    seed,
):
    total = q_heads + 2 * kv_heads
    qkv = randn(batch, seq, total, head_dim, seed=seed)
    angles = randn(cos_batch, seq, rotary_half, seed=seed + 1, scale=3.0)
    cos, sin = angles.cos(), angles.sin()

    def split(qkv):
        if fused_qkv:  # strided views into one projection, as a fused qkv linear gives them
            return qkv[:, :, :q_heads], qkv[:, :, q_heads : q_heads + kv_heads]
        return qkv[:, :, :q_heads].contiguous(), qkv[
            :, :, q_heads : q_heads + kv_heads
        ].contiguous()

    def kernel(qkv, cos, sin):
        with triton_backend():
            return K.apply_rope(*split(qkv), cos, sin, interleaved=interleaved)

    def reference(qkv, cos, sin):
        return K.apply_rope_reference(*split(qkv), cos, sin, interleaved)

    # cos/sin stay fp32 in every run (the API's contract); only q and k take the tested dtype
    compare(
        "apply_rope",
        lambda qkv: kernel(qkv, cos, sin),
        lambda qkv: reference(qkv, cos, sin),
        [qkv.requires_grad_()],
        random_like_outputs,
        dtype,
    )


@kernel_examples
@given(
    batch=st.integers(1, 2),
    seq=st.integers(1, 5),
    q_heads=st.integers(1, 5),
    kv_heads=st.integers(1, 3),
    head_dim=st.integers(1, 12).map(lambda n: 2 * n),
    rotary_fraction=st.sampled_from([1.0, 0.5, 0.25]),
    interleaved=st.booleans(),
    cos_batch_one=st.booleans(),
    fused_qkv=st.booleans(),
    dtype=dtypes,
)
def test_apply_rope(
    batch,
    seq,
    q_heads,
    kv_heads,
    head_dim,
    rotary_fraction,
    interleaved,
    cos_batch_one,
    fused_qkv,
    dtype,
):
    rotary_half = max(1, int(head_dim * rotary_fraction) // 2)
    check_rope(
        batch,
        seq,
        q_heads,
        kv_heads,
        head_dim,
        rotary_half,
        interleaved,
        1 if cos_batch_one else batch,
        fused_qkv,
        dtype,
        seed=head_dim,
    )


def test_apply_rope_angle_gradients():
    """cos/sin gradients (learned angles are rare, but a gradient must never be silently wrong)."""
    q, k = randn(2, 3, 4, 10, seed=1), randn(2, 3, 2, 10, seed=2)
    for interleaved in (False, True):
        for cos_batch in (1, 2):
            angles = randn(cos_batch, 3, 4, seed=3)
            ins = [leaf(t) for t in (q, k, angles.cos(), angles.sin())]
            refs = [leaf(t) for t in ins]
            with triton_backend():
                out = K.apply_rope(*ins, interleaved=interleaved)
            ref = K.apply_rope_reference(*refs, interleaved=interleaved)
            g = random_like_outputs(ref, seed=4)
            for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, refs, g)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rope_gpu(dtype, interleaved):
    check_rope(2, 1024, 32, 8, 128, 64, interleaved, 2, True, dtype, seed=0)
    check_rope(3, 77, 12, 4, 80, 20, interleaved, 1, False, dtype, seed=1)  # partial rotary


# ------------------------------------------------------------------------------------------------
# SwiGLU / GeGLU
# ------------------------------------------------------------------------------------------------

GLU = {
    "swiglu": (lambda g, u: K.swiglu(g, u), lambda g, u: K.swiglu_reference(g, u)),
    "geglu_tanh": (
        lambda g, u: K.geglu(g, u, approximate="tanh"),
        lambda g, u: K.geglu_reference(g, u, "tanh"),
    ),
    "geglu_exact": (
        lambda g, u: K.geglu(g, u, approximate="none"),
        lambda g, u: K.geglu_reference(g, u, "none"),
    ),
}


def check_glu(kind, shape, fused, dtype, seed):
    fn_kernel, fn_reference = GLU[kind]
    gate_up = randn(*shape[:-1], 2 * shape[-1], seed=seed, scale=3.0)

    def split(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)  # strided views, as from a fused gate_up projection
        return (gate, up) if fused else (gate.contiguous(), up.contiguous())

    def kernel(gate_up):
        with triton_backend():
            return fn_kernel(*split(gate_up))

    compare(
        kind,
        kernel,
        lambda gu: fn_reference(*split(gu)),
        [gate_up.requires_grad_()],
        random_like_outputs,
        dtype,
    )


@kernel_examples
@given(
    kind=st.sampled_from(sorted(GLU)),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=2).flatmap(
        lambda lead: st.integers(1, 1500).map(lambda n: (*lead, n))
    ),
    fused=st.booleans(),
    dtype=dtypes,
)
def test_glu(kind, shape, fused, dtype):
    check_glu(kind, shape, fused, dtype, seed=shape[-1])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", sorted(GLU))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_glu_gpu(kind, dtype):
    check_glu(kind, (4, 512, 2816), True, dtype, seed=0)
    check_glu(kind, (77, 1001), False, dtype, seed=1)


# ------------------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# ------------------------------------------------------------------------------------------------


def lowp_cross_entropy(hidden, weight, labels, bias, reduction, softcap, logit_scale):
    """Plain torch as a model would do it in low precision: the matmul in the dtype, then the
    loss on fp32 logits (transformers upcasts logits before its loss)."""
    from fnlm.kernels.cross_entropy import cross_entropy_from_logits_reference

    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return cross_entropy_from_logits_reference(
        logits.float(), labels, -100, reduction, softcap, logit_scale
    )


def check_cross_entropy(
    n,
    hidden_size,
    vocab,
    dtype,
    reduction,
    softcap,
    logit_scale,
    with_bias,
    ignored,
    chunk_rows,
    trainable,
    backend,
    seed,
):
    hidden = randn(n, hidden_size, seed=seed)
    weight = randn(vocab, hidden_size, seed=seed + 1, scale=hidden_size**-0.5 * 4)
    bias = randn(vocab, seed=seed + 2) if with_bias else None
    g = torch.Generator().manual_seed(seed + 3)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    labels = labels.to(hidden.device)
    inputs = [hidden.requires_grad_(), weight.requires_grad_(trainable)] + (
        [bias.requires_grad_(trainable)] if with_bias else []
    )

    def kernel(hidden, weight, *maybe_bias):
        with K.kernel_backend(backend):
            return K.fused_linear_cross_entropy(
                hidden, weight, labels, bias=maybe_bias[0] if maybe_bias else None, reduction=reduction,
                softcap=softcap, logit_scale=logit_scale, chunk_rows=chunk_rows,
            )  # fmt: skip

    def reference(hidden, weight, *maybe_bias):
        b = maybe_bias[0] if maybe_bias else None
        if hidden.dtype in (torch.float32, torch.float64):
            return K.fused_linear_cross_entropy_reference(
                hidden, weight, labels, b, -100, reduction, softcap, logit_scale
            )
        return lowp_cross_entropy(hidden, weight, labels, b, reduction, softcap, logit_scale)

    n_chunks = -(-n // chunk_rows) if chunk_rows else 1
    # The gradients are sums over d loss / d logits, whose rows sum to zero and so cancel: measure
    # them against the size of their terms.
    from fnlm.kernels.cross_entropy import cross_entropy_from_logits_reference

    logits = hidden.double() @ weight.double().T + (bias.double() if with_bias else 0.0)
    logits.requires_grad_()
    ref_loss = cross_entropy_from_logits_reference(
        logits, labels, -100, reduction, softcap, logit_scale
    )
    (dlogits,) = torch.autograd.grad(ref_loss * 1.7, logits)
    dlogits = dlogits.abs()
    term_scales = {
        0: (dlogits @ weight.double().abs()).max().item(),
        1: (dlogits.T @ hidden.double().abs()).max().item(),
        2: dlogits.sum(0).max().item(),
    }
    compare(
        "fused_linear_cross_entropy", kernel, reference, inputs,
        lambda outs: (torch.tensor(1.7, device=DEVICE),), dtype,
        extra_ulps={0: ULP_RESCALE, 1: ULP_RESCALE + ULP_PER_CHUNK * n_chunks, 2: ULP_RESCALE}, term_scales=term_scales,
    )  # fmt: skip


@kernel_examples
@given(
    n=st.integers(1, 40),
    hidden_size=st.integers(1, 24),
    vocab=st.integers(2, 97),
    dtype=dtypes,
    reduction=st.sampled_from(["mean", "sum"]),
    softcap=st.sampled_from([None, 3.0, 30.0]),
    logit_scale=st.sampled_from([1.0, 0.0625, 2.5]),
    with_bias=st.booleans(),
    ignored=st.sampled_from([0.0, 0.3, 1.0]),
    chunk_rows=st.sampled_from([0, 1, 7, 16]),
    trainable=st.booleans(),
    backend=st.sampled_from(["triton", "torch"]),
)
def test_fused_linear_cross_entropy(
    n,
    hidden_size,
    vocab,
    dtype,
    reduction,
    softcap,
    logit_scale,
    with_bias,
    ignored,
    chunk_rows,
    trainable,
    backend,
):
    check_cross_entropy(
        n,
        hidden_size,
        vocab,
        dtype,
        reduction,
        softcap,
        logit_scale,
        with_bias,
        ignored,
        chunk_rows,
        trainable,
        backend,
        seed=n,
    )


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("trainable_with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy_features(backend, softcap, trainable_with_bias, dtype):
    """Every feature on both paths, whatever hypothesis draws: soft-cap, bias, trainable lm_head."""
    check_cross_entropy(
        13,
        6,
        29,
        dtype,
        "mean",
        softcap,
        1.5,
        trainable_with_bias,
        0.3,
        5,
        trainable_with_bias,
        backend,
        seed=7,
    )


def test_fused_linear_cross_entropy_all_ignored_is_zero():
    hidden, weight = leaf(randn(5, 8, seed=0)), leaf(randn(11, 8, seed=1))
    labels = torch.full((5,), -100, device=DEVICE)
    for backend in ("triton", "torch"):
        with K.kernel_backend(backend):
            loss = K.fused_linear_cross_entropy(hidden, weight, labels)
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        assert loss.item() == 0.0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_fused_linear_cross_entropy_leading_dims_and_no_grad():
    hidden, weight = randn(2, 3, 8, seed=0), randn(11, 8, seed=1)
    labels = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    expected = K.fused_linear_cross_entropy_reference(
        hidden.reshape(6, 8), weight, labels.reshape(6)
    )
    with torch.no_grad():
        loss = K.fused_linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest size in bytes of any tensor an aten op returns (bytes, because the
    Triton interpreter copies arguments to the host as byte tensors)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.nbytes)
        return out


@pytest.mark.parametrize("use_triton", [True, False])
def test_fused_linear_cross_entropy_never_builds_full_logits(use_triton):
    # the custom op's body, watched op by op (a dispatch mode cannot see inside a custom op)
    from fnlm.kernels.cross_entropy import fused_linear_cross_entropy_fwd

    n, hidden_size, vocab, chunk = 64, 8, 50, 16
    hidden, weight = randn(n, hidden_size, seed=0), randn(vocab, hidden_size, seed=1)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with _LargestTensor() as mode:
        fused_linear_cross_entropy_fwd(
            hidden,
            weight,
            None,
            labels,
            -100,
            "mean",
            None,
            1.0,
            True,
            True,
            False,
            use_triton,
            chunk,
        )
    # the biggest tensors are a chunk of logits and the gradients; never [n, vocab]
    assert (
        mode.largest == 4 * max(chunk * vocab, vocab * hidden_size, n * hidden_size) < 4 * n * vocab
    )


def test_fused_linear_cross_entropy_default_chunk_fits_budget():
    from fnlm.kernels.cross_entropy import CHUNK_LOGITS_BYTES, _chunk_rows

    rows = _chunk_rows(128256, torch.bfloat16)
    assert rows * 128256 * 2 <= CHUNK_LOGITS_BYTES and rows >= 512


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_fused_linear_cross_entropy_gpu(softcap):
    check_cross_entropy(
        4096,
        512,
        32003,
        torch.bfloat16,
        "mean",
        softcap,
        1.0,
        False,
        0.2,
        1024,
        True,
        "auto",
        seed=0,
    )
    check_cross_entropy(
        1000, 256, 5001, torch.float32, "sum", softcap, 0.5, True, 0.1, 0, True, "auto", seed=1
    )


@pytest.mark.gpu
def test_fused_linear_cross_entropy_gpu_memory():
    """16k tokens x vocab 32k x 2048 hidden bf16, frozen lm_head: extra memory stays near one chunk
    of logits plus grad_hidden (an eager [16384, 32000] logits tensor alone is 1 GiB in bf16)."""
    n, hidden_size, vocab = 16384, 2048, 32000
    hidden = randn(n, hidden_size, seed=0).bfloat16().requires_grad_()
    weight = (randn(vocab, hidden_size, seed=1) * hidden_size**-0.5).bfloat16()
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = K.fused_linear_cross_entropy(hidden, weight, labels)
    (grad,) = torch.autograd.grad(loss, hidden)
    extra = torch.cuda.max_memory_allocated() - base
    from fnlm.kernels.cross_entropy import CHUNK_LOGITS_BYTES

    # one chunk of logits, grad_hidden and its scaled copy, and 64 MiB for cuBLAS' workspace
    assert extra <= CHUNK_LOGITS_BYTES + 2 * hidden.numel() * 2 + 64 * 2**20, extra
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


# ------------------------------------------------------------------------------------------------
# The switch and the errors
# ------------------------------------------------------------------------------------------------


def test_backend_switch():
    cpu = torch.zeros(1)
    assert K.use_triton(cpu) is False  # "auto" on CPU
    with K.kernel_backend("triton"):
        assert K.use_triton(cpu)
        with K.kernel_backend("torch"):
            assert not K.use_triton(cpu)
        assert K.use_triton(cpu)
    assert not K.use_triton(cpu)
    with pytest.raises(ArgumentError, match="unknown kernel backend 'cuda'"):
        with K.kernel_backend("cuda"):
            pass


def test_errors_name_the_culprit():
    x, w = torch.zeros(2, 8), torch.zeros(7)
    with pytest.raises(ArgumentError, match="rms_norm: weight of shape"):
        K.rms_norm(x, w, 1e-6)
    with pytest.raises(ArgumentError, match="apply_rope"):
        K.apply_rope(
            torch.zeros(1, 2, 3, 4),
            torch.zeros(1, 2, 1, 4),
            torch.zeros(1, 2, 3),
            torch.zeros(1, 2, 3),
        )
    with pytest.raises(ArgumentError, match="swiglu: gate"):
        K.swiglu(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ArgumentError, match="approximate"):
        K.geglu(torch.zeros(2, 3), torch.zeros(2, 3), approximate="erf")
    hidden, weight = torch.zeros(3, 4), torch.zeros(5, 4)
    for backend in ("triton", "torch"):
        with (
            K.kernel_backend(backend),
            pytest.raises(ArgumentError, match=r"labels\[1\] = 5 is outside"),
        ):
            K.fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 5, -100]))
    with pytest.raises(ArgumentError, match="reduction"):
        K.fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2]), reduction="none")
    with pytest.raises(ArgumentError, match="labels must be int64"):
        K.fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2], dtype=torch.int32))


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) through all kernels
# ------------------------------------------------------------------------------------------------


def _chain(x, norm_w, gate_w, up_w, lm_head, cos, sin, labels):
    """rms_norm -> apply_rope -> swiglu -> fused cross-entropy, shaped like a tiny decoder step."""
    batch, seq, hidden = x.shape
    h = K.rms_norm(x, norm_w, 1e-6)
    q = h.view(batch, seq, 4, hidden // 4)
    k = h[..., : hidden // 2].reshape(batch, seq, 2, hidden // 4)
    q, k = K.apply_rope(q, k, cos, sin)
    z = q.reshape(batch, seq, hidden) + k.reshape(batch, seq, hidden // 2).repeat(1, 1, 2)
    m = K.swiglu(z @ gate_w.T, z @ up_w.T)
    return K.fused_linear_cross_entropy(m, lm_head, labels, softcap=5.0, chunk_rows=4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    batch, seq, hidden, inter, vocab = 2, 3, 16, 12, 19
    params = [
        randn(batch, seq, hidden, seed=0),
        randn(hidden, seed=1),
        randn(inter, hidden, seed=2),
        randn(inter, hidden, seed=3),
        randn(vocab, inter, seed=4),
    ]
    params = [leaf(p) for p in params]
    angles = randn(batch, seq, hidden // 8, seed=5)
    labels = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(
        DEVICE
    )
    labels[0, 0] = -100
    args = (*params, angles.cos(), angles.sin(), labels)
    with K.kernel_backend(backend):
        eager = _chain(*args)
        eager_grads = torch.autograd.grad(eager, params)
        compiled_fn = torch.compile(
            _chain, fullgraph=True, backend="inductor" if CUDA else "aot_eager"
        )
        compiled = compiled_fn(*args)
        compiled_grads = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_decoder_layer_matches_eager(backend):
    """torch.compile(fullgraph=True) of the real decoder layer (fnlm.models.decoder.layer_forward)
    over an NF4 base with LoRA adapters, as training runs it: no graph break, and the loss and every
    adapter gradient equal eager's (inductor on CUDA, aot_eager on CPU)."""
    import transformers

    import fnlm
    from fnlm.models import decoder
    from tests.models import saved_checkpoint

    torch._dynamo.reset()
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.2,
    )  # fmt: skip
    with saved_checkpoint(config) as (_, directory):
        params, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device=DEVICE)
    lora = fnlm.lora.init(params, r=4, alpha=8)
    with torch.no_grad():  # B starts at zero: make the adapters matter
        for t in fnlm.lora.parameters(lora):
            t.add_(0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)).to(t))
    tokens = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    compiled_layer = torch.compile(
        decoder.layer_forward, fullgraph=True, backend="inductor" if CUDA else "aot_eager"
    )
    results = []
    with K.kernel_backend(backend):
        for layer_fn in (decoder.layer_forward, compiled_layer):
            loss = fnlm.loss(params, {"tokens": tokens}, lora=lora, layer_fn=layer_fn)
            grads = torch.autograd.grad(loss, fnlm.lora.parameters(lora))
            results.append((loss, grads))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
