"""Several processes (`torchrun --nproc_per_node N`): the process group, rank helpers, and the
data-parallel reduction of a step.

LoRA / QLoRA data parallelism: every rank holds the whole frozen base and the same adapters; each
runs its share of the step's micro-batches and `reduce_step` all-reduces the adapters' gradients
as one flat bucket after the last backward. Not torch DDP: DDP needs an nn.Module and hooks its
autograd, while fnlm's adapters are plain tensors and a step's backward may be a CUDA graph
replay; one all-reduce per optimizer step (after gradient accumulation, outside any graph) is
what DDP with `no_sync` over the accumulation would do, minus the overlap with backward, which
for adapter gradients costs little: Llama-3.1-8B with r=16 on all seven projections has 41.9M
adapter elements, 168 MB of fp32 gradients, about 0.5 ms (2 GPUs) to 0.7 ms (4) of NVLink ring
all-reduce at ~370 GB/s bus bandwidth, against a step of 2 x 2048 tokens per GPU of ~0.4 s
(estimates, not measured: 4 x params x tokens FLOPs at 40% of an H200's bf16 peak). An
overlap would need gradient hooks launching bucketed async all-reduces, which a CUDA-graph replay
(the default GPU step) never calls, and a failure protocol for a rank stopping between buckets:
not worth 0.2% of a step.

Full fine-tuning with distributed="fsdp" is sharded by `fnlm.train.fsdp`: FSDP2 reduce-scatters
the gradients inside the backward, `reduce_step` then carries only the loss and the failure flag,
and `clip_grad_norm` takes the DTensor shards. LoRA with distributed="fsdp" shards the frozen base
the same way, and its replicated adapters' gradients go through `reduce_step` as above.

A rank that raises inside a step does not leave the others waiting: its failure flag travels in
the same all-reduce as the gradients, every rank then learns which rank failed and why, and all
raise (under FSDP, whose collectives run inside the step, see `stop_sharded_step`). A rank that
dies outside a step is torchrun's (or mp.spawn's) to stop: it ends the other
workers when one exits with an error; the process group's timeout is the last resort.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from fnlm.errors import ArgumentError, FnlmError

# How long a collective waits for a missing rank before failing. A barrier waits while rank 0
# writes a checkpoint or the final model (minutes for a multi-GB full fine-tune), so not shorter.
TIMEOUT = timedelta(minutes=15)


class RankFailedError(FnlmError):
    """Another rank of a distributed run failed; the message holds its rank and error."""


def requested() -> bool:
    """Whether this process was started as one of several (torchrun sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | None = None, *, single: bool = False) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): nccl when CUDA is available (each process on GPU LOCAL_RANK) and `device` (the
    run's TrainConfig.device) is not the CPU, gloo otherwise. single: make a group of this one
    process when torchrun did not start several (FSDP needs a group even for one).
    Returns True when this call created the group (the caller then `teardown`s it), False when
    there is one process (and not `single`) or a group already exists. Raises ArgumentError for
    a `device` naming another GPU than LOCAL_RANK's."""
    if dist.is_initialized() or not (requested() or single):
        return False
    gpu = torch.cuda.is_available() and torch.device(device or "cuda").type == "cuda"
    if gpu and requested():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        index = torch.device(device or "cuda").index
        if index is not None and index != local:
            raise ArgumentError(
                f"device {device!r} under torchrun: process {os.environ.get('RANK')} (LOCAL_RANK "
                f"{local}) trains on cuda:{local}; pass device 'cuda' (--device cuda) or leave it "
                "unset"
            )
        torch.cuda.set_device(local)
    backend = "nccl" if gpu else "gloo"
    if requested():
        dist.init_process_group(backend, timeout=TIMEOUT)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def teardown() -> None:
    """Leave the process group (`train` does, after `finish`'s barrier: no rank leaves while
    rank 0 still writes the result)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one that writes checkpoints, metrics and the final adapter or model."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing with one process)."""
    if active():
        dist.barrier()


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """The element-wise sum of `values` over all ranks (the values themselves with one process)."""
    if not active():
        return list(values)
    buffer = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(buffer)
    return buffer.tolist()


def broadcast_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values of `tensors` into every rank's (the replicas start equal)."""
    if not active():
        return
    with torch.no_grad():
        for tensor in tensors:
            if isinstance(tensor, DTensor):  # FSDP shards: not replicas
                continue
            moved = tensor.detach().to(_device())
            dist.broadcast(moved, 0)
            if moved is not tensor:
                tensor.copy_(moved)


def reduce_step(
    tensors: Sequence[torch.Tensor], summed_loss: float, failure: BaseException | None
) -> float:
    """After a step's backward on every rank: sum the gradients of `tensors` and the summed losses
    over the ranks in one all-reduce (each rank's gradients are already divided by the step's
    global token count, so the sum is the gradient of the whole global batch). Returns the global
    summed loss.

    failure: the exception this rank's step raised (its gradients count as zero). When any rank
    failed, every rank raises: the failed one its own exception, the others RankFailedError
    naming the failed ranks and their errors."""
    sharded = isinstance(tensors, ShardedStep)
    tensors = [t for t in tensors if not isinstance(t, DTensor)]  # FSDP reduced its shards
    if failure is not None and sharded:
        stop_sharded_step(failure)
    device = _device()
    grads = [
        (t.grad if t.grad is not None else torch.zeros_like(t)).reshape(-1).to(device, torch.float32)
        for t in tensors
    ]  # fmt: skip
    loss = 0.0 if failure is not None else summed_loss
    flat = torch.cat([*grads, torch.tensor([loss, float(failure is not None)], device=device)])
    dist.all_reduce(flat)
    if flat[-1].item() > 0:
        errors: list = [None] * world_size()
        mine = None if failure is None else f"{type(failure).__name__}: {failure}"
        dist.all_gather_object(errors, mine)
        if failure is not None:
            raise failure
        failed = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None)
        raise RankFailedError(
            f"training stopped on rank {rank()} because another rank failed in the step ({failed})"
        )
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            if t.grad is None:
                t.grad = torch.zeros_like(t)
            t.grad.copy_(flat[offset : offset + n].view_as(t.grad))
            offset += n
    return float(flat[-2])


FAILURE_KEY = "fnlm/failed/"


class ShardedStep(list):
    """The trained tensors of a step whose forward and backward run FSDP's collectives
    (`fnlm.train.fsdp.ShardedTrainable.tensors`: DTensor shards, or replicated adapters over a
    sharded base): a failure in such a step is told through `stop_sharded_step`."""


def stop_sharded_step(failure: BaseException) -> None:
    """A step of a sharded (FSDP) run failed on this rank. Its collectives run inside the forward
    and backward, where the other ranks now wait on this one, so it cannot join the all-reduce
    that `reduce_step` would tell them through. Instead: when another rank already recorded its
    failure in the group's store (this rank's failure is then the broken collective), raise
    RankFailedError naming it; else record this one's and leave the group, which breaks the
    others' pending collectives at once (gloo; under nccl torchrun ends them when this process
    exits), and raise `failure`."""
    store = dist.distributed_c10d._get_default_store()
    others = []
    for other in range(world_size()):
        with contextlib.suppress(Exception):  # the store may be gone with the rank that held it
            if other != rank() and store.check([f"{FAILURE_KEY}{other}"]):
                others.append(f"rank {other}: {store.get(f'{FAILURE_KEY}{other}').decode()}")
    if others:
        raise RankFailedError(
            f"training stopped on rank {rank()} because another rank failed in the step "
            f"({'; '.join(others)})"
        ) from failure
    with contextlib.suppress(Exception):
        store.set(f"{FAILURE_KEY}{rank()}", f"{type(failure).__name__}: {failure}")
    if dist.get_backend() == "nccl":  # a graceful destroy could wait on the stalled collectives
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()
    raise failure


def clip_grad_norm(tensors: Sequence[torch.Tensor], limit: float) -> float:
    """torch.nn.utils.clip_grad_norm_ that also takes FSDP's DTensor shards: the norm of the
    whole gradient (the shards' partial norms combined over the ranks) scales every shard."""
    return float(clip_grads(tensors, limit))


def clip_grads(tensors: Sequence[torch.Tensor], limit: float) -> torch.Tensor:
    """`clip_grad_norm` without reading the norm: a 0-d tensor, for a step that reads it
    together with its loss (`fnlm.train.step.train_step`)."""
    grads = [t.grad for t in tensors if t.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(tensors, limit, total)
    return total


def shard_batches(batches: Iterable[dict], *, even: bool) -> Iterator[tuple[dict, bool]]:
    """This rank's share of `batches` (every world_size-th, from its rank), as (batch, counted).
    even: every rank gets as many as the first (an FSDP forward is a collective of all ranks):
    a rank short of one repeats a batch with counted False (evaluated, not counted)."""
    first, total = None, 0
    for i, batch in enumerate(batches):
        first, total = first if first is not None else batch, total + 1
        if i % world_size() == rank():
            yield batch, True
    if even and first is not None and rank() >= total % world_size() > 0:
        yield first, False
