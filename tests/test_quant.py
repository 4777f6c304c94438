"""Quantized weights and their kernels against bitsandbytes and plain torch.

- NF4: our quantize gives bitsandbytes' bytes; our dequantize (torch reference and Triton kernel)
  gives bitsandbytes' values bit for bit; the fused GEMV matches dequantize + matmul within the
  stated rounding bound; the quantized linear and the fused LoRA linear match plain autograd and
  keep nothing of the weight's size for the backward; all of it inside torch.compile(fullgraph).
- int8: bitsandbytes' bytes and dequantize formula; fp8: the stated error bounds.
On CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest); @pytest.mark.gpu repeats the
bit-exactness and speed-relevant shapes on CUDA against bitsandbytes' CUDA kernels.
"""

from __future__ import annotations

import bitsandbytes.functional as bnb
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st

import fnlm.quant as Q
from fnlm import kernels
from fnlm.errors import ArgumentError, CheckpointError, QuantError
from fnlm.kernels import kernel_backend
from fnlm.kernels.nf4 import NF4_CODE, dequantize_nf4, dequantize_nf4_reference
from fnlm.kernels.nf4_gemv import nf4_gemv_fwd
from fnlm.lora.linear import lora_linear, lora_linear_reference
from fnlm.quant.fp8 import (
    FP8_FP32_SLACK,
    FP8_RELATIVE_ERROR,
    FP8_SUBNORMAL_ERROR,
    check_fp8_device,
)
from fnlm.quant.int8 import INT8_FP16_ERROR, INT8_FP32_SLACK, INT8_GRID_ERROR

CUDA = torch.cuda.is_available()
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
dtypes = st.sampled_from(FLOAT_DTYPES)
# Half an ulp relative to the value, the error of one round-to-nearest into the dtype.
HALF_ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Error of an fp32 dot product of n terms: at most n * 2**-24 * sum |x_i w_i| (the classic gamma_n
# bound of recursive summation; blocked / tensor-core summation only lowers it).
FP32_DOT_ERROR = 2.0**-24
# bf16 / fp16 LoRA gradients: ours may exceed plain torch's own error (same dtype, against an fp32
# truth) by this many ulps of the largest true value. Both do the same matmuls in the same dtype;
# the slack covers a different order of the rounded operations (PEFT casts the adapter input once,
# the fused backward reuses the forward's x @ A.T).
LOWP_ULP_SLACK = 2.0


def _weight(shape, dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _bnb_flat_dequantize(packed, state):
    """bitsandbytes' own dequantize of the flat weight: its CPU kernel blocks each row on its own
    (wrong for in_features % blocksize != 0 with even in_features, see the test below); as one
    row the blocks are the flat blocks its quantizer (and CUDA) use."""
    n = state.shape.numel()
    flat = bnb.QuantState(
        absmax=state.absmax,
        shape=torch.Size([1, n]),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
        offset=state.offset,
        state2=state.state2,
    )
    return _bnb_dequantize(packed, flat).reshape(state.shape)


def _bnb_dequantize(packed, state):
    """bnb.dequantize_4bit without the torch.compile that its pure-torch fallback (odd sizes on
    CPU) wraps itself in: the same ops, minus a recompile per shape (slow on a 2-core CI box)."""
    with torch._dynamo.config.patch(disable=True):
        return bnb.dequantize_4bit(packed, state)


shapes = st.tuples(st.integers(1, 24), st.integers(1, 160))


# ----------------------------------------------------------------------------------------------
# NF4: bytes and dequantized values
# ----------------------------------------------------------------------------------------------


@given(shape=shapes, dtype=dtypes, compute=dtypes)
def test_nf4_quantize_is_bitsandbytes(shape, dtype, compute):
    """Same bytes as bnb.quantize_4bit(nf4, blocksize 64, double quant), same dequantized values."""
    w = _weight(shape, dtype)
    q = Q.quantize(w, "nf4", compute_dtype=compute)
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert isinstance(q, Q.NF4Weight) and q.shape == shape and q.dtype == compute
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.nested_absmax, state.state2.absmax)
    assert torch.equal(q.nested_code, state.state2.code)
    assert torch.equal(q.offset, state.offset)
    assert (q.blocksize, q.nested_blocksize) == (64, 256)

    state.dtype = compute  # bnb dequantizes to the state's dtype; ours to the compute dtype
    expected = _bnb_flat_dequantize(packed, state)
    assert torch.equal(Q.dequantize(q), expected)
    if shape[1] % 64 == 0 or shape[1] % 2:  # where bnb's CPU kernel is right on the 2-D shape
        assert torch.equal(Q.dequantize(q), _bnb_dequantize(packed, state))


def test_bnb_cpu_dequantize_blocks_rows_on_their_own():
    """Why _bnb_flat_dequantize exists: bitsandbytes 0.50's CPU dequantize_4bit disagrees with its
    own quantizer when in_features is even but not a multiple of the blocksize. If this starts
    failing, bitsandbytes fixed it and the 2-D comparison can cover every shape."""
    w = _weight((4, 96), torch.float32)
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert not torch.equal(_bnb_dequantize(packed, state), _bnb_flat_dequantize(packed, state))
    q = Q.NF4Weight.from_bnb(packed, state)
    assert torch.equal(q.dequantize(), _bnb_flat_dequantize(packed, state))


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@given(shape=shapes, blocksize=st.sampled_from([32, 64, 128]))
def test_nf4_triton_dequantize_bit_exact(shape, blocksize, dtype, nested):
    w = _weight(shape, torch.float32, seed=1)
    packed, state = bnb.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4"
    )
    state.dtype = dtype
    q = Q.NF4Weight.from_bnb(packed, state)
    expected = _bnb_flat_dequantize(packed, state)
    parts = (q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset)
    meta = (list(shape), blocksize, q.nested_blocksize, dtype)
    assert torch.equal(dequantize_nf4(*parts, *meta), expected)
    assert torch.equal(dequantize_nf4_reference(*parts, *meta), expected)
    with kernel_backend("triton"):
        assert torch.equal(Q.dequantize(q), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nf4_dequantize_rounds_ties_to_even(dtype):
    """Random weights almost never land on a tie, so build ties: codes +-1 (NF4 15 and 0) times an
    absmax halfway between two neighbours of the dtype, one block of 2 values each. bitsandbytes
    (CUDA's cvt.rn) rounds them to even; the kernel must too (the Triton interpreter alone would
    truncate)."""
    eps = torch.finfo(dtype).eps
    absmax = torch.tensor([1 + k * eps / 2 for k in range(1, 33, 2)])  # odd halves: all ties
    packed = torch.full((16,), 0xF0, dtype=torch.uint8)  # (+1, -1) in every block
    args = (packed, absmax, None, None, None, None, [32], 2, 256, dtype)
    got = dequantize_nf4(*args)
    want = dequantize_nf4_reference(packed, absmax, torch.tensor(NF4_CODE), *args[3:])
    assert torch.equal(got, want)
    assert torch.equal(
        want, torch.stack([absmax, -absmax], 1).reshape(-1).to(dtype)
    )  # torch rounds to even


# ----------------------------------------------------------------------------------------------
# NF4: fused GEMV
# ----------------------------------------------------------------------------------------------


def _assert_within_dot_bound(name, y, x, w_dense, bias=None):
    """|y - x @ W.T| <= one rounding into y's dtype + the fp32 dot-product error bound."""
    truth = x.double() @ w_dense.double().t()
    if bias is not None:
        truth = truth + bias.double()
    magnitude = x.double().abs() @ w_dense.double().abs().t()
    bound = HALF_ULP[y.dtype] * truth.abs() + FP32_DOT_ERROR * x.shape[1] * magnitude * (1 + 2**-20)
    error = (y.double() - truth).abs()
    worst = (error - bound).max().item()
    assert worst <= 0, f"{name} ({y.dtype}): error exceeds the bound by {worst:.3g}"


GEMV_DTYPES = (torch.bfloat16, torch.float16)  # what the fused GEMV takes (16-bit compute)


def nf4_gemv(x, w, bias=None):
    """The door's GEMV on its Triton path (the interpreter on CPU)."""
    return kernels.nf4_gemv(x, w, bias, triton=True)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", GEMV_DTYPES)
@given(out_features=st.integers(1, 40), blocks=st.integers(1, 5), bias=st.booleans())
def test_nf4_gemv_matches_dequantize_matmul(out_features, blocks, bias, dtype, batch):
    """Whole quantization blocks per row (in_features % 64 == 0), with and without bias; the
    weights the kernel builds from its byte tables are the dequantized ones, rounded to dtype."""
    w = Q.quantize(_weight((out_features, 64 * blocks), dtype, seed=2), "nf4", compute_dtype=dtype)
    x = _weight((batch, 64 * blocks), dtype, seed=3)
    b = _weight((out_features,), dtype, seed=4) if bias else None
    w_dense = w.dequantize(triton=False)
    y = nf4_gemv(x, w, b)
    assert y.shape == (batch, out_features) and y.dtype == dtype
    _assert_within_dot_bound("nf4_gemv", y, x, w_dense, b)
    y_reference = kernels.nf4_gemv(x, w, b, triton=False)
    _assert_within_dot_bound("nf4_gemv reference", y_reference, x, w_dense, b)
    # several steps per split, a last step past the split's end, and split-K (fp32 partial sums):
    # 2 blocks per step, 2 splits
    parts = (
        w.packed,
        w.absmax,
        w.code,
        w.nested_absmax,
        w.nested_code,
        w.offset,
        list(w.shape),
        64,
        256,
    )
    y_split = nf4_gemv_fwd(x, *parts, b, config=(64, 2, 4, 2))
    _assert_within_dot_bound("nf4_gemv split-K", y_split, x, w_dense, b)
    # the bound is not loose: torch's own dequantize + matmul meets it too
    _assert_within_dot_bound("dequantize + F.linear", F.linear(x, w_dense, b), x, w_dense, b)


@pytest.mark.parametrize(("splits", "batch"), [(2, 1), (3, 3), (4, 1)])
def test_nf4_gemv_variants_split_the_input_alike(splits, batch, monkeypatch):
    """Split-K both ways: "fixup" (the tile's last split sums the fp32 partials in the kernel) and
    "sweep" (torch sums them): each within the dot bound, equal bit for bit at two splits (one
    fp32 add either way); the variant comes
    from FNLM_NF4_GEMV when not given, and an unknown one is refused."""
    dtype = torch.bfloat16
    w = Q.quantize(_weight((37, 64 * 12), dtype, seed=5), "nf4", compute_dtype=dtype)
    x = _weight((batch, 64 * 12), dtype, seed=6)
    b = _weight((37,), dtype, seed=7)
    w_dense = w.dequantize(triton=False)
    parts = (w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset,
             list(w.shape), 64, 256)  # fmt: skip
    out = {}
    for variant in ("fixup", "sweep"):
        # 2 blocks per step and 12 blocks per row: 2 splits of 6, 3 of 4, 4 of 3 (a short last step)
        out[variant] = nf4_gemv_fwd(x, *parts, b, config=(16, 2, 4, splits), variant=variant)
        _assert_within_dot_bound(f"nf4_gemv {variant} x{splits}", out[variant], x, w_dense, b)
    if splits == 2:
        assert torch.equal(out["fixup"], out["sweep"])
    monkeypatch.setenv("FNLM_NF4_GEMV", "sweep")
    assert torch.equal(nf4_gemv_fwd(x, *parts, b, config=(16, 2, 4, splits)), out["sweep"])
    monkeypatch.setenv("FNLM_NF4_GEMV", "fast")
    with pytest.raises(ArgumentError, match="FNLM_NF4_GEMV"):
        nf4_gemv_fwd(x, *parts, b)


def test_nf4_gemv_tuned_variant_keeps_the_fastest_candidate(monkeypatch):
    """The "tuned" variant's bookkeeping (timings stood in): every candidate timed once per
    shape, the fastest kept and reused, the "fixup" config first; candidates keep a step of
    blocks per split; while a graph is captured an untimed shape gets the first, unkept."""
    from fnlm.kernels import _nf4_gemv_config as module

    cpu = torch.device("cpu")
    candidates = module._candidates(4096, 4096, 1, cpu, 64)
    assert candidates[0] == module._fixup_config(4096, 4096, 1, cpu, 64)
    assert len(set(candidates)) == len(candidates) > 20
    for _, block_blocks, _, split_k in candidates[1:]:  # every part a step of blocks or more
        assert split_k == 1 or 64 // split_k >= block_blocks
    timed = []
    monkeypatch.setattr(module, "_time_on_device", lambda launch: timed.append(1) or launch())
    monkeypatch.setattr(module, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    speed = {config: 10.0 + i for i, config in enumerate(candidates)}
    speed[candidates[3]] = 1.0
    assert module._tuned_config("k", speed.get, candidates) == candidates[3]
    assert module._tuned_config("k", speed.get, candidates) == candidates[3]
    assert len(timed) == len(candidates) and module.tuned_configs() == {"k": candidates[3]}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert module._tuned_config("other", speed.get, candidates) == candidates[0]
    assert "other" not in module.tuned_configs()
    # a launch builds the candidates for an untimed shape only, not again once it is kept
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    built = []
    monkeypatch.setattr(module, "_candidates", lambda *a: built.append(a) or candidates)
    shape = (4096, 4096, 1, torch.bfloat16, True, cpu, 64)
    assert [module._tuned_choice(*shape, speed.get) for _ in "ab"] == [candidates[3]] * 2
    assert built == [(4096, 4096, 1, cpu, 64)]


@pytest.mark.parametrize("dtype", GEMV_DTYPES)
def test_nf4_gemv_every_code_and_no_double_quant(dtype):
    """Every NF4 code in every nibble position of a word, and plain fp32 absmax (no double
    quantization): exactly the dequantized weights' products (x is one-hot)."""
    in_features = 128
    packed = torch.arange(256, dtype=torch.uint8).repeat(in_features * 16 // 2 // 256 + 1)
    packed = packed[: 16 * in_features // 2].reshape(-1, 1)
    absmax = torch.linspace(0.5, 3.0, 16 * in_features // 64)
    code = torch.tensor(NF4_CODE)
    w = Q.NF4Weight(packed, absmax, code, None, None, None, shape=(16, in_features), dtype=dtype)
    w_dense = w.dequantize(triton=False)
    x = torch.eye(in_features, dtype=dtype)[:8]
    assert torch.equal(nf4_gemv(x, w), w_dense[:, :8].t().contiguous())


def test_nf4_gemv_rejects_what_it_does_not_take():
    w = Q.quantize(_weight((4, 96), torch.bfloat16), "nf4", compute_dtype=torch.bfloat16)
    with pytest.raises(ArgumentError, match="in_features=96"):  # 1.5 blocks per row
        nf4_gemv(torch.randn(1, 96, dtype=torch.bfloat16), w)
    w = Q.quantize(_weight((4, 64), torch.float32), "nf4", compute_dtype=torch.float32)
    with pytest.raises(ArgumentError, match="float32"):
        nf4_gemv(torch.randn(1, 64), w)
    with pytest.raises(ArgumentError, match="float32"):  # the reference takes the same cases
        kernels.nf4_gemv(torch.randn(1, 64), w, triton=False)


# ----------------------------------------------------------------------------------------------
# linear on quantized weights: values, gradients, what is saved, torch.compile
# ----------------------------------------------------------------------------------------------

MODES_AND_NONE = [None, *Q.MODES]


def _quantized(mode, shape, dtype, seed=5):
    w = _weight(shape, dtype, seed)
    return Q.quantize(w, mode, compute_dtype=dtype) if mode else w


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", Q.MODES)
def test_linear_matches_dequantized_autograd(mode, backend, monkeypatch):
    """Forward and grads of x and bias equal F.linear on the dequantized weight, bit for bit (fp32:
    the fused GEMV, which takes 16-bit x only, stays out even when switched on for 8 rows)."""
    monkeypatch.setattr(Q.matmul, "GEMV_MAX_ROWS", 8)
    w = _quantized(mode, (48, 64), torch.float32)
    w_dense = w.dequantize(triton=False)
    for rows in (3, 20):  # GEMV on the Triton path / dequantize + matmul
        x = _weight((rows, 64), torch.float32, seed=6).requires_grad_()
        bias = _weight((48,), torch.float32, seed=7).requires_grad_()
        with kernel_backend(backend):
            y = Q.linear(x.view(1, rows, 64), w, bias)
        g = _weight(y.shape, torch.float32, seed=8)
        gx, gb = torch.autograd.grad(y, (x, bias), g)
        x_ref, bias_ref = x.detach().requires_grad_(), bias.detach().requires_grad_()
        y_ref = F.linear(x_ref.view(1, rows, 64), w_dense, bias_ref)
        gx_ref, gb_ref = torch.autograd.grad(y_ref, (x_ref, bias_ref), g)
        assert torch.equal(y, y_ref)
        assert torch.equal(gx, gx_ref) and torch.equal(gb, gb_ref)


def test_linear_sends_few_16bit_rows_to_the_gemv(monkeypatch):
    """NF4, bf16, Triton path: at most GEMV_MAX_ROWS rows go to the fused GEMV, more to
    dequantize + matmul; in_features not a whole number of blocks always to the latter."""
    monkeypatch.setattr(Q.matmul, "GEMV_MAX_ROWS", 4)
    calls = []
    real_gemv = kernels.nf4_gemv
    monkeypatch.setattr(
        kernels, "nf4_gemv", lambda x, *a, **k: calls.append(x.shape) or real_gemv(x, *a, **k)
    )
    for in_features, rows, gemv in ((128, 4, True), (128, 5, False), (96, 2, False)):
        w = _quantized("nf4", (24, in_features), torch.bfloat16)
        x = _weight((rows, in_features), torch.bfloat16, seed=9)
        calls.clear()
        with kernel_backend("triton"):
            y = Q.linear(x, w)
        assert len(calls) == int(gemv), (in_features, rows)
        want = nf4_gemv(x, w) if gemv else F.linear(x, w.dequantize(triton=False))
        assert torch.equal(y, want), (in_features, rows)


def test_linear_plain_tensor_is_f_linear():
    w, x = torch.randn(5, 3), torch.randn(2, 3)
    assert torch.equal(Q.linear(x, w), F.linear(x, w))
    assert Q.dequantize(w) is w


class _SavedTensors:
    """Records the sizes of the float tensors autograd saves inside the block, except `resident`
    ones (the quantized weight's own tensors, which exist anyway)."""

    def __init__(self, resident=()):
        self.resident = {t.data_ptr() for t in resident}
        self.saved = []

    def __enter__(self):
        def pack(t):
            if t.data_ptr() not in self.resident:
                self.saved.append((t.numel(), t.dtype))
            return t

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def largest_float(self):
        return max((n for n, dtype in self.saved if dtype.is_floating_point), default=0)


@pytest.mark.parametrize("mode", Q.MODES)
def test_backward_never_saves_the_dequantized_weight(mode):
    out_features, in_features, tokens = 64, 128, 6
    w = _quantized(mode, (out_features, in_features), torch.float32)
    x = torch.randn(tokens, in_features, requires_grad=True)
    a = torch.randn(4, in_features, requires_grad=True)
    b = torch.randn(out_features, 4, requires_grad=True)
    with _SavedTensors(resident=w.tensors()) as saved:
        Q.linear(x, w)
        lora_linear(x, w, a, b, 2.0)
    assert saved.saved, "nothing saved: the hooks did not see the custom ops"  # x, x @ A.T, A, B
    assert saved.largest_float() < out_features * in_features
    with _SavedTensors(
        resident=w.tensors()
    ) as reference:  # plain autograd does save it: the check can fail
        lora_linear_reference(x, w, a, b, 2.0)
    assert reference.largest_float() == out_features * in_features


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_and_lora_compile_fullgraph(backend):
    """linear and lora_linear on NF4 inside torch.compile(fullgraph=True): no graph break, same
    values and gradients as eager."""
    torch._dynamo.reset()
    w = _quantized("nf4", (32, 64), torch.float32)
    x = _weight((2, 5, 64), torch.float32, seed=9).requires_grad_()
    a = _weight((4, 64), torch.float32, seed=10).requires_grad_()
    b = _weight((32, 4), torch.float32, seed=11).requires_grad_()

    def step(x, w, a, b):
        h = Q.linear(x, w)
        return (lora_linear(x, w, a, b, 0.5) * h).sum()

    with kernel_backend(backend):
        eager = step(x, w, a, b)
        eager_grads = torch.autograd.grad(eager, (x, a, b))
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, w, a, b)
        compiled_grads = torch.autograd.grad(compiled, (x, a, b))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Fused LoRA linear
# ----------------------------------------------------------------------------------------------


def _lora_case(mode, dtype, adapter_dtype, tokens, in_features, out_features, rank, seed):
    w = _quantized(mode, (out_features, in_features), dtype, seed)
    x = _weight((tokens, in_features), dtype, seed + 1)
    a = _weight((rank, in_features), adapter_dtype, seed + 2) / in_features**0.5
    b = _weight((out_features, rank), adapter_dtype, seed + 3)
    bias = _weight((out_features,), dtype, seed + 4)
    return w, x, a, b, bias


def _run(fn, w, x, a, b, bias, scale, g):
    x, a, b, bias = (t.detach().requires_grad_() for t in (x, a, b, bias))
    y = fn(x, w, a, b, scale, bias)
    return (y, *torch.autograd.grad(y, (x, a, b, bias), g.to(y.dtype)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", MODES_AND_NONE)
@given(
    tokens=st.integers(1, 12),
    in_features=st.integers(1, 48),
    out_features=st.integers(1, 40),
    rank=st.integers(1, 8),
)
def test_lora_linear_fp32_matches_autograd(tokens, in_features, out_features, rank, mode, backend):
    """fp32: the fused op does PEFT's arithmetic; forward and grads of x, A, B, bias match plain
    autograd within fp32 rounding (the sums reassociated: adapter first, GEMV vs BLAS)."""
    w, x, a, b, bias = _lora_case(
        mode, torch.float32, torch.float32, tokens, in_features, out_features, rank, seed=12
    )
    g = _weight((tokens, out_features), torch.float32, 17)
    with kernel_backend(backend):
        got = _run(lora_linear, w, x, a, b, bias, 0.75, g)
    want = _run(lora_linear_reference, w, x, a, b, bias, 0.75, g)
    # fp32 matmuls of <= 48 terms reassociated (GEMV vs BLAS): a few ulps of the largest value
    for name, u, v in zip(("y", "grad_x", "grad_a", "grad_b", "grad_bias"), got, want):
        torch.testing.assert_close(
            u, v, rtol=4 * 2**-23, atol=64 * 2**-23 * v.abs().max().item(), msg=name
        )


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES_AND_NONE)
def test_lora_linear_bf16_error_is_earned(mode, adapter_dtype):
    """bf16 base (and fp32 or bf16 adapters): against an fp32 truth on the same values, the fused
    op's error is at most plain torch's own bf16 error + LOWP_ULP_SLACK ulps."""
    w, x, a, b, bias = _lora_case(mode, torch.bfloat16, adapter_dtype, 10, 96, 48, 8, seed=20)
    g = _weight((10, 48), torch.bfloat16, 27)
    got = _run(lora_linear, w, x, a, b, bias, 2.0, g)
    lowp = _run(lora_linear_reference, w, x, a, b, bias, 2.0, g)
    w32 = Q.dequantize(w).float()
    truth = _run(lora_linear_reference, w32, *(t.float() for t in (x, a, b, bias)), 2.0, g)
    eps = torch.finfo(torch.bfloat16).eps
    for name, u, v, t in zip(("y", "grad_x", "grad_a", "grad_b", "grad_bias"), got, lowp, truth):
        err = (u.double() - t.double()).abs().max().item()
        err_torch = (v.double() - t.double()).abs().max().item()
        bound = err_torch + LOWP_ULP_SLACK * eps * t.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (torch's own {err_torch:.3g})"


def test_lora_linear_dropout_only_in_training():
    w, x, a, b, bias = _lora_case("nf4", torch.float32, torch.float32, 64, 32, 16, 4, seed=30)
    # fp32: equal up to the order of the three terms' sums (a few ulps of |y| <= ~20)
    close = dict(rtol=1e-6, atol=1e-5)
    eval_y = lora_linear(x, w, a, b, 1.0, bias, dropout=0.5, training=False)
    torch.testing.assert_close(eval_y, lora_linear_reference(x, w, a, b, 1.0, bias), **close)
    torch.manual_seed(0)
    train_y = lora_linear(x, w, a, b, 1.0, bias, dropout=0.5, training=True)
    torch.manual_seed(0)
    x_lora = F.dropout(x, 0.5, training=True)
    want = lora_linear_reference(x, w, a, b, 1.0, bias, x_lora=x_lora)
    torch.testing.assert_close(train_y, want, **close)
    assert (train_y - eval_y).abs().max() > 1e-2  # dropout changed the adapter's input


def test_lora_linear_shape_mismatch_names_the_shapes():
    w, x, a, b, bias = _lora_case("nf4", torch.float32, torch.float32, 2, 32, 16, 4, seed=31)
    with pytest.raises(ArgumentError, match=r"A \(4, 32\).*B \(4, 16\)"):
        lora_linear(x, w, a, b.t().contiguous(), 1.0)


# ----------------------------------------------------------------------------------------------
# int8 and fp8
# ----------------------------------------------------------------------------------------------


@given(shape=shapes, dtype=dtypes, compute=dtypes)
def test_int8_is_bitsandbytes_and_within_bound(shape, dtype, compute):
    w = _weight(shape, dtype, seed=40) * 3
    w[0] = 0  # an all-zero row: zeros, not bitsandbytes' NaN codes
    q = Q.quantize(w, "int8", compute_dtype=compute)
    codes, scale, _ = bnb.int8_vectorwise_quant(w.to(torch.float16).contiguous())
    assert torch.equal(q.data[1:], codes[1:]) and torch.equal(q.scale, scale)
    assert torch.equal(q.data[0], torch.zeros_like(q.data[0]))
    assert torch.equal(q.dequantize(), bnb.int8_vectorwise_dequant(q.data, q.scale).to(compute))

    error = (
        Q.quantize(w, "int8", compute_dtype=torch.float32).dequantize().double() - w.double()
    ).abs()
    absmax = w.double().abs().amax(1, keepdim=True)
    bound = (INT8_GRID_ERROR * absmax + INT8_FP16_ERROR * w.double().abs()) * (1 + INT8_FP32_SLACK)
    assert (error <= bound).all()


@given(
    shape=shapes,
    dtype=dtypes,
    block_size=st.sampled_from([None, 8, 16, 128]),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
)
def test_fp8_within_bound(shape, dtype, block_size, magnitude):
    w = _weight(shape, dtype, seed=41) * magnitude
    w[-1] = 0
    q = Q.quantize(w, "fp8", compute_dtype=torch.float32, fp8_block_size=block_size)
    assert q.data.dtype == torch.float8_e4m3fn and q.shape == shape
    if block_size:
        assert q.scale.shape == (-(-shape[0] // block_size), -(-shape[1] // block_size))
    error = (q.dequantize().double() - w.double()).abs()
    bound = (
        FP8_RELATIVE_ERROR * w.double().abs() + FP8_SUBNORMAL_ERROR * q.element_scale().double()
    ) * (1 + FP8_FP32_SLACK)
    assert (error <= bound).all()
    assert torch.equal(q.dequantize()[-1], torch.zeros(shape[1]))
    assert Q.quantize(w, "fp8", compute_dtype=dtype).dequantize().dtype == dtype


def test_fp8_refused_on_gpus_without_fp8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(QuantError, match=r"fp8.*8\.9.*A100.*8\.0"):
        check_fp8_device(torch.device("cuda", 0))
    check_fp8_device(torch.device("cpu"))  # CPU always works


# ----------------------------------------------------------------------------------------------
# Pytree, conversions, errors
# ----------------------------------------------------------------------------------------------


def test_pytree_round_trip_sees_only_tensors():
    params = {
        "q": _quantized("nf4", (8, 64), torch.float32),
        "k": _quantized("int8", (8, 64), torch.float32),
        "v": _quantized("fp8", (8, 64), torch.float32),
        "norm": torch.ones(64),
    }
    leaves, spec = pytree.tree_flatten(params)
    assert all(isinstance(t, torch.Tensor) for t in leaves)
    assert len(leaves) == 6 + 2 + 2 + 1
    again = pytree.tree_unflatten(leaves, spec)
    for name in ("q", "k", "v"):
        assert type(again[name]) is type(params[name])
        assert torch.equal(again[name].dequantize(), params[name].dequantize())
    cloned = pytree.tree_map(torch.clone, params)
    assert cloned["q"].packed.data_ptr() != params["q"].packed.data_ptr()
    assert torch.equal(cloned["q"].dequantize(), params["q"].dequantize())
    paths = [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(params)[0]]
    assert "['q'].packed" in paths and "['k'].scale" in paths


@pytest.mark.parametrize("mode", Q.MODES)
def test_weight_attributes(mode):
    w = _weight((16, 64), torch.float32)
    q = Q.quantize(w, mode, compute_dtype=torch.bfloat16)
    assert q.shape == (16, 64) and q.dtype == torch.bfloat16 and q.device == w.device
    assert q.nbytes == sum(t.nbytes for t in pytree.tree_flatten(q)[0])
    assert q.nbytes < w.to(torch.bfloat16).nbytes
    moved = q.to("cpu")
    assert type(moved) is type(q) and torch.equal(moved.dequantize(), q.dequantize())
    assert mode in repr(q).lower()


def test_nf4_bnb_round_trip_and_state_dict():
    w = _weight((24, 128), torch.bfloat16)
    q = Q.quantize(w, "nf4", compute_dtype=torch.bfloat16)
    packed, state = q.to_bnb()
    assert torch.equal(bnb.dequantize_4bit(packed, state), q.dequantize())
    assert torch.equal(Q.NF4Weight.from_bnb(packed, state).dequantize(), q.dequantize())
    # the layout bnb.nn.Linear4bit writes into safetensors ("-bnb-4bit" checkpoints)
    prefix = "model.layers.0.self_attn.q_proj."
    saved = {prefix + "weight": packed}
    saved.update({prefix + "weight." + k: v for k, v in state.as_dict(packed=True).items()})
    saved[prefix + "bias"] = torch.zeros(24)
    loaded = Q.NF4Weight.from_state_dict(saved)
    assert loaded.dtype == torch.bfloat16 and loaded.shape == (24, 128)
    assert torch.equal(loaded.dequantize(), q.dequantize())
    del saved[prefix + "weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(CheckpointError, match="quant_state.bitsandbytes__nf4"):
        Q.NF4Weight.from_state_dict(saved)


def test_bad_mode_names_mode_and_choices():
    with pytest.raises(QuantError, match=r"'nf3'.*\('nf4', 'int8', 'fp8'\)"):
        Q.quantize(torch.randn(4, 4), "nf3", compute_dtype=torch.float32)


def test_bad_weight_is_named():
    with pytest.raises(ArgumentError, match="3-D"):
        Q.quantize(torch.randn(2, 4, 4), "nf4", compute_dtype=torch.float32)
    with pytest.raises(ArgumentError, match="torch.int64"):
        Q.quantize(torch.ones(4, 4, dtype=torch.long), "int8", compute_dtype=torch.float32)
    with pytest.raises(ArgumentError, match="expects 64"):
        Q.linear(torch.randn(2, 32), _quantized("nf4", (8, 64), torch.float32))


# ----------------------------------------------------------------------------------------------
# GPU: bit-exactness with bitsandbytes' CUDA kernels at real sizes
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (1000, 333), (128256 // 64, 4096)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gpu_nf4_dequantize_bit_exact_with_bnb_cuda(shape, dtype):
    w = _weight(shape, dtype, seed=50, device="cuda")
    q = Q.quantize(w, "nf4", compute_dtype=dtype)
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    expected = bnb.dequantize_4bit(packed, state)
    assert torch.equal(q.dequantize(), expected)  # Triton (auto on CUDA)
    assert torch.equal(q.dequantize(triton=False), expected)  # torch reference


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(4096, 4096), (14336, 4096), (4096, 14336), (300, 192), (40, 8192)]
)
@pytest.mark.parametrize("batch", [1, 2, 5, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["fixup", "sweep", "tuned"])
def test_gpu_nf4_gemv(shape, batch, dtype, variant, monkeypatch):
    monkeypatch.setenv("FNLM_NF4_GEMV", variant)
    q = Q.quantize(_weight(shape, dtype, seed=51, device="cuda"), "nf4", compute_dtype=dtype)
    x = _weight((batch, shape[1]), dtype, seed=52, device="cuda")
    bias = _weight((shape[0],), dtype, seed=53, device="cuda")
    y = nf4_gemv(x, q, bias)
    _assert_within_dot_bound(f"nf4_gemv {variant}", y, x, q.dequantize(), bias)
    # the in-kernel sum of the splits (whichever split finishes last) is the same on every call
    assert all(torch.equal(nf4_gemv(x, q, bias), y) for _ in range(20))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES_AND_NONE)
def test_gpu_lora_linear_and_compile(mode):
    torch._dynamo.reset()
    w, x, a, b, bias = _lora_case(mode, torch.bfloat16, torch.float32, 256, 512, 384, 16, seed=60)
    w = w.to("cuda")
    x, a, b, bias = (t.cuda() for t in (x, a, b, bias))
    g = _weight((256, 384), torch.bfloat16, 61, device="cuda")
    got = _run(lora_linear, w, x, a, b, bias, 2.0, g)
    want = _run(lora_linear_reference, w, x, a, b, bias, 2.0, g)
    # The fused op sums base and adapter in another order than plain autograd (the adapter's output
    # first, the base GEMM accumulating into it), so compare both with the float64 result: the
    # fused op's error is at most twice plain autograd's plus one bf16 half-ulp of the largest value.
    double = (t.double() for t in (x, a, b, bias))
    truth = _run(lora_linear_reference, w, *double, 2.0, g.double())
    for name, u, v, t in zip(("y", "grad x", "grad A", "grad B", "grad bias"), got, want, truth):
        ours, theirs = (u.double() - t).abs().max(), (v.double() - t).abs().max()
        assert ours <= 2 * theirs + 2**-9 * t.abs().max(), f"{name}: {ours:.3g} vs {theirs:.3g}"
    compiled = torch.compile(lora_linear, fullgraph=True)
    torch.testing.assert_close(compiled(x, w, a, b, 2.0, bias), got[0], rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_int8_codes_match_bnb_cuda():
    w = _weight((1024, 4096), torch.bfloat16, seed=70, device="cuda")
    q = Q.quantize(w, "int8", compute_dtype=torch.bfloat16)
    codes, scale, _ = bnb.int8_vectorwise_quant(w.to(torch.float16).contiguous())
    assert torch.equal(q.scale, scale)
    assert torch.equal(q.data, codes)


@pytest.mark.gpu
def test_gpu_fp8_runs_where_supported():
    w = _weight((256, 512), torch.bfloat16, seed=71, device="cuda")
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(QuantError, match="fp8"):
            Q.quantize(w, "fp8", compute_dtype=torch.bfloat16)
        return
    q = Q.quantize(w, "fp8", compute_dtype=torch.bfloat16)
    x = _weight((4, 512), torch.bfloat16, seed=72, device="cuda")
    torch.testing.assert_close(Q.linear(x, q), F.linear(x, q.dequantize()), rtol=0, atol=0)
