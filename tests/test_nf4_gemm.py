"""The fused small-batch NF4 GEMM (fnlm/kernels/nf4_gemm.py) against dequantize + matmul: values
within one rounding plus the fp32 dot bound (as the GEMV's tests), every code exactly, split-K
and ragged tiles, what it refuses, and which rows fnlm.quant sends to it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_quant import _assert_within_dot_bound, _weight

import fnlm.quant as Q
from fnlm import kernels
from fnlm.errors import ArgumentError
from fnlm.kernels import kernel_backend
from fnlm.kernels import nf4_gemm as gemm
from fnlm.kernels.nf4 import NF4_CODE

DTYPES = (torch.bfloat16, torch.float16)


def small_gemm(x, w, bias=None):
    """The door's small GEMM on its Triton path (the interpreter on CPU)."""
    return kernels.nf4_small_gemm(x, w, bias, triton=True)


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    rows=st.integers(1, 70), out_features=st.integers(1, 70), blocks=st.integers(1, 5),
    bias=st.booleans(),
)  # fmt: skip
def test_small_gemm_matches_dequantize_matmul(rows, out_features, blocks, bias, dtype):
    """Double-quantized NF4 (what fnlm.quant makes), whole 64-value blocks per row: 1-5 blocks
    against 128-wide K tiles (a half tile at the end), output and row tiles cut short, split-K
    over the blocks; within the bound torch's own dequantize + matmul meets."""
    w = Q.quantize(_weight((out_features, 64 * blocks), dtype, seed=2), "nf4", compute_dtype=dtype)
    x = _weight((rows, 64 * blocks), dtype, seed=3)
    b = _weight((out_features,), dtype, seed=4) if bias else None
    w_dense = w.dequantize(triton=False)
    y = small_gemm(x, w, b)
    assert y.shape == (rows, out_features) and y.dtype == dtype
    _assert_within_dot_bound("nf4_small_gemm", y, x, w_dense, b)
    _assert_within_dot_bound("reference", kernels.nf4_small_gemm(x, w, b, triton=False), x,
                             w_dense, b)  # fmt: skip


def test_small_gemm_splits_k_and_every_code_exactly(monkeypatch):
    """Every NF4 code in both nibbles, plain fp32 absmax (no double quantization), one-hot rows:
    the output is exactly the dequantized weight's columns, also with the reduction split over
    four programs (fp32 partials summed) and with one."""
    in_features = 512
    packed = torch.arange(256, dtype=torch.uint8).repeat(16 * in_features // 2 // 256)
    absmax = torch.linspace(0.5, 3.0, 16 * in_features // 64)
    w = Q.NF4Weight(packed.reshape(-1, 1), absmax, torch.tensor(NF4_CODE), None, None, None,
                    shape=(16, in_features), dtype=torch.bfloat16)  # fmt: skip
    w_dense = w.dequantize(triton=False)
    x = torch.eye(in_features, dtype=torch.bfloat16)[:: in_features // 32]  # 32 rows
    want = w_dense[:, :: in_features // 32].t().contiguous()
    for programs in (gemm._TARGET_PROGRAMS, 1):  # 4 splits (one 16-row x 64-col tile), then 1
        monkeypatch.setattr(gemm, "_TARGET_PROGRAMS", programs)
        assert torch.equal(small_gemm(x, w), want)


def test_small_gemm_refuses_what_it_does_not_take():
    w = Q.quantize(_weight((4, 96), torch.bfloat16), "nf4", compute_dtype=torch.bfloat16)
    with pytest.raises(ArgumentError, match="blocksize 64"):  # 1.5 blocks per row
        small_gemm(torch.randn(9, 96, dtype=torch.bfloat16), w)
    with pytest.raises(ArgumentError, match="blocksize 64"):  # the reference refuses alike
        kernels.nf4_small_gemm(torch.randn(9, 96, dtype=torch.bfloat16), w, triton=False)
    w = Q.quantize(_weight((4, 64), torch.bfloat16), "nf4", compute_dtype=torch.bfloat16)
    with pytest.raises(ArgumentError, match="float32"):
        small_gemm(torch.randn(9, 64), w)
    rows = gemm.SMALL_GEMM_MAX_ROWS + 1
    with pytest.raises(ArgumentError, match=f"x \\({rows}, 64\\)"):
        small_gemm(torch.randn(rows, 64, dtype=torch.bfloat16), w)


def test_small_gemm_traces_whole_under_torch_compile():
    """Under torch.compile the door calls the custom op (fullgraph: no break around the launch),
    with the eager result."""
    w = Q.quantize(_weight((24, 128), torch.bfloat16), "nf4", compute_dtype=torch.bfloat16)
    x = _weight((12, 128), torch.bfloat16, seed=9)
    compiled = torch.compile(small_gemm, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, w), small_gemm(x, w))


@pytest.mark.parametrize("enabled", [True, False])
def test_linear_sends_a_few_dozen_rows_to_the_small_gemm_when_enabled(monkeypatch, enabled):
    """NF4, bf16, Triton path, SMALL_GEMM on: rows past GEMV_MAX_ROWS up to SMALL_GEMM_MAX_ROWS go
    to the small GEMM (the forward and the LoRA linear's accumulate-into form), fewer to the GEMV,
    more to dequantize + matmul; off (the default), none."""
    monkeypatch.setattr(Q.matmul, "SMALL_GEMM", enabled)
    monkeypatch.setattr(gemm, "SMALL_GEMM_MAX_ROWS", 40)
    calls = []
    real = kernels.nf4_small_gemm
    monkeypatch.setattr(
        kernels, "nf4_small_gemm", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k)
    )
    w = Q.quantize(_weight((24, 128), torch.bfloat16), "nf4", compute_dtype=torch.bfloat16)
    for rows, taken in ((8, False), (9, enabled), (40, enabled), (41, False)):
        x = _weight((rows, 128), torch.bfloat16, seed=9)
        calls.clear()
        with kernel_backend("triton"):
            y = Q.linear(x, w)
            into = Q.matmul.matmul_weight_t_into(torch.zeros(rows, 24, dtype=x.dtype), x, w, True)
        assert calls == ([rows, rows] if taken else []), rows
        _assert_within_dot_bound("linear", y, x, w.dequantize(triton=False))
        _assert_within_dot_bound("matmul_weight_t_into", into, x, w.dequantize(triton=False))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336), (300, 192)])
@pytest.mark.parametrize("rows", [9, 16, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_small_gemm(shape, rows, dtype):
    """On the GPU at Llama-3.1-8B's shapes and a ragged one: within the dot bound, and the same
    bits on every call (the split-K partials are summed in a fixed order)."""
    q = Q.quantize(_weight(shape, dtype, seed=51, device="cuda"), "nf4", compute_dtype=dtype)
    x = _weight((rows, shape[1]), dtype, seed=52, device="cuda")
    bias = _weight((shape[0],), dtype, seed=53, device="cuda")
    y = small_gemm(x, q, bias)
    _assert_within_dot_bound("nf4_small_gemm", y, x, q.dequantize(), bias)
    assert all(torch.equal(small_gemm(x, q, bias), y) for _ in range(5))
