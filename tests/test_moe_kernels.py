"""The NF4 expert GEMV (fnlm.kernels.nf4_expert_gemv) and its place in fnlm.models.moe.matmul.

Each row times its own expert's matrix from an NF4 stack [E·out, in]: equal to dequantize-then-
matmul within one rounding into the output dtype plus the fp32 dot-product bound (the bound of
tests/test_quant.py's GEMV tests). On CPU the kernel runs under TRITON_INTERPRET=1 (conftest);
the GPU test repeats the check on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fnlm.quant as Q
from fnlm import kernels
from fnlm.config import ModelConfig
from fnlm.errors import ArgumentError
from fnlm.kernels import kernel_backend
from fnlm.models import moe
from tests.test_quant import _assert_within_dot_bound

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _stack(experts, out_features, in_features, dtype, seed, nested=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(experts * out_features, in_features, generator=g).to(device, dtype)
    w = Q.quantize(dense, "nf4", compute_dtype=dtype)
    if not nested:  # the same weight with its absmax stored as plain fp32
        absmax = (
            w.nested_code[w.absmax.long()]
            * w.nested_absmax.repeat_interleave(256)[: w.absmax.numel()]
            + w.offset
        )
        w = Q.NF4Weight(w.packed, absmax.float(), w.code, None, None, None,
                        shape=tuple(w.shape), dtype=dtype)  # fmt: skip
    return w


def _check(w, x, owner, experts):
    dense = w.dequantize(triton=False).view(experts, -1, w.shape[1])
    for backend in ("triton", "torch"):  # the kernel (interpreter on CPU), the reference
        with kernel_backend(backend):
            y = kernels.nf4_expert_gemv(x, owner, w, experts)
        assert y.shape == (x.shape[0], w.shape[0] // experts) and y.dtype == x.dtype
        for i, e in enumerate(owner.tolist()):
            _assert_within_dot_bound(
                f"expert_gemv ({backend}) row {i}", y[i : i + 1], x[i : i + 1], dense[e]
            )


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    experts=st.integers(1, 4),
    out_features=st.integers(1, 70),
    blocks=st.integers(1, 3),
    rows=st.integers(1, 9),
    nested=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_expert_gemv_matches_dequantize_matmul(
    dtype, experts, out_features, blocks, rows, nested, seed
):
    w = _stack(experts, out_features, 64 * blocks, dtype, seed, nested)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, 64 * blocks, generator=g).to(dtype)
    owner = torch.randint(0, experts, (rows,), generator=g)
    _check(w, x, owner, experts)


def test_expert_gemv_rejects_what_it_does_not_take():
    w = _stack(2, 4, 96, torch.bfloat16, 0)  # 1.5 blocks per row
    with pytest.raises(ArgumentError, match="in % blocksize"):
        kernels.nf4_expert_gemv(
            torch.randn(1, 96, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.long), w, 2
        )
    w = _stack(2, 4, 64, torch.bfloat16, 0)
    with pytest.raises(ArgumentError, match="owner"):
        kernels.nf4_expert_gemv(
            torch.randn(3, 64, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.long), w, 2
        )


def _route(experts, k, tokens, seed):
    config = ModelConfig(
        model_type="mixtral", vocab_size=8, hidden_size=64, intermediate_size=32, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=32, num_experts=experts, experts_per_token=k,
        moe_layers=(0,),
    )  # fmt: skip
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))
    return moe.route(config, logits, torch.bfloat16)


def test_matmul_takes_the_expert_gemv_for_few_rows_without_grad(monkeypatch):
    """On the Triton path, an NF4 stack with few rows (at most EXPERT_GEMV_MAX_ROWS, and at most
    experts x EXPERT_GEMV_MAX_ROWS_PER_EXPERT) and no grad goes to the expert GEMV, with the values
    of dequantize-then-matmul; rows that need grad, or too many rows, do not."""
    w = _stack(8, 24, 64, torch.bfloat16, 1)
    rows = torch.randn(10, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    calls = []
    gemv = kernels.nf4_expert_gemv
    monkeypatch.setattr(kernels, "nf4_expert_gemv", lambda *a: calls.append(1) or gemv(*a))
    with kernel_backend("triton"):
        route = _route(8, 1, 2, 0)  # 2 rows for 8 experts
        y = moe.matmul(route, rows[:2], w)
        assert calls
        owner = torch.bucketize(torch.arange(2), route.offsets.long(), right=True)
        dense = w.dequantize(triton=False).view(8, 24, 64)
        for i, e in enumerate(owner.tolist()):
            _assert_within_dot_bound("matmul row", y[i : i + 1], rows[i : i + 1], dense[e])
        calls.clear()
        moe.matmul(route, rows[:2].clone().requires_grad_(), w)
        moe.matmul(_route(8, 2, 5, 0), rows, w)  # 10 rows for 8 experts
        assert not calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_gemv_on_cuda(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    experts, rows = 8, 16
    w = _stack(experts, 96, 256, dtype, 3, device="cuda")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(rows, 256, generator=g).to("cuda", dtype)
    owner = torch.randint(0, experts, (rows,), generator=g).cuda()
    y = kernels.nf4_expert_gemv(x, owner, w, experts).cpu()
    dense = w.dequantize(triton=False).view(experts, -1, 256).cpu()
    for i, e in enumerate(owner.tolist()):
        _assert_within_dot_bound(f"row {i}", y[i : i + 1], x[i : i + 1].cpu(), dense[e])


@pytest.mark.parametrize("grouped", [False, True])
def test_quantized_stack_grads_recompute_the_dequantized_stack(grouped):
    """A frozen NF4 stack: the grad of the rows equals autograd through the dequantized stack, and
    backward keeps only the 4-bit parts (no 16-bit expert matrix is saved). bf16 (the
    grouped GEMM's dtype, on CPU too); both sides round the same fp32 sums: within one bf16 ulp."""
    route = _route(4, 2, 6, 3)
    w = _stack(4, 32, 64, torch.bfloat16, 4)
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(12, 64, generator=g).bfloat16().requires_grad_()
    grad = torch.randn(12, 32, generator=g).bfloat16()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = moe.matmul(route, rows, w, grouped=grouped)
    assert all(t.numel() < 32 * 64 or not t.is_floating_point() for t in saved)  # one expert
    y.backward(grad)
    reference_rows = rows.detach().clone().requires_grad_()
    stack = w.dequantize(triton=False).view(4, 32, 64)
    y_ref = moe.matmul(route, reference_rows, stack, grouped=False)
    y_ref.backward(grad)
    for ours, ref in ((y, y_ref), (rows.grad, reference_rows.grad)):
        assert (ours.float() - ref.float()).abs().max() <= 2**-7 * ref.float().abs().max()
