"""Training sharded over the processes with FSDP2 (`torch.distributed.fsdp.fully_shard`), for
models whose weights (and, fine-tuned fully, gradients and AdamW state) do not fit one GPU
(`distributed="fsdp"`): full fine-tuning, or LoRA over a sharded 16-bit base.

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

LoRA (mode="lora"): the base's shards are frozen (requires_grad False: FSDP2 gathers them for
the forward and again for the backward, which needs them for the input gradients, but has no
gradient to reduce-scatter). The adapters stay outside the FSDP modules, replicated on every rank
as in the DDP path: each layer's forward receives its adapters as arguments and attaches them to
the weights FSDP gathered, and `distributed.reduce_step` all-reduces their gradients once per
step. Sharding them too (FSDP2 allows frozen and trained tensors in one group) would save only
megabytes per rank, at the price of DTensor optimizer state, an adapter all-gather per layer and
a gather to save them; replicated, their checkpoints are a single-process run's (rank 0 writes
trainable.safetensors, AdamW state and the PEFT adapter), and resume on any number of processes
and with or without fsdp.
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

from fnlm import files
from fnlm.errors import ArgumentError, CheckpointError
from fnlm.lora import Lora, attach
from fnlm.lora.tree import entries, is_adapter
from fnlm.loss import loss as model_loss
from fnlm.params import Params, leaf_paths, path_name, tree_map
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
    """One decoder layer: its forward runs the layer function on the tensors FSDP gathered, with
    the layer's adapters (`adapters`: lora["layers"][index], a plain dict FSDP sees as inputs, so
    its post-backward hook waits for their gradients) attached to them."""

    def __init__(self, node: dict, made: dict, dtype, index: int):
        super().__init__(node, made, dtype, f"layers.{index}")
        self._fnlm_index = index

    def forward(self, config, layer_fn, x, cos, sin, mask, adapters=None, lora_config=None,
                training=False):  # fmt: skip
        layer = self.tree()
        if adapters:  # attached at the layer's own path, as fnlm.lora.attach does for the model
            i = self._fnlm_index
            part = Lora({"layers": {i: adapters}}, lora_config, config, training)
            layer = attach(Params({"layers": {i: layer}}, config), part)["layers"][i]
        return layer_fn(config, layer, x, cos, sin, mask)


class ShardedModel(_Tree):
    """The params as FSDP2 modules: `layers.<i>` one sharded group per decoder layer, the other
    top-level entries one root group. Calling it returns the summed token loss of a batch.
    frozen: the tensors get no gradient (the base of a LoRA run)."""

    def __init__(self, params: Params, *, master_dtype, compute_dtype, offload: bool, device,
                 frozen: bool = False):  # fmt: skip
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
            module = _Layer(layer, own, master_dtype, i).requires_grad_(not frozen)
            if seen & set(own):  # FSDP shards a tensor within one group only
                raise ArgumentError(
                    f"fsdp: layers.{i} shares a tensor with another layer or the embedding; "
                    "tied weights across layers cannot be sharded"
                )
            seen |= set(own)
            self.layers.append(fully_shard(module, **options))
        self.requires_grad_(not frozen)
        fully_shard(self, **options)
        for module in self.modules():
            if isinstance(module, FSDPModule):  # sum: the losses are divided by the global count
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)

    def forward(self, batch: dict, layer_fn, adapters: dict | None = None, lora_config=None,
                training: bool = False) -> torch.Tensor:  # fmt: skip
        """The summed token loss of `batch`. adapters: a Lora's tree as a plain dict (FSDP
        rebuilds the containers of its inputs), lora_config its LoraConfig, training its
        dropout."""
        layers = dict(enumerate((adapters or {}).get("layers", ())))

        def call(config, layer, x, cos, sin, mask):
            mine = layers.get(layer._fnlm_index)
            if not mine:
                return layer(config, layer_fn, x, cos, sin, mask)
            return layer(config, layer_fn, x, cos, sin, mask, mine, lora_config, training)

        view = Params({**self.tree(), "layers": list(self.layers)}, self.config)
        lora = None
        if adapters is not None:  # the adapters outside the layers (lm_head, saved modules)
            rest = {k: v for k, v in adapters.items() if k != "layers"}
            lora = Lora(rest, lora_config, self.config, training)
        return model_loss(view, batch, lora=lora, reduction="sum", layer_fn=call)


def target_device(config) -> torch.device:
    """Where this rank's shards live: config.device, else its GPU (LOCAL_RANK), else the CPU."""
    if config.device is not None:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ShardedTrainable:
    """`fnlm.train.step.Trainable` for distributed="fsdp", the params held sharded by
    `ShardedModel`. Full fine-tuning (lora None): every floating tensor of the params is trained
    (`named`: fnlm path names and DTensor shards). LoRA: the shards are frozen and `named` are
    the adapters, moved to `device` and replicated (`self.lora`).

    params: the loaded model (anywhere, typically the CPU: each layer is moved to the device and
    sharded in turn). fp32_master (full fine-tuning): the shards (and so AdamW) are fp32, the
    layers compute in the params' dtype. offload: shards, gradients and optimizer state in host
    memory."""

    def __init__(self, params: Params, lora: Lora | None = None, *, device, fp32_master: bool,
                 offload: bool):  # fmt: skip
        if offload and device.type != "cuda":
            raise ArgumentError(
                f"fsdp_cpu_offload keeps the shards in host memory for a GPU run; this run's "
                f"device is {device} (leave fsdp_cpu_offload off)"
            )
        leaves = list(leaf_paths(dict(params)))
        floating = [t for _, t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
        dtype = floating[0].dtype if floating else torch.float32
        self.full = lora is None
        fp32_master = fp32_master and self.full  # a frozen base keeps its dtype
        # FSDP2 trains one dtype per group: a full fine-tune without fp32 masters stores every
        # weight in the compute dtype, fp32 routers of sigmoid-scored MoE included
        master = torch.float32 if fp32_master else dtype if self.full else None
        self.module = ShardedModel(
            params, master_dtype=master, compute_dtype=dtype,
            offload=offload, device=device, frozen=not self.full,
        )  # fmt: skip
        self.lora = None
        if self.full:
            self.named = list(self.module.named_parameters())
        else:
            moved = tree_map(lambda t: t.detach().to(device).requires_grad_(True), dict(lora))
            self.lora = Lora(moved, lora.config, lora.model_config, lora.training)
            self.named = [(path_name(p), t) for p, t in leaf_paths(dict(self.lora))]
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
    def tensors(self) -> distributed.ShardedStep:
        return distributed.ShardedStep(t for _, t in self.named)

    def loss(self, batch: dict, layer_fn, training: bool = True) -> torch.Tensor:
        """The summed token loss of a micro-batch through the sharded model (on every rank);
        training: the adapters' dropout on."""
        if self.lora is None:
            return self.module(batch, layer_fn)
        return self.module(batch, layer_fn, dict(self.lora), self.lora.config, training)

    def adapter_base(self) -> Params | None:
        """The base weights a PEFT adapter file stores (`fnlm.lora.save`'s params): on rank 0,
        embed and lm_head gathered whole (host copies) when the adapters adapt one of them, else
        None. A collective: every rank calls it."""
        adapted = {path[0] for path, node in entries(self.lora) if is_adapter(node)}
        if not adapted & {"embed", "lm_head"}:
            return None
        # the root group whole on every rank (a no-op when an evaluation's forward left it so:
        # the root is not resharded after its forward), then sharded again
        self.module.unshard()
        try:
            root, gathered = self.module.tree(), None
            if distributed.is_main():
                gathered = {k: root[k].detach().to("cpu", copy=True)
                            for k in ("embed", "lm_head") if k in root}  # fmt: skip
        finally:
            self.module.reshard()
        return None if gathered is None else Params(gathered, self.module.config)

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
