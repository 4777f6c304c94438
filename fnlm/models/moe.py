"""Mixture-of-experts MLPs over stacked expert weights, routed without host syncs.

Each MoE layer holds its experts as two stacks, laid out as transformers 5 holds them (and as
peft's `target_parameters` adapts them):

    params["layers"][n]["mlp"]["experts"] = {"gate_up": [E, 2·I, H], "down": [E, H, I]}

A 16-bit stack is a 3-D tensor; a quantized stack is the quantized [E·out, in] matrix (NF4's blocks
of 64 never straddle two experts when `in` is a multiple of 64), so the quantizers stay 2-D.
Checkpoints name each expert's matrices separately ("...experts.3.gate_proj.weight"); the family's
`weight_names` maps them to per-expert paths ("layers", n, "mlp", "experts", 3, "gate") and
`stack_slot` says where each lands in the stack (used by the loader and the exporter).

Routing (`route`: softmax top-k, or DeepSeek-V3's sigmoid group-limited top-k with a correction
bias) sorts the token/expert pairs by expert with device ops only, so a decode step with MoE
layers can be captured in a CUDA graph. `matmul` then multiplies each expert's rows by
that expert's matrix: one `torch._grouped_mm` on CUDA in bf16 (differentiable in the rows and in
dense stacks, e.g. LoRA factors), else a loop over the experts (it reads the row counts on the
host; used on CPU and in fp32/fp16): `fnlm.quant.stack_matmul`, where a quantized stack's matmul
is one custom op that dequantizes inside (and again in backward: the 16-bit stack is never saved).
Decode-sized rows over an NF4 stack go to the expert GEMV (`fnlm.kernels.nf4_expert_gemv`), which
reads only the chosen experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fnlm import kernels, quant
from fnlm.config import ModelConfig
from fnlm.errors import ArgumentError

# rows (tokens x experts per token) up to which an NF4 stack's matmul is the expert GEMV, which
# reads each row's expert once per row, rather than dequantize-everything + grouped GEMM (which
# reads every expert once, 4-bit, and writes and reads it again in 16 bits). H200, CUDA graph,
# scripts/bench_moe.py, 2026-12-03, ms per MoE block, GEMV vs dequantize + grouped:
#   Qwen3-30B-A3B (128 experts)  8 rows 0.149 vs 1.082   64 rows 0.623 vs 1.222
#   Mixtral-8x7B  (8 experts)    2 rows 0.751 vs 2.582   16 rows 4.875 vs 3.206
# so the GEMV up to one row per expert.
EXPERT_GEMV_MAX_ROWS = 64
EXPERT_GEMV_MAX_ROWS_PER_EXPERT = 1

# per-expert leaf name -> (stack name, which half of the stack's rows; None for the whole)
EXPERT_PARTS = {"gate": ("gate_up", 0), "up": ("gate_up", 1), "down": ("down", None)}
STACKS = ("gate_up", "down")


@dataclass(frozen=True)
class Slot:
    """Where one expert's matrix lands in its stack: stack[expert, rows]."""

    stack: tuple  # the stack's param path ("layers", n, "mlp", "experts", "gate_up")
    expert: int
    half: int | None  # 0 = gate rows, 1 = up rows, None = all rows


def stack_slot(path: tuple) -> Slot | None:
    """The Slot of a per-expert checkpoint path ("layers", n, "mlp", "experts", e, "gate"), or None
    for any other path."""
    if len(path) == 6 and path[3] == "experts" and isinstance(path[4], int):
        stack, part = EXPERT_PARTS[path[5]]
        return Slot((*path[:4], stack), path[4], part)
    return None


def stack_shape(config: ModelConfig, name: str) -> tuple[int, int, int]:
    """[E, out, in] of the "gate_up" or "down" stack."""
    e, h, i = config.num_experts, config.hidden_size, config.expert_size
    return (e, 2 * i, h) if name == "gate_up" else (e, h, i)


def rows(slot: Slot, stack: torch.Tensor) -> torch.Tensor:
    """The view of `stack` [E, out, in] that holds this slot's expert matrix."""
    return half(slot, stack[slot.expert])


def half(slot: Slot, block: torch.Tensor) -> torch.Tensor:
    """The rows of one expert's [out, in] block that this slot holds (gate or up of gate_up)."""
    if slot.half is None:
        return block
    size = block.shape[0] // 2
    return block[slot.half * size : (slot.half + 1) * size]


def dense(w, experts: int) -> torch.Tensor:
    """A stack as a [E, out, in] tensor in its compute dtype (quantized stacks dequantized)."""
    if isinstance(w, torch.Tensor):
        return w
    return quant.dequantize(w).view(experts, -1, w.shape[1])


def quantize_stack(stack: torch.Tensor, quantize) -> object:
    """Quantize a [E, out, in] stack as the [E·out, in] matrix."""
    return quantize(stack.reshape(-1, stack.shape[-1]))


# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """The token/expert pairs of one MoE layer, sorted by expert (stable: tokens ascending).

    order: [P] pair index (token · k + slot) of each sorted row; tokens: [P] its token;
    weights: [P] its routing weight (compute dtype); offsets: [E] int32, end row of each expert.
    """

    order: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor
    offsets: torch.Tensor
    experts: int
    per_token: int


def route(
    config: ModelConfig,
    router_logits: torch.Tensor,
    dtype: torch.dtype,
    expert_scale: torch.Tensor | None = None,
    correction: torch.Tensor | None = None,
) -> Route:
    """transformers' routing of router_logits [T, E], then the pairs sorted by expert. No host reads.

    Softmax scoring (Mixtral, Qwen): softmax in fp32, top-k, optional renormalisation, optional
    learned scale per expert (`expert_scale` [E], Gemma 4). Sigmoid scoring (DeepSeek-V3,
    GLM-4.5): `sigmoid_topk` with the router's `correction` bias [E]. The weights are then
    times config.moe_routed_scale and cast to the compute dtype `dtype`."""
    k = config.experts_per_token
    if config.moe_scoring == "sigmoid":
        weights, chosen = sigmoid_topk(config, router_logits, correction)
    else:
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, k, -1)
        if config.moe_renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    if expert_scale is not None:
        weights = weights * expert_scale[chosen]
    if config.moe_routed_scale != 1.0:
        weights = weights * config.moe_routed_scale
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # bincount would read its max on the host; a scatter-add of ones does not
    counts = torch.zeros(config.num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return Route(
        order=order,
        tokens=order // k,
        weights=weights.to(dtype).reshape(-1)[order],
        offsets=torch.cumsum(counts, 0).to(torch.int32),
        experts=config.num_experts,
        per_token=k,
    )


def sigmoid_topk(
    config: ModelConfig, router_logits: torch.Tensor, correction: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's "noaux_tc" choice (GLM-4.5's too), as transformers' TopkRouter computes it:
    scores = sigmoid(logits) in fp32; experts are chosen by scores + correction (the load-balancing
    bias, trained outside the loss), only inside the moe_topk_groups of the moe_groups groups whose
    best two corrected scores sum highest; their weights are the uncorrected scores, renormalized
    (+1e-20) with moe_renormalize. Returns (weights [T, k] fp32, chosen [T, k]).

    Device ops only (topk, scatter, masked_fill): no host reads, so CUDA graphs capture it."""
    scores = torch.sigmoid(router_logits.float())
    choice = scores if correction is None else scores + correction.float()
    groups, experts = config.moe_groups, config.num_experts
    if groups > 1:  # one group, all kept: transformers' mask is all ones
        tokens, size = choice.shape[0], experts // groups
        by_group = choice.view(tokens, groups, size)
        group_scores = by_group.topk(2, dim=-1).values.sum(dim=-1)  # [T, groups]
        best = torch.topk(group_scores, config.moe_topk_groups, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = by_group.masked_fill(~keep[..., None], float("-inf")).view(tokens, experts)
    chosen = torch.topk(choice, config.experts_per_token, dim=-1, sorted=False).indices
    weights = scores.gather(1, chosen)
    if config.moe_renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, chosen


def param_dtype(config: ModelConfig, path: tuple, dtype: torch.dtype) -> torch.dtype:
    """The dtype a floating params leaf is stored in: `dtype`, but fp32 for the router's correction
    bias and, with sigmoid scoring, the router (transformers keeps both in fp32:
    `_keep_in_fp32_modules_strict` of DeepSeek-V3 and GLM-4.5; the router then runs in fp32)."""
    name = path[-1]
    if name == "router_correction" or (name == "router" and config.moe_scoring == "sigmoid"):
        return torch.float32
    return dtype


def combine(route: Route, y: torch.Tensor, tokens: int) -> torch.Tensor:
    """Sum each token's k expert outputs (sorted rows y [P, H], already weighted) into [T, H]:
    the rows go back to pair order, then k-sums per token (deterministic, unlike index_add_)."""
    unsorted = torch.empty_like(y).index_copy_(0, route.order, y)
    return unsorted.view(tokens, route.per_token, -1).sum(dim=1)


# ----------------------------------------------------------------------------------------------
# Grouped matmul
# ----------------------------------------------------------------------------------------------


def grouped_available(x: torch.Tensor, stack: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` serves x [P, in] @ stack [E, out, in]^T."""
    return x.dtype == stack.dtype and _grouped_case(x, stack.shape[1], stack.shape[2])


def _grouped_case(x: torch.Tensor, out: int, inner: int) -> bool:
    """CUDA, bf16, sm90+, and rows of 16-byte multiples (its alignment rule)."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and out % 8 == 0
        and inner % 8 == 0
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
    )


def grouped_everywhere(params) -> bool:
    """Whether every expert matmul of `params` (LoRA factors included) takes the grouped GEMM,
    so a forward reads nothing on the host and can be captured in a CUDA graph."""
    return all(
        _grouped_case(torch.empty(0, device=device, dtype=dtype), out, inner)
        for out, inner, dtype, device in matmul_shapes(params)
    )


def matmul_shapes(params) -> list[tuple[int, int, torch.dtype, torch.device]]:
    """(out, in, compute dtype, device) of each expert matrix a forward multiplies by: every
    stack's experts, and the A [r, in] and B [out, r] of LoRA-adapted stacks."""
    config, shapes = params.config, []
    for n in config.moe_layers:
        for w in params["layers"][n]["mlp"]["experts"].values():
            stack = getattr(w, "weight", w)
            out, inner = stack.shape[-2:]
            if len(stack.shape) == 2:  # quantized: [E·out, in]
                out //= config.num_experts
            shapes.append((out, inner, stack.dtype, stack.device))
            for factor in getattr(w, "a", None), getattr(w, "b", None):
                if factor is not None:
                    shapes.append((*factor.shape[1:], factor.dtype, factor.device))
    return shapes


def matmul(route: Route, x: torch.Tensor, w, *, grouped: bool | None = None) -> torch.Tensor:
    """Rows x [P, in] in route order times their expert's matrix: [P, out], row i = x[i] @ W[e]^T.

    w: a stack (dense [E, out, in] or quantized [E·out, in]); differentiable in x and in a dense
    w. A quantized stack is frozen: its matmul is one custom op whose backward dequantizes again
    rather than keep the 16-bit stack. grouped: force the grouped GEMM on or off (None: on where
    `grouped_available`)."""
    if w.shape[-1] != x.shape[-1]:
        raise ArgumentError(
            f"moe.matmul: rows have {x.shape[-1]} features, the expert stack {tuple(w.shape)} "
            f"expects {w.shape[-1]}"
        )
    if grouped is None and _expert_gemv_case(route, x, w):
        owner = torch.bucketize(
            torch.arange(x.shape[0], device=x.device), route.offsets.long(), right=True
        )
        return kernels.nf4_expert_gemv(x, owner, w, route.experts)
    if grouped is None:
        if quant.is_quantized(w):  # [E·out, in], dequantized to its compute dtype
            out = w.shape[0] // route.experts
            grouped = w.dtype == x.dtype and _grouped_case(x, out, w.shape[1])
        else:  # cast to x's dtype
            grouped = _grouped_case(x, w.shape[1], w.shape[2])
    return quant.stack_matmul(x, route.offsets, w, route.experts, grouped)


def _expert_gemv_case(route: Route, x: torch.Tensor, w) -> bool:
    """A few rows without grad against an NF4 stack on the Triton path: the expert GEMV reads only
    the chosen experts' bytes (the grouped GEMM would dequantize every expert first)."""
    return (
        x.shape[0] <= min(EXPERT_GEMV_MAX_ROWS, route.experts * EXPERT_GEMV_MAX_ROWS_PER_EXPERT)
        and not (torch.is_grad_enabled() and x.requires_grad)
        and kernels.use_triton(x)
        and kernels.nf4_expert_gemv_supported(x, w, route.experts)
    )
