"""One optimizer step over micro-batches, evaluation, and what is trained (`Trainable`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from fnlm import data as data_lib
from fnlm import lora as lora_lib
from fnlm.errors import ArgumentError
from fnlm.params import Params, leaf_paths, path_name, tree_map
from fnlm.train import distributed
from fnlm.train.graphs import StepGraphs, eager_backward


def train_step(
    loss_fn: Callable[[dict], torch.Tensor],
    batches: Sequence[dict],
    optimizer: torch.optim.Optimizer,
    scheduler,
    tensors: Sequence[torch.Tensor],
    *,
    max_grad_norm: float | None = 1.0,
    count: Callable[[dict], int] | Sequence[int] = data_lib.trained_tokens,
    graphs: StepGraphs | None = None,
    real: Callable[[dict], int] | Sequence[int] | None = None,
    while_waiting: Callable[[], None] | None = None,
) -> dict:
    """One optimizer step over several micro-batches (gradient accumulation).

    loss_fn(batch) returns the SUMMED token loss of a micro-batch; each is divided by the number
    of trained tokens of the whole step before its backward, so the gradient equals that of one
    big batch holding all micro-batches (not an average of per-micro-batch means).
    count(batch): what a micro-batch's loss is a sum over (default its trained tokens; the
    preference methods count pairs, GRPO sequences or completion tokens); or the micro-batches'
    counts themselves, taken on the host before the copy to the device (no device read).
    graphs: run each micro-batch's forward + backward through CUDA graphs (`StepGraphs`); the
    gradients are then zeroed in place instead of dropped.
    Several processes (`distributed`): the count is summed over the ranks before the backward and
    the gradients and losses after it, so N ranks equal one process running all their batches.
    loss_fn may return (summed loss, stats), stats a dict of 0-d tensors (the methods' logged
    values, read after the step): the result then has "stats", one dict per micro-batch.
    real(batch): a micro-batch's tokens that are not padding (or their counts, as `count`);
    given, the result's "tokens" is their count over the step (and the ranks, in the same
    all-reduce as `count`'s).
    while_waiting(): host work to overlap with the GPU's (the run loop collates the next step's
    batches there): called once every micro-batch's forward and backward is launched, before the
    step's first read of a device value.
    One process reads the device once per step: the summed loss and the gradient norm together
    (the gradients are clipped on the device first; with a non-finite loss or norm the clipped
    gradients are dropped, not applied). Several processes read as `distributed.reduce_step` and
    `distributed.clip_grad_norm` do.
    Returns {"loss", "grad_norm", "lr", "trained_tokens", "read_at"} (and "stats", "tokens");
    read_at: time.perf_counter() just after the step's last device read. When the loss or
    gradient norm is not finite, no update is made and the returned loss says so.
    """
    total_tokens = counted(count, batches, "count")
    real_tokens = counted(real, batches, "real") if real is not None else 0
    several = distributed.active()
    if several:  # each rank's share is divided by the global batch's count
        total_tokens, real_tokens = map(
            int, distributed.sum_over_ranks([total_tokens, real_tokens])
        )
    denominator = max(total_tokens, 1)
    summed, failure = None, None
    stats: list[dict] = []
    try:
        for batch in batches:
            if graphs is not None:
                loss = graphs.backward(loss_fn, batch, denominator)
            else:
                loss = eager_backward(loss_fn, batch, denominator)
            if isinstance(loss, tuple):  # (loss, stats): a method's logged values, as tensors
                loss, batch_stats = loss
                stats.append(batch_stats)
            summed = loss if summed is None else summed + loss
        if while_waiting is not None:
            while_waiting()
    except Exception as e:
        if not several:
            raise
        failure = e  # the other ranks wait in reduce_step's all-reduce: tell them, then raise
    limit = max_grad_norm if max_grad_norm else float("inf")
    if several:  # after the (possibly graphed) backward, outside any graph
        summed = distributed.reduce_step(tensors, 0.0 if summed is None else float(summed), failure)
        mean = summed / denominator
        grad_norm = float("nan")
        if math.isfinite(mean):
            grad_norm = distributed.clip_grad_norm(tensors, limit)  # FSDP's shards too
    else:  # clipped on the device, then loss and norm in one read
        norm = distributed.clip_grads(tensors, limit)  # FSDP's shards too (one process)
        summed = torch.zeros((), device=norm.device) if summed is None else summed
        pair = torch.stack([summed.double(), norm.to(summed.device, torch.float64)])
        summed, grad_norm = pair.tolist()
        mean = summed / denominator
        if not math.isfinite(mean):  # the norm of a non-finite step's gradients is not reported
            grad_norm = float("nan")
    read_at = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    extra = {"stats": stats} if stats else {}
    if real is not None:
        extra["tokens"] = real_tokens
    result = {"loss": mean, "grad_norm": grad_norm, "lr": lr, "trained_tokens": total_tokens,
              "read_at": read_at, **extra}  # fmt: skip
    set_to_none = graphs is None  # a captured backward adds into the same .grad tensors
    if not math.isfinite(mean) or not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=set_to_none)
        if math.isfinite(mean):
            result["loss"] = float("nan")
        return result
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=set_to_none)
    return result


def counted(
    count: Callable[[dict], int] | Sequence[int], batches: Sequence[dict], name: str
) -> int:
    """The step's sum of `count` over its micro-batches: count(batch) each, or counts taken on
    the host before the copy (one per micro-batch)."""
    if callable(count):
        return sum(count(b) for b in batches)
    if len(count) != len(batches):
        raise ArgumentError(
            f"train_step: {name} holds {len(count)} counts for {len(batches)} micro-batches; "
            "give one per micro-batch, or a function of a micro-batch"
        )
    return sum(count)


@torch.no_grad()
def evaluate(
    loss_fn: Callable[[dict], torch.Tensor], batches: Iterator[dict], *, even: bool = False
) -> float:
    """Mean token loss over batches (summed losses / trained tokens), without gradients. Several
    processes share the batches (`distributed.shard_batches`; even: as many forwards on every
    rank, for FSDP) and sum the losses and tokens."""
    total, tokens = 0.0, 0
    for batch, counted in distributed.shard_batches(batches, even=even):
        value = float(loss_fn(batch))
        if counted:
            total += value
            tokens += data_lib.trained_tokens(batch)
    total, tokens = distributed.sum_over_ranks([total, tokens])
    return total / max(tokens, 1)


class Trainable:
    """The trainable tensors of a run, and the (params, lora) a loss call sees.

    LoRA modes: the adapter tensors. Full mode: every floating tensor of params (tied weights
    once); with fp32 master weights the optimizer holds fp32 copies and each step casts them
    to the params' dtype, so gradients flow through the cast into the fp32 copies.
    """

    def __init__(self, params: Params, lora, *, full: bool, fp32_master: bool):
        self.params, self.lora, self.full = params, lora, full
        self.master: dict[int, torch.Tensor] | None = None
        if not full:
            self.named = [(path_name(p), t) for p, t in leaf_paths(dict(lora))]
            return
        self.named, seen = [], set()
        for path, leaf in leaf_paths(dict(params)):
            if not isinstance(leaf, torch.Tensor):
                raise ArgumentError(
                    f"full fine-tuning needs 16/32-bit weights, but {path_name(path)} is "
                    f"{type(leaf).__name__}; load the model with quant=None (mode='full' does)"
                )
            if id(leaf) in seen or not leaf.is_floating_point():
                continue
            seen.add(id(leaf))
            self.named.append((path_name(path), leaf))
        if fp32_master and any(t.dtype != torch.float32 for _, t in self.named):
            self.master = {}
            named = []
            for name, leaf in self.named:
                copy = leaf.detach().float().requires_grad_(True)
                self.master[id(leaf)] = copy
                named.append((name, copy))
            self.named = named
        else:
            for _, leaf in self.named:
                leaf.requires_grad_(True)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t in self.named]

    def model(self, training: bool):
        """(params, lora) for one loss call."""
        if not self.full:
            return self.params, lora_lib.train_mode(self.lora, training)
        if self.master is None:
            return self.params, None
        casts: dict[int, torch.Tensor] = {}

        def cast(t):
            if id(t) not in self.master:
                return t
            if id(t) not in casts:  # a tied weight is cast once and shared
                casts[id(t)] = self.master[id(t)].to(t.dtype)
            return casts[id(t)]

        return tree_map(cast, self.params), None

    def final_params(self) -> Params:
        """Full mode: the params with the trained values (master weights cast back)."""
        if self.master is None:
            return self.params
        with torch.no_grad():
            for t in {
                id(t): t for _, t in leaf_paths(dict(self.params)) if id(t) in self.master
            }.values():
                t.copy_(self.master[id(t)])
        return self.params
