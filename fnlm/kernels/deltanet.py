"""The gated delta rule (Gated DeltaNet, Qwen3.5's linear attention): chunked, with a Triton scan.

Per value head, with an fp32 state S [dk, dv] and per token a decay g <= 0 (log space) and a write
strength beta in (0, 1):

    S <- exp(g) * S;   S <- S + k (beta * (v - S^T k))^T;   o = S^T q      (q, k L2-normed, q / sqrt(dk))

`gated_delta_rule_recurrent` runs that token by token (the reference, and the one-token decode
step). The chunked form (transformers' `torch_chunk_gated_delta_rule`, the same algorithm and
fp32 casts) splits the sequence into chunks of C tokens: `chunk_prepare` computes each chunk's
WY / UT-transform quantities at once (batched matmuls and a unit-lower-triangular solve, in torch
with its autograd), and the scan over chunks carries the state from one chunk to the next:

    v_new = U_i - W_i S;   o_i = Qd_i S + A_i v_new;   S <- gamma_i S + Kd_i^T v_new

The scan is the sequential part: `chunk_scan_reference` is transformers' Python loop over chunks;
the Triton kernels run the whole loop in one launch per (batch x head, value block) — forward, and
backward as the reverse scan (the states before each chunk are kept from the forward). Value
columns of the state are independent, so the value dim is split across programs; the gradients
that sum over it (q, k, W, A, gamma) are summed over the blocks by the launcher.

Packed rows (several documents in one row) pass `reset` [batch, seq] (True at each document's
first token: the state is zeroed before that token's update, as if the document ran alone). The
reset is applied in `chunk_prepare` by masks, so shapes depend only on [batch, seq] and nothing is
read on the host: the intra-chunk decay between tokens of different documents is 0, the state
entering a chunk reaches no token at or after a reset (Qd, W), a token reaches the chunk's final
state only if no reset follows it in the chunk (Kd), and gamma is 0 for a chunk holding a reset.
The scan kernels are unchanged (a chunk with gamma = 0 and zero Qd, W rows is an ordinary chunk).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fnlm.kernels import deltanet_split
from fnlm.kernels._deltanet_tiles import chunk_tiles, program_tiles

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _key_tiles(W, QD, KD, A, GAMMA, chunk, kmat, rc, mk, C: tl.constexpr):
    """What both scans read of chunk `chunk` beside its value tiles, kmat the offsets of its
    [C, BK] key tiles: (w, qd, kd [C, BK], a [C, C], gamma)."""
    w = tl.load(W + kmat, mask=mk[None, :], other=0.0)
    qd = tl.load(QD + kmat, mask=mk[None, :], other=0.0)
    kd = tl.load(KD + kmat, mask=mk[None, :], other=0.0)
    a = tl.load(A + chunk * C * C + rc[:, None] * C + rc[None, :])
    gamma = tl.load(GAMMA + chunk)
    return w, qd, kd, a, gamma


@triton.jit
def _scan_fwd_kernel(
    U, W, QD, KD, A, GAMMA, S0, OUT, STATES, S_FINAL,
    n_chunks, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, P: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    rc, rk, rv, mk, mv, state_offsets, state_mask = program_tiles(
        tl.program_id(1), dk, dv, C, BK, BV
    )
    s = tl.load(S0 + bh * dk * dv + state_offsets, mask=state_mask, other=0.0)
    for i in range(n_chunks):
        chunk = bh * n_chunks + i
        tl.store(STATES + chunk * dk * dv + state_offsets, s, mask=state_mask)
        kmat, vmat = chunk_tiles(chunk, rc, rk, rv, dk, dv, C)
        u = tl.load(U + vmat, mask=mv[None, :], other=0.0)
        w, qd, kd, a, gamma = _key_tiles(W, QD, KD, A, GAMMA, chunk, kmat, rc, mk, C)
        v_new = u - tl.dot(w, s, input_precision=P)
        o = tl.dot(qd, s, input_precision=P) + tl.dot(a, v_new, input_precision=P)
        tl.store(OUT + vmat, o, mask=mv[None, :])
        s = s * gamma + tl.dot(tl.trans(kd), v_new, input_precision=P)
    tl.store(S_FINAL + bh * dk * dv + state_offsets, s, mask=state_mask)


@triton.jit
def _scan_bwd_kernel(
    U, W, QD, KD, A, GAMMA, STATES, D_O, D_S_FINAL,
    D_U, D_W, D_QD, D_KD, D_A, D_GAMMA, D_S0,
    n_bh, n_chunks, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, P: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1).to(tl.int64)
    rc, rk, rv, mk, mv, state_offsets, state_mask = program_tiles(iv, dk, dv, C, BK, BV)
    ds = tl.load(D_S_FINAL + bh * dk * dv + state_offsets, mask=state_mask, other=0.0)
    # gradients summed over the value dim go to this block's slice of a [blocks, ...] buffer
    part = iv * n_bh * n_chunks
    for j in range(n_chunks):
        i = n_chunks - 1 - j
        chunk = bh * n_chunks + i
        s = tl.load(STATES + chunk * dk * dv + state_offsets, mask=state_mask, other=0.0)
        kmat, vmat = chunk_tiles(chunk, rc, rk, rv, dk, dv, C)
        u = tl.load(U + vmat, mask=mv[None, :], other=0.0)
        do = tl.load(D_O + vmat, mask=mv[None, :], other=0.0)
        w, qd, kd, a, gamma = _key_tiles(W, QD, KD, A, GAMMA, chunk, kmat, rc, mk, C)
        v_new = u - tl.dot(w, s, input_precision=P)
        # S_{i+1} = gamma S_i + Kd^T v_new and o = Qd S_i + A v_new, v_new = U - W S_i
        d_v_new = tl.dot(tl.trans(a), do, input_precision=P) + tl.dot(kd, ds, input_precision=P)
        tl.store(D_U + vmat, d_v_new, mask=mv[None, :])
        pmat = (part + chunk) * C * dk + rc[:, None] * dk + rk[None, :]
        tl.store(D_QD + pmat, tl.dot(do, tl.trans(s), input_precision=P), mask=mk[None, :])
        tl.store(D_KD + pmat, tl.dot(v_new, tl.trans(ds), input_precision=P), mask=mk[None, :])
        tl.store(D_W + pmat, -tl.dot(d_v_new, tl.trans(s), input_precision=P), mask=mk[None, :])
        amat = (part + chunk) * C * C + rc[:, None] * C + rc[None, :]
        tl.store(D_A + amat, tl.dot(do, tl.trans(v_new), input_precision=P))
        tl.store(D_GAMMA + part + chunk, tl.sum(tl.sum(s * ds, axis=1), axis=0))
        ds = (
            ds * gamma
            + tl.dot(tl.trans(qd), do, input_precision=P)
            - tl.dot(tl.trans(w), d_v_new, input_precision=P)
        )
    tl.store(D_S0 + bh * dk * dv + state_offsets, ds, mask=state_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


# The scans' loops over chunks are not software-pipelined (num_stages=1): each chunk's loads
# depend on the state the previous chunk left, and pipelined buffers of Qwen3.5's tiles (a 64-token
# chunk, 128-wide keys, fp32) asked for 287-295 KB of shared memory on an H200 (228 KB there).
SCAN_STAGES = 1

# The scans' dots in full fp32 ("ieee": Triton's FMA lowering, no tensor cores), so the chunked
# rule equals the fp32 recurrence at 1e-5. On sm_90 that lowering keeps its operand tiles in local
# memory: `python scripts/deltanet_resources.py` (cubins cross-compiled on any machine) shows
# 14.8 KB (forward) / 18.4 KB (backward) of stack per thread at Qwen3.5's tiles, 1.1-4.9 KB with
# "tf32x3" or "tf32" — the likely cause of the scans' 16 / 39 ms per call on an H200
# (docs/benchmarks.md, issue 18). Measured there (bench_deltanet, 2026-12-04): the fused scans at
# "tf32x3" (16 x 8) stopped with an illegal memory access, at "tf32" (16 x 4) they ran 3.6 / 11.9
# ms forward / forward + backward at 6.2e-3 relative error (ieee: 1.9e-3, the bf16 rounding); the
# split scan at "ieee" (the default backend below) is faster than either. Keep "ieee".
SCAN_PRECISION = "ieee"

# Where the scan over chunks runs for CUDA tensors: "triton" (the kernels above), "split" (only
# the recurrence in a Triton loop, the outputs batched: fnlm.kernels.deltanet_split) or "torch"
# (`chunk_scan_reference`'s loop: cuBLAS fp32 matmuls, autograd; transformers' own fallback).
# FNLM_DELTANET_SCAN sets it at import; benchmarks set the attribute (bench_train --deltanet-scan).
# "split" is the default: on an H200 at Qwen3.5-9B's DeltaNet shapes it takes 3.7 / 9.9 ms forward
# / forward + backward against the fused scans' 4.3 / 16.3 (16 x 8) and the torch loop's 5.1 /
# 27.3 (bench_deltanet), and Qwen3.5-9B's QLoRA step ran 6,701 tokens/s with it against 1,859 with
# the fused scans (bench_train, docs/benchmarks.md).
SCAN_BACKENDS = ("triton", "split", "torch")
SCAN_BACKEND = os.environ.get("FNLM_DELTANET_SCAN", "split")


# The fused scans' launch past 64-wide keys: value columns per program and warps. At Qwen3.5's
# tiles (32, 4) spill 14.8 / 18.4 KB of stack per thread on sm_90, (16, 8) 1.6 / 1.7 KB
# (scripts/deltanet_resources.py). Measured on an H200 at Qwen3.5-9B's DeltaNet shapes
# (scripts/bench_deltanet.py, docs/benchmarks.md): forward / forward + backward 4.4 / 16.3 ms at
# (16, 8), 4.8 / 16.6 at (32, 8), 18.6 / 62.9 at (32, 4); bench_train --deltanet-launch sets it.
SCAN_WIDE_BV, SCAN_WARPS = 16, 8


def _blocks(chunk: int, dk: int, dv: int) -> tuple[int, int, int]:
    """(BK, BV, value blocks): tl.dot wants every dim >= 16; the value dim is split in blocks of
    <= 64, <= SCAN_WIDE_BV when the keys are wider than 64 (the tiles then fit an SM's shared
    memory)."""
    bk = max(16, triton.next_power_of_2(dk))
    bv = max(16, min(64 if bk <= 64 else SCAN_WIDE_BV, triton.next_power_of_2(dv)))
    return bk, bv, triton.cdiv(dv, bv)


def chunk_scan_fwd(u, w, qd, kd, a, gamma, s0):
    """Launch the forward scan. u [BH, N, C, dv], w / qd / kd [BH, N, C, dk], a [BH, N, C, C],
    gamma [BH, N], s0 [BH, dk, dv], all fp32 and contiguous. Returns (o [BH, N, C, dv], the
    state before each chunk [BH, N, dk, dv], the final state [BH, dk, dv])."""
    bh, n, c, dv = u.shape
    dk = w.shape[-1]
    bk, bv, nv = _blocks(c, dk, dv)
    o = torch.empty_like(u)
    states = u.new_empty(bh, n, dk, dv)
    final = u.new_empty(bh, dk, dv)
    _scan_fwd_kernel[(bh, nv)](
        u, w, qd, kd, a, gamma, s0, o, states, final, n, dk, dv, C=c, BK=bk, BV=bv,
        P=SCAN_PRECISION, num_stages=SCAN_STAGES, num_warps=SCAN_WARPS,
    )  # fmt: skip
    return o, states, final


def chunk_scan_bwd(u, w, qd, kd, a, gamma, states, d_o, d_final):
    """Launch the reverse scan; returns the gradients of (u, w, qd, kd, a, gamma, s0)."""
    bh, n, c, dv = u.shape
    dk = w.shape[-1]
    bk, bv, nv = _blocks(c, dk, dv)
    d_u = torch.empty_like(u)
    d_w, d_qd, d_kd = (u.new_empty(nv, *w.shape) for _ in range(3))
    d_a = u.new_empty(nv, *a.shape)
    d_gamma = u.new_empty(nv, *gamma.shape)
    d_s0 = u.new_empty(bh, dk, dv)
    _scan_bwd_kernel[(bh, nv)](
        u, w, qd, kd, a, gamma, states, d_o.contiguous(), d_final.contiguous(),
        d_u, d_w, d_qd, d_kd, d_a, d_gamma, d_s0, bh, n, dk, dv, C=c, BK=bk, BV=bv,
        P=SCAN_PRECISION, num_stages=SCAN_STAGES, num_warps=SCAN_WARPS,
    )  # fmt: skip
    return d_u, d_w.sum(0), d_qd.sum(0), d_kd.sum(0), d_a.sum(0), d_gamma.sum(0), d_s0


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, differentiable through register_autograd)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fnlm::gated_delta_scan", mutates_args=())
def chunk_scan_op(
    u: torch.Tensor,
    w: torch.Tensor,
    qd: torch.Tensor,
    kd: torch.Tensor,
    a: torch.Tensor,
    gamma: torch.Tensor,
    s0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton scan over chunks; returns (o, states before each chunk, final state). Call through
    `fnlm.kernels.gated_delta_rule`."""
    return chunk_scan_fwd(u, w, qd, kd, a, gamma, s0)


@chunk_scan_op.register_fake
def _(u, w, qd, kd, a, gamma, s0):
    bh, n, _, dv = u.shape
    dk = w.shape[-1]
    return torch.empty_like(u), u.new_empty(bh, n, dk, dv), u.new_empty(bh, dk, dv)


@torch.library.custom_op("fnlm::gated_delta_scan_backward", mutates_args=())
def chunk_scan_backward_op(
    u: torch.Tensor,
    w: torch.Tensor,
    qd: torch.Tensor,
    kd: torch.Tensor,
    a: torch.Tensor,
    gamma: torch.Tensor,
    states: torch.Tensor,
    d_o: torch.Tensor,
    d_final: torch.Tensor,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """Triton reverse scan: gradients of (u, w, qd, kd, a, gamma, s0)."""
    return chunk_scan_bwd(u, w, qd, kd, a, gamma, states, d_o, d_final)


@chunk_scan_backward_op.register_fake
def _(u, w, qd, kd, a, gamma, states, d_o, d_final):
    bh, _, _, dv = u.shape
    dk = w.shape[-1]
    empties = (torch.empty_like(t) for t in (u, w, qd, kd, a, gamma))
    return (*empties, u.new_empty(bh, dk, dv))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, d_o, _d_states, d_final):
    u, w, qd, kd, a, gamma, states = ctx.saved_tensors
    if d_o is None:
        d_o = torch.zeros_like(u)
    if d_final is None:
        d_final = u.new_zeros(states.shape[0], *states.shape[2:])
    return chunk_scan_backward_op(u, w, qd, kd, a, gamma, states, d_o, d_final)


chunk_scan_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# References and the torch parts
# ----------------------------------------------------------------------------------------------


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim (transformers' and FLA's l2norm)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def heads_first(q, k, v, g, beta, qk_l2norm: bool):
    """The inputs as transformers' kernels use them: fp32, [batch, heads, seq, ...], q and k
    repeated to the value heads (each q/k head serves value_heads / key_heads consecutive value
    heads), L2-normed (qk_l2norm), q scaled by dk^-0.5."""
    groups = v.shape[2] // k.shape[2]
    if groups != 1:
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    q, k, v, beta, g = (
        x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        for x in (q, k, v, beta, g)
    )
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    qk_l2norm: bool = True,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule token by token (transformers' `torch_recurrent_gated_delta_rule`).

    q, k [batch, seq, key_heads, dk]; v [batch, seq, value_heads, dv]; g (log decay, <= 0) and
    beta [batch, seq, value_heads]; initial_state [batch, value_heads, dk, dv] (None: zeros);
    reset [batch, seq] bool or None: True zeroes the state before that token (a document start).
    Returns (o [batch, seq, value_heads, dv] in q's dtype, final state fp32)."""
    dtype = q.dtype
    q, k, v, g, beta = heads_first(q, k, v, g, beta, qk_l2norm)
    b, h, t, dk = k.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.float()
    out = []
    for i in range(t):
        if reset is not None:
            s = s * (~reset[:, i]).to(s.dtype)[:, None, None, None]
        s = s * g[:, :, i].exp()[..., None, None]
        delta = (v[:, :, i] - (s * k[:, :, i, :, None]).sum(-2)) * beta[:, :, i, None]
        s = s + k[:, :, i, :, None] * delta[:, :, None, :]
        out.append((s * q[:, :, i, :, None]).sum(-2))
    o = torch.stack(out, dim=2) if out else v.new_zeros(v.shape)
    return o.transpose(1, 2).contiguous().to(dtype), s


def chunk_prepare(q, k, v, g, beta, chunk: int, reset: torch.Tensor | None = None):
    """Per-chunk quantities of the chunked form, from heads-first fp32 inputs (`heads_first`):
    (u, w, qd, kd [batch·heads, chunks, C, ·], a [.., C, C], gamma [.., chunks]) as the scan
    reads them. The sequence is padded to whole chunks with g = beta = k = 0, which leaves the
    state as it is. Torch ops (differentiable), as transformers' torch_chunk_gated_delta_rule.
    reset [batch, seq] bool (document starts, see the module docstring) or None."""
    b, h, t, dk = k.shape
    pad = (chunk - t % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    n = (t + pad) // chunk
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(b * h, n, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    if reset is None:
        cum = g.reshape(b * h, n, chunk).cumsum(-1)
        hidden = upper
        from_start = cum  # log of the decay from the chunk's start to each token
        to_end = cum[..., -1:] - cum  # ... and from each token to the chunk's end
        last = cum[..., -1]
    else:
        cum, doc = _document_cumsum(g.reshape(b, h, n, chunk), F.pad(reset, (0, pad)), chunk)
        hidden = upper | (doc[..., :, None] != doc[..., None, :])
        # -inf as a Python scalar: a tensor built on the device per call is a blocking copy
        from_start = torch.where(doc == 0, cum, float("-inf"))
        to_end = torch.where(doc == doc[..., -1:], cum[..., -1:] - cum, float("-inf"))
        last = torch.where(doc[..., -1] == 0, cum[..., -1], float("-inf"))
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(hidden, float("-inf")).exp()
    # the UT transform: (I + strictly_lower(k_beta k^T * decay))^-1, applied by a triangular solve
    system = (k_beta @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(
        system, k_beta * from_start.exp()[..., None], upper=False, unitriangular=True
    )
    a = (q @ k.transpose(-1, -2)) * decay
    qd = q * from_start.exp()[..., None]
    kd = k * to_end.exp()[..., None]
    return u, w, qd, kd, a, last.exp()


def _document_cumsum(g: torch.Tensor, reset: torch.Tensor, chunk: int):
    """(cumsum of g [b, h, n, C] within each chunk, restarted at each reset; the document of each
    token within its chunk, 0 until the chunk's first reset, +1 at each), both [b·h, n, C]. The
    sums run in fp64 and restart by subtraction, so a document's sums have the precision of the
    document run alone (an fp32 sum carried over a previous document's decay would lose it)."""
    b, h, n, _ = g.shape
    reset = reset.reshape(b, 1, n, chunk)
    doc = reset.long().cumsum(-1).expand(b, h, n, chunk).reshape(b * h, n, chunk)
    g = g.double()
    total = g.cumsum(-1)
    idx = torch.arange(chunk, device=g.device)
    start = torch.where(reset, idx, 0).cummax(-1).values  # the token's document start (or 0)
    before = torch.gather(total - g, -1, start.expand(b, h, n, chunk))  # the sum before it
    cum = torch.where(reset.cumsum(-1) > 0, total - before, total)
    return cum.float().reshape(b * h, n, chunk), doc


def chunk_scan_reference(u, w, qd, kd, a, gamma, s0):
    """The scan over chunks in torch (transformers' loop): (o [BH, N, C, dv], final state)."""
    s, out = s0, []
    for i in range(u.shape[1]):
        v_new = u[:, i] - w[:, i] @ s
        out.append(qd[:, i] @ s + a[:, i] @ v_new)
        s = s * gamma[:, i, None, None] + kd[:, i].transpose(-1, -2) @ v_new
    return torch.stack(out, dim=1), s


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    qk_l2norm: bool = True,
    chunk: int = 64,
    triton_scan: bool = False,
    split: bool = False,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked gated delta rule, same arguments and results as `gated_delta_rule_recurrent`;
    the scan over chunks is the Triton kernel (`triton_scan`; with `split`, the recurrence-only
    loop of fnlm.kernels.deltanet_split) or torch's loop."""
    dtype = q.dtype
    b, t, h, dv = v.shape
    q, k, v, g, beta = heads_first(q, k, v, g, beta, qk_l2norm)
    parts = chunk_prepare(q, k, v, g, beta, chunk, reset)
    dk = k.shape[-1]
    if initial_state is None:
        s0 = v.new_zeros(b * h, dk, dv)
    else:
        s0 = initial_state.float().reshape(b * h, dk, dv)
    if triton_scan and split:
        o, s = deltanet_split.split_scan(*parts, s0)
    elif triton_scan:
        o, _, s = chunk_scan_op(*(x.contiguous() for x in parts), s0.contiguous())
    else:
        o, s = chunk_scan_reference(*parts, s0)
    o = o.reshape(b, h, -1, dv)[:, :, :t]
    return o.transpose(1, 2).contiguous().to(dtype), s.reshape(b, h, dk, dv)
