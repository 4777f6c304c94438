"""The gated delta rule's scan with only the recurrence serial (the "split" scan backend).

fnlm.kernels.deltanet's fused scan runs, per chunk, both the state update and the chunk's output
in one sequential loop; here the loop keeps only what the next chunk needs,

    v_new_i = U_i - W_i S_i;   S_{i+1} = gamma_i S_i + Kd_i^T v_new_i     (S_i kept for each chunk)

and the output o_i = Qd_i S_i + A_i v_new_i is two batched matmuls over all chunks at once, in
torch (autograd takes them). The reverse loop likewise carries only the state's gradient G_{i+1}
(of S_{i+1}) and each chunk's d v_new:

    dvn_i = d v_new_i + Kd_i G_{i+1};   G_i = gamma_i G_{i+1} + d S_i - W_i^T dvn_i

and d U = dvn, d W = -dvn S^T, d Kd = v_new G_next^T, d gamma = <S, G_next> follow in batched
matmuls. Half the serial dots of the fused scan, two [C, dk] tiles live per chunk instead of
three plus A, and twice the programs (16 value columns each). The sm_90 cubins
(`scripts/deltanet_resources.py`, Qwen3.5's tiles, ieee dots) spill 2.2 / 3.2 KB of stack per
thread (forward / backward loop) against the fused scan's 14.8 / 18.4 KB at its launch (32 value
columns, 4 warps) — and 1.6 / 1.7 KB for the fused scan launched as these loops are: the launch
matters as much as the split. Which is faster on a GPU is for `scripts/bench_train.py
--deltanet-scan` to measure; not yet run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fnlm.kernels._deltanet_tiles import chunk_tiles, program_tiles

# Value columns per program, warps per program, and the dots' precision ("ieee": full fp32, the
# 1e-5 agreement with the recurrence) — the least spilling of the sm_90 builds compared.
SPLIT_BV = 16
SPLIT_WARPS = 8
SPLIT_PRECISION = "ieee"


@triton.jit
def _state_fwd_kernel(
    U, W, KD, GAMMA, S0, V_NEW, STATES, S_FINAL,
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
        w = tl.load(W + kmat, mask=mk[None, :], other=0.0)
        v_new = u - tl.dot(w, s, input_precision=P)
        tl.store(V_NEW + vmat, v_new, mask=mv[None, :])
        kd = tl.load(KD + kmat, mask=mk[None, :], other=0.0)
        s = s * tl.load(GAMMA + chunk) + tl.dot(tl.trans(kd), v_new, input_precision=P)
    tl.store(S_FINAL + bh * dk * dv + state_offsets, s, mask=state_mask)


@triton.jit
def _state_bwd_kernel(
    W, KD, GAMMA, D_V_NEW, D_STATES, D_S_FINAL, DVN, G_NEXT, D_S0,
    n_chunks, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, P: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    rc, rk, rv, mk, mv, state_offsets, state_mask = program_tiles(
        tl.program_id(1), dk, dv, C, BK, BV
    )
    g = tl.load(D_S_FINAL + bh * dk * dv + state_offsets, mask=state_mask, other=0.0)
    for j in range(n_chunks):
        i = n_chunks - 1 - j
        chunk = bh * n_chunks + i
        tl.store(G_NEXT + chunk * dk * dv + state_offsets, g, mask=state_mask)
        kmat, vmat = chunk_tiles(chunk, rc, rk, rv, dk, dv, C)
        kd = tl.load(KD + kmat, mask=mk[None, :], other=0.0)
        d_v_new = tl.load(D_V_NEW + vmat, mask=mv[None, :], other=0.0)
        dvn = d_v_new + tl.dot(kd, g, input_precision=P)
        tl.store(DVN + vmat, dvn, mask=mv[None, :])
        w = tl.load(W + kmat, mask=mk[None, :], other=0.0)
        d_state = tl.load(D_STATES + chunk * dk * dv + state_offsets, mask=state_mask, other=0.0)
        g = g * tl.load(GAMMA + chunk) + d_state - tl.dot(tl.trans(w), dvn, input_precision=P)
    tl.store(D_S0 + bh * dk * dv + state_offsets, g, mask=state_mask)


def _grid(u: torch.Tensor, dk: int) -> tuple[tuple[int, int], dict]:
    """The launch grid (rows x heads, value blocks) and the kernels' tile constants."""
    bh, _, c, dv = u.shape
    bv = max(16, min(SPLIT_BV, triton.next_power_of_2(dv)))
    constants = dict(C=c, BK=max(16, triton.next_power_of_2(dk)), BV=bv, P=SPLIT_PRECISION)
    return (bh, triton.cdiv(dv, bv)), constants


def state_scan_fwd(u, w, kd, gamma, s0):
    """Launch the forward loop. u [BH, N, C, dv], w / kd [BH, N, C, dk], gamma [BH, N], s0
    [BH, dk, dv], fp32 and contiguous. Returns (v_new [BH, N, C, dv], the state before each
    chunk [BH, N, dk, dv], the final state [BH, dk, dv])."""
    bh, n, _, dv = u.shape
    dk = w.shape[-1]
    grid, constants = _grid(u, dk)
    v_new = torch.empty_like(u)
    states = u.new_empty(bh, n, dk, dv)
    final = u.new_empty(bh, dk, dv)
    _state_fwd_kernel[grid](
        u, w, kd, gamma, s0, v_new, states, final, n, dk, dv,
        num_warps=SPLIT_WARPS, num_stages=1, **constants,
    )  # fmt: skip
    return v_new, states, final


def state_scan_bwd(w, kd, gamma, d_v_new, d_states, d_final):
    """Launch the reverse loop: (dvn [BH, N, C, dv], the gradient of the state after each chunk
    [BH, N, dk, dv], the gradient of s0 [BH, dk, dv])."""
    bh, n, _, dk = w.shape
    dv = d_v_new.shape[-1]
    grid, constants = _grid(d_v_new, dk)
    dvn = torch.empty_like(d_v_new)
    g_next = w.new_empty(bh, n, dk, dv)
    d_s0 = w.new_empty(bh, dk, dv)
    _state_bwd_kernel[grid](
        w, kd, gamma, d_v_new, d_states, d_final, dvn, g_next, d_s0, n, dk, dv,
        num_warps=SPLIT_WARPS, num_stages=1, **constants,
    )  # fmt: skip
    return dvn, g_next, d_s0


@torch.library.custom_op("fnlm::gated_delta_state_scan", mutates_args=())
def state_scan_op(
    u: torch.Tensor, w: torch.Tensor, kd: torch.Tensor, gamma: torch.Tensor, s0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton loop over chunks: (v_new, states before each chunk, final state)."""
    return state_scan_fwd(u, w, kd, gamma, s0)


@state_scan_op.register_fake
def _(u, w, kd, gamma, s0):
    bh, n, _, dv = u.shape
    dk = w.shape[-1]
    return torch.empty_like(u), u.new_empty(bh, n, dk, dv), u.new_empty(bh, dk, dv)


@torch.library.custom_op("fnlm::gated_delta_state_scan_backward", mutates_args=())
def state_scan_backward_op(
    w: torch.Tensor,
    kd: torch.Tensor,
    gamma: torch.Tensor,
    d_v_new: torch.Tensor,
    d_states: torch.Tensor,
    d_final: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton reverse loop: (dvn, gradient of each chunk's next state, gradient of s0)."""
    return state_scan_bwd(w, kd, gamma, d_v_new, d_states, d_final)


@state_scan_backward_op.register_fake
def _(w, kd, gamma, d_v_new, d_states, d_final):
    return torch.empty_like(d_v_new), torch.empty_like(d_states), torch.empty_like(d_final)


def _setup_context(ctx, inputs, output):
    _, w, kd, gamma, _ = inputs
    ctx.save_for_backward(w, kd, gamma, output[0], output[1])


def _backward(ctx, d_v_new, d_states, d_final):
    w, kd, gamma, v_new, states = ctx.saved_tensors
    d_v_new = torch.zeros_like(v_new) if d_v_new is None else d_v_new.contiguous()
    d_states = torch.zeros_like(states) if d_states is None else d_states.contiguous()
    if d_final is None:
        d_final = states.new_zeros(states.shape[0], *states.shape[2:])
    dvn, g_next, d_s0 = state_scan_backward_op(
        w, kd, gamma, d_v_new, d_states, d_final.contiguous()
    )
    d_w = -(dvn @ states.transpose(-1, -2))
    d_kd = v_new @ g_next.transpose(-1, -2)
    d_gamma = (states * g_next).sum((-2, -1))
    return dvn, d_w, d_kd, d_gamma, d_s0


state_scan_op.register_autograd(_backward, setup_context=_setup_context)


def state_scan_reference(u, w, kd, gamma, s0):
    """The loop in torch: (v_new [BH, N, C, dv], states before each chunk, final state)."""
    s, v_new, states = s0, [], []
    for i in range(u.shape[1]):
        states.append(s)
        v_new.append(u[:, i] - w[:, i] @ s)
        s = s * gamma[:, i, None, None] + kd[:, i].transpose(-1, -2) @ v_new[-1]
    return torch.stack(v_new, dim=1), torch.stack(states, dim=1), s


def split_scan(u, w, qd, kd, a, gamma, s0):
    """(o [BH, N, C, dv], final state): the Triton loop, then the chunks' outputs o = Qd S +
    A v_new in two batched matmuls. Differentiable."""
    v_new, states, final = state_scan_op(*(x.contiguous() for x in (u, w, kd, gamma, s0)))
    return qd @ states + a @ v_new, final
