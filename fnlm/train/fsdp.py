"""Full fine-tuning sharded over the processes with FSDP2 (`torch.distributed.fsdp.fully_shard`),
for models whose weights, gradients and AdamW state do not fit one GPU (`distributed="fsdp"`).

The params pytree stays the model: `ShardedModel` holds its tensors as the parameters of thin
`nn.Module`s — one per decoder layer and one root for the rest (embedding, final norm, lm head) —
whose forwards only hand those tensors, as a pytree, to fnlm's layer function and loss. Nothing of
the math moves into modules; the modules exist so that `fully_shard` can own the tensors:

- each layer's tensors are sharded on dim 0 as DTensors (one all-gather and one reduce-scatter per
  layer), the root's likewise; parameter names are fnlm's path names ("layers.3.attn.q");
- FSDP's forward pre-hook all-gathers a layer into unsharded tensors that it installs on the
  module, so the layer's forward reads the gathered weights; its forward hook frees them, and its
  backward hooks gather them again (activation checkpointing recomputes through them) and
  reduce-scatter the gradients. The reduction SUMS (divide factor 1): each rank's loss is
  already divided by the global batch's token count, as in `fnlm.train.step.train_step`;
- `MixedPrecisionPolicy`: with fp32_master_weights the shards are fp32 and the layers compute in
  the model's dtype, gradients reduced in fp32; `CPUOffloadPolicy` (fsdp_cpu_offload) keeps the
  shards, gradients and optimizer state in host memory.

Checkpoints go through `torch.distributed.checkpoint` (every rank writes its shards into one
directory, rank 0 the rest), so a run resumes on any number of processes; the final model is
gathered on rank 0 and written as a single-GPU run writes it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils._pytree as pytree
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from fnlm import files
from fnlm.errors import ArgumentError, CheckpointError
from fnlm.loss import loss as model_loss
from fnlm.params import Params, leaf_paths, path_name
from fnlm.train import distributed
from fnlm.train.checkpoint import checkpoint_path, read_run_state, write_run_state

# A sharded checkpoint's torch.distributed.checkpoint directory (model and optimizer state).
SHARDED_DIR = "sharded"


class _Tree(nn.Module):
    """A subtree of the params (nested dicts and lists) as a module: its floating tensors are the
    module's parameters (one Parameter per tensor, shared where the tree shares a tensor, as tied
    embeddings do), other tensors buffers, subtrees submodules; `tree()` gives the pytree back
    with whatever tensors FSDP has installed (sharded, or gathered during a forward)."""

    def __init__(self, node: dict | list, made: dict[int, nn.Parameter], dtype, where: str):
        super().__init__()
        self._fnlm_list = isinstance(node, list)
        self._fnlm_keys = []
        for key, value in enumerate(node) if self._fnlm_list else node.items():
            name, path = str(key), f"{where}.{key}" if where else str(key)
            if hasattr(self, name):
                raise ArgumentError(f"fsdp: the params entry {path} clashes with nn.Module.{name}")
            if isinstance(value, dict | list):
                self.add_module(name, _Tree(value, made, dtype, path))
            elif isinstance(value, torch.Tensor) and value.is_floating_point():
                if id(value) not in made:
                    made[id(value)] = nn.Parameter(value.detach().to(dtype or value.dtype))
                self.register_parameter(name, made[id(value)])
            elif isinstance(value, torch.Tensor):
                self.register_buffer(name, value)
            else:
                raise ArgumentError(
                    f"fsdp shards 16/32-bit tensors, but {path} is {type(value).__name__}; load "
                    "the model with quant=None (mode='full' does)"
                )
            self._fnlm_keys.append(name)

    def tree(self) -> dict | list:
        values = []
        for name in self._fnlm_keys:
            if name in self._modules:
                values.append(self._modules[name].tree())
            elif name in self._parameters:
                values.append(self._parameters[name])
            else:
                values.append(self._buffers[name])
        return values if self._fnlm_list else dict(zip(self._fnlm_keys, values, strict=True))


class _Layer(_Tree):
    """One decoder layer: its forward runs the layer function on the tensors FSDP gathered."""

    def forward(self, config, layer_fn, x, cos, sin, mask):
        return layer_fn(config, self.tree(), x, cos, sin, mask)


class ShardedModel(_Tree):
    """The params as FSDP2 modules: `layers.<i>` one sharded group per decoder layer, the other
    top-level entries one root group. Calling it returns the summed token loss of a batch."""

    def __init__(self, params: Params, *, master_dtype, compute_dtype, offload: bool, device):
        made: dict[int, nn.Parameter] = {}
        super().__init__({k: v for k, v in params.items() if k != "layers"}, made, master_dtype, "")
        self.config = params.config
        mesh = init_device_mesh(device.type, (distributed.world_size(),))
        cast = compute_dtype if master_dtype not in (None, compute_dtype) else None
        options = dict(
            mesh=mesh,
            # the layers get their inputs as unsharded training gives them (rope tables in
            # fp32 among them), only the weights are cast
            mp_policy=MixedPrecisionPolicy(
                param_dtype=cast,
                reduce_dtype=None if cast is None else torch.float32,
                cast_forward_inputs=False,
            ),
            offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy(),
        )
        self.layers = nn.ModuleList()
        seen = set(made)
        for i, layer in enumerate(params["layers"]):  # one at a time: one layer unsharded at most
            own: dict[int, nn.Parameter] = {}  # dropped with the layer's unsharded copies
            module = _Layer(layer, own, master_dtype, f"layers.{i}")
            if seen & set(own):  # FSDP shards a tensor within one group only
                raise ArgumentError(
                    f"fsdp: layers.{i} shares a tensor with another layer or the embedding; "
                    "tied weights across layers cannot be sharded"
                )
            seen |= set(own)
            self.layers.append(fully_shard(module, **options))
        fully_shard(self, **options)
        for module in self.modules():
            if isinstance(module, FSDPModule):  # sum: the losses are divided by the global count
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)

    def forward(self, batch: dict, layer_fn) -> torch.Tensor:
        def call(config, layer, x, cos, sin, mask):
            return layer(config, layer_fn, x, cos, sin, mask)

        view = Params({**self.tree(), "layers": list(self.layers)}, self.config)
        return model_loss(view, batch, reduction="sum", layer_fn=call)


def target_device(config) -> torch.device:
    """Where this rank's shards live: config.device, else its GPU (LOCAL_RANK), else the CPU."""
    if config.device is not None:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ShardedTrainable:
    """`fnlm.train.step.Trainable` for distributed="fsdp": every floating tensor of the params is
    trained, held sharded by `ShardedModel` (`named`: fnlm path names and DTensor shards).

    params: the loaded model (anywhere, typically the CPU: each layer is moved to the device and
    sharded in turn). fp32_master: the shards (and so AdamW) are fp32, the layers compute in the
    params' dtype. offload: shards, gradients and optimizer state in host memory."""

    full = True
    lora = None

    def __init__(self, params: Params, *, device, fp32_master: bool, offload: bool):
        if offload and device.type != "cuda":
            raise ArgumentError(
                f"fsdp_cpu_offload keeps the shards in host memory for a GPU run; this run's "
                f"device is {device} (leave fsdp_cpu_offload off)"
            )
        leaves = [(path, t) for path, t in leaf_paths(dict(params))]
        floating = [t for _, t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
        dtype = floating[0].dtype if floating else torch.float32
        self.module = ShardedModel(
            params, master_dtype=torch.float32 if fp32_master else None, compute_dtype=dtype,
            offload=offload, device=device,
        )  # fmt: skip
        self.named = list(self.module.named_parameters())
        # how to rebuild a params pytree from the module's names: each leaf's path, the name its
        # tensor is trained under (a tied weight: the first path it appears at) and its dtype
        first: dict[int, str] = {}
        self.leaves = [
            (first.setdefault(id(t), path_name(path)), t.dtype if isinstance(t, torch.Tensor) else None)
            for path, t in leaves
        ]  # fmt: skip
        self.spec = pytree.tree_flatten(params)[1]
        shards = dict(self.module.named_parameters(remove_duplicate=False))
        shards.update(self.module.named_buffers())
        self.params = self.rebuild(shards)  # this rank's view: DTensor leaves

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t in self.named]

    def loss(self, batch: dict, layer_fn) -> torch.Tensor:
        """The summed token loss of a micro-batch through the sharded model (on every rank)."""
        return self.module(batch, layer_fn)

    def rebuild(self, named: dict) -> Params:
        return pytree.tree_unflatten([named[name] for name, _ in self.leaves], self.spec)

    def final_params(self) -> Params:
        """The trained params gathered on rank 0 (on the CPU, in the model's dtype); the other
        ranks get their view of DTensor shards. A collective: every rank calls it."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.module, options=options)
        if not distributed.is_main():
            return self.params
        values = [full[name].to(dtype) for name, dtype in self.leaves]
        return pytree.tree_unflatten(values, self.spec)


def save_checkpoint(run_dir, step: int, trainable: ShardedTrainable, optimizer, scheduler,
                    position: dict, extra: dict) -> Path:  # fmt: skip
    """Write checkpoint-<step>/ from every rank: sharded/ (torch.distributed.checkpoint: the
    weights and AdamW state, each rank its shards) and rank 0's scheduler.pt, rng.pt and
    state.json. Built under a temporary name and swapped in whole by rank 0 (atomic). A collective;
    a failed write raises CheckpointError on every rank, the earlier checkpoints intact."""
    final = checkpoint_path(run_dir, step)
    model_state, optim_state = get_state_dict(trainable.module, optimizer)
    error = None
    with contextlib.ExitStack() as stack:
        work = None
        if distributed.is_main():  # removed again if the block raises
            work = stack.enter_context(files.atomic_directory(final))
        shared = [work]
        if distributed.active():
            dist.broadcast_object_list(shared, 0)  # every rank writes into rank 0's directory
        try:
            dcp.save({"model": model_state, "optimizer": optim_state},
                     checkpoint_id=Path(shared[0]) / SHARDED_DIR)  # fmt: skip
            if distributed.is_main():
                write_run_state(work, step, scheduler, position, extra)
        except (OSError, CheckpointException) as e:
            error = e
        if distributed.sum_over_ranks([error is not None])[0] > 0:
            raise CheckpointError(
                f"could not write checkpoint {final}: "
                f"{error or 'another rank failed to write its shards'}; the earlier checkpoints "
                "are intact"
            )
    distributed.barrier()  # swapped in before any rank goes on
    return final


def load_checkpoint(checkpoint, trainable: ShardedTrainable, optimizer, scheduler) -> dict:
    """Restore a `save_checkpoint` directory, written by any number of processes, into the
    sharded weights and optimizer (each rank reads its shards), the scheduler and RNG; returns its
    state.json. Raises CheckpointError naming the checkpoint when it is not a sharded one or does
    not hold this model's tensors."""
    path = Path(checkpoint)
    if not (path / SHARDED_DIR).is_dir():
        written = "without fsdp" if (path / "trainable.safetensors").is_file() else "by no fnlm run"
        raise CheckpointError(
            f"checkpoint {path} has no {SHARDED_DIR}/ (written {written}); resume a "
            "distributed='fsdp' run from a checkpoint of an fsdp run, on any number of processes"
        )
    model_state, optim_state = get_state_dict(trainable.module, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, checkpoint_id=path / SHARDED_DIR)
    except (CheckpointException, RuntimeError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {path}: its sharded state does not fit this run ({str(e)[:300]}); resume "
            "with the same model and mode"
        ) from None
    set_state_dict(trainable.module, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])  # fmt: skip
    return read_run_state(path, scheduler)


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)
