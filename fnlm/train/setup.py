"""Everything a run is made of before its first step: the run directory (fresh, resumed or
overwritten), the model, the data, the adapters, the layer function, optimizer and schedule."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fnlm import data as data_lib
from fnlm import files
from fnlm import lora as lora_lib
from fnlm.errors import ArgumentError
from fnlm.load import load as load_model
from fnlm.load import resolve_dtype
from fnlm.loss import loss as model_loss
from fnlm.models import decoder
from fnlm.params import Params, leaf_paths
from fnlm.train import distributed, fsdp, methods
from fnlm.train.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from fnlm.train.config import (
    LEGACY_CHECKPOINT_DIR,
    LEGACY_RUN_CONFIG,
    RUN_CONFIG,
    TMP_PREFIX,
    TrainConfig,
    data_options,
)
from fnlm.train.graphs import StepGraphs
from fnlm.train.layers import layer_function
from fnlm.train.monitor import out_of_memory, report_data, truncate_metrics
from fnlm.train.optim import build_optimizer, build_scheduler
from fnlm.train.step import Trainable, evaluate
from fnlm.train.stream import Stream


def load_for_training(config: TrainConfig):
    """(params, tokenizer) for a config: NF4 base for qlora, 16-bit for lora and full."""
    quant = "nf4" if config.mode == "qlora" else None
    device, dtype = config.device, config.dtype
    if config.distributed == "fsdp":  # loaded in host memory, each layer sharded onto the device
        device, dtype = "cpu", dtype or resolve_dtype(None, fsdp.target_device(config))
    return load_model(
        config.model, quant=quant, dtype=dtype, device=device,
        max_seq_length=config.max_seq_length,
    )  # fmt: skip


@dataclass
class Run:
    """A run's state between steps: what `train` loops over. `step` and `position` (the data
    position) advance together; a checkpoint stores both."""

    config: TrainConfig
    run_dir: Path
    params: Params
    tokenizer: object
    lora: object
    data: data_lib.TokenizedData
    eval_data: data_lib.TokenizedData | None
    trainable: Trainable
    stream: Stream
    optimizer: torch.optim.Optimizer
    scheduler: object
    layer_fn: object
    device: torch.device
    total_steps: int
    graphs: StepGraphs | None = None
    step: int = 0
    updates: int = 0  # optimizer updates made by this process (not counting a resumed run's)
    position: dict = field(default_factory=lambda: {"epoch": 0, "index": 0})
    # divergence watch (run.check_divergence): running loss level, first step of a loss spike
    loss_level: float | None = None
    spike_since: int | None = None
    # a checkpoint written whose pruning of older ones waits for the next step to pass the watch
    unpruned: bool = False
    # with overwrite: where the directory's earlier contents wait until the first new checkpoint
    replaced: Path | None = None
    last_checkpoint: Path | None = None
    method: object = None  # fnlm.train.methods: None for sft

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def loss(self, batch: dict, training: bool = True) -> torch.Tensor:
        """The summed token loss of a micro-batch (the trainer's layer function when training)."""
        if self.method is not None:  # (summed loss, stats as tensors): train_step reads both
            return self.method.step_loss(self, batch, training)
        layer_fn = self.layer_fn if training else decoder.layer_forward
        if isinstance(self.trainable, fsdp.ShardedTrainable):
            return self.trainable.loss(batch, layer_fn, training)
        run_params, run_lora = self.trainable.model(training)
        return model_loss(run_params, batch, lora=run_lora, reduction="sum", layer_fn=layer_fn)

    def eval_loss(self) -> float:
        if self.method is not None:
            return self.method.eval_loss(self)
        c = self.config
        # whole examples (packing_strategy's default): the eval loss does not move with it
        batches = (
            {k: v.to(self.device) for k, v in b.items()}
            for b in data_lib.micro_batches(
                self.eval_data, batch_size=c.batch_size, max_seq_length=c.max_seq_length,
                pad_id=self.stream.pad_id, packing=c.packing, shuffle=False,
                pad_to_multiple=c.pad_to_multiple,
            )
        )  # fmt: skip
        sharded = isinstance(self.trainable, fsdp.ShardedTrainable)
        return evaluate(lambda b: self.loss(b, training=False), batches, even=sharded)

    def checkpoint(self) -> Path:
        """Write a checkpoint of the current step. Older ones are pruned to save_total_limit only
        once the next step has passed the divergence watch (`prune_checkpoints`), so the last
        checkpoint from before a bad update is never pruned."""
        options = json.loads(json.dumps(self.config.to_dict(), default=str))
        sharded = isinstance(self.trainable, fsdp.ShardedTrainable)
        # LoRA over a sharded base: the replicated adapters are saved as without fsdp, with the
        # embed / lm_head base weights a PEFT file stores gathered first (by every rank)
        base = self.trainable.adapter_base() if sharded and not self.trainable.full else self.params
        if sharded and self.trainable.full:  # every rank writes its shards
            self.last_checkpoint = fsdp.save_checkpoint(
                self.run_dir, self.step, self.trainable, self.optimizer, self.scheduler,
                self.position, {"total_steps": self.total_steps, "config": options},
            )  # fmt: skip
        elif distributed.is_main():  # the replicas are equal: rank 0 writes, the others wait
            self.last_checkpoint = save_checkpoint(
                self.run_dir, self.step, named=self.trainable.named, optimizer=self.optimizer,
                scheduler=self.scheduler, position=self.position,
                extra={"total_steps": self.total_steps, "config": options}, lora=self.lora,
                params=base,
            )  # fmt: skip
        else:
            self.last_checkpoint = checkpoint_path(self.run_dir, self.step)
        distributed.barrier()
        self.unpruned = True
        if self.replaced is not None:  # the new run has a checkpoint: the old one can go
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None
        return self.last_checkpoint

    def prune_checkpoints(self) -> None:
        """Prune to save_total_limit after a step that passed the divergence watch, and at the end."""
        if self.unpruned and distributed.is_main():
            prune_checkpoints(self.run_dir, self.config.save_total_limit)
            self.unpruned = False


def use_graphs(config: TrainConfig, device: torch.device, checkpointing: str, dropout: bool):
    """Whether the step runs as CUDA graphs: asked for, or unset and possible (CUDA, no adapter
    dropout, whose recomputation needs the RNG state)."""
    possible = device.type == "cuda" and not dropout
    possible = possible and config.distributed != "fsdp"  # FSDP's collectives run in the step
    if config.cuda_graphs and not possible:
        raise ArgumentError(
            "cuda_graphs=True needs a CUDA device, lora_dropout=0 and distributed 'ddp' "
            f"(device {device.type}, lora_dropout {config.lora_dropout}, distributed "
            f"{config.distributed!r})"
        )
    return possible if config.cuda_graphs is None else config.cuda_graphs


def prepare_run_dir(config: TrainConfig) -> Path | None:
    """Check `config.out` against resume / overwrite; returns the checkpoint to resume from.

    A fresh run refuses a directory holding checkpoints, and a non-empty directory that is not an
    fnlm run (a merged export, a data directory: training would replace its train_config.json ...),
    unless `overwrite`. Nothing is removed here: with overwrite, `start` moves the earlier
    contents aside once the new run has loaded its model and data, and the first checkpoint of
    the new run removes them."""
    run_dir = Path(config.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ArgumentError(f"out {run_dir} is a file; expected a (new or run) directory")
    checkpoints = list_checkpoints(run_dir)
    if config.resume:
        if isinstance(config.resume, str):
            return Path(config.resume)
        if checkpoints:
            return checkpoints[-1]
        if distributed.is_main():  # one process speaks for all under torchrun
            print(f"fnlm.train: no checkpoint in {run_dir} to resume from; starting fresh")
    if config.overwrite:
        return None
    if checkpoints:
        raise ArgumentError(
            f"{run_dir} already holds checkpoints (newest {checkpoints[-1].name}); pass resume=True "
            "(--resume) to continue that run, overwrite=True to start over, or another out directory"
        )
    contents = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if contents and not is_run_dir(run_dir):
        raise ArgumentError(
            f"{run_dir} is not empty ({', '.join(contents[:5])}{', ...' if len(contents) > 5 else ''}) "
            "and is not an fnlm run directory: training would replace its train_config.json, "
            "metrics.jsonl, checkpoints and adapter or model files. Choose a new out directory, or pass "
            "overwrite=True (--overwrite) to replace its contents"
        )
    return None


def is_run_dir(directory: Path) -> bool:
    """Whether `directory` was made by fnlm.train: it has checkpoints, or its train_config.json
    (config.json for earlier fnlm versions) holds a TrainConfig (a run stopped before its first
    checkpoint)."""
    if list_checkpoints(directory) or (directory / LEGACY_CHECKPOINT_DIR).is_dir():
        return True
    return bool(read_run_config(directory))


def read_run_config(run_dir: Path) -> dict:
    """The options a run directory records (train_config.json, else an earlier fnlm's
    config.json when it holds training options), or {}."""
    for name in (RUN_CONFIG, LEGACY_RUN_CONFIG):
        try:
            saved = json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and {"mode", "grad_accum", "save_total_limit"} <= set(saved):
            return saved
    return {}


def replace_contents(run_dir: Path) -> Path | None:
    """overwrite=True: move what `run_dir` holds into a temporary directory inside it (a rename:
    nothing is deleted yet); `Run.checkpoint` removes it once the new run has a checkpoint."""
    old = list(run_dir.iterdir())  # an earlier run's set-aside contents too
    if not old:
        return None
    aside = Path(tempfile.mkdtemp(dir=run_dir, prefix=TMP_PREFIX + "replaced-"))
    for path in old:
        path.rename(aside / path.name)
    print(
        f"fnlm.train: overwrite: the earlier contents of {run_dir} wait in {aside} until this "
        "run writes its first checkpoint"
    )
    return aside


def prepare_data(config: TrainConfig, tokenizer, data, eval_data):
    """(data, eval_data) tokenized from the config's sources unless given."""
    options = data_options(config)
    if data is None:
        if config.data is None:
            raise ArgumentError(
                "train: no data; set TrainConfig.data (a file, directory or dataset name)"
            )
        data = data_lib.prepare(config.data, tokenizer, split=config.data_split, **options)
    if eval_data is None and config.eval_data:
        eval_data = data_lib.prepare(config.eval_data, tokenizer, **options)
    elif eval_data is None and config.eval_split:
        eval_data = data_lib.prepare(config.data, tokenizer, split=config.eval_split, **options)
    elif eval_data is None and config.eval_fraction:
        data, eval_data = data.split(config.eval_fraction, config.seed)
    if distributed.is_main():
        report_data(data, eval_data)
    return data, eval_data


def start(config: TrainConfig, *, params=None, tokenizer=None, lora=None, data=None,
          eval_data=None) -> Run:  # fmt: skip
    """Build the Run for `config` (loading what is not given) and restore its checkpoint when
    resuming; a fresh run seeds torch and writes train_config.json and an empty metrics file."""
    resume_from = prepare_run_dir(config)
    distributed.barrier()  # every rank has read the directory before rank 0 writes into it
    main = distributed.is_main()
    run_dir = Path(config.out)
    for source in (config.data, config.eval_data):
        if source is not None and data is None:
            data_lib.check_source(source)
    if params is None:
        try:
            params, loaded_tok = load_for_training(config)
        except torch.OutOfMemoryError as e:
            raise out_of_memory(e, "loading the model", torch.device("cuda")) from None
        tokenizer = tokenizer or loaded_tok
    if tokenizer is None and data is None:
        raise ArgumentError("train: the model has no tokenizer; pass tokenizer= or tokenized data=")
    device = next(t.device for _, t in leaf_paths(dict(params)) if isinstance(t, torch.Tensor))
    if config.distributed == "fsdp":
        device = fsdp.target_device(config)
    method = methods.build(config)  # None: supervised fine-tuning
    if method is not None and distributed.active():
        raise ArgumentError(
            f"method={config.method!r} runs on one process; several processes (torchrun) train "
            "supervised fine-tuning only"
        )
    if method is None:
        data, eval_data = prepare_data(config, tokenizer, data, eval_data)
    else:
        data, eval_data = method.prepare(config, tokenizer, data, eval_data)
        if distributed.is_main():
            report_data(data, eval_data)

    full = config.mode == "full"
    if not full and lora is None:
        lora = lora_lib.init(
            params, r=config.r, alpha=config.alpha, targets=config.targets,
            dropout=config.lora_dropout, rslora=config.rslora, seed=config.seed,
            modules_to_save=config.modules_to_save, base_model_name_or_path=getattr(params, "model_id", None),
        )  # fmt: skip
    if config.distributed == "fsdp":  # params: from here on this rank's DTensor shards
        trainable = fsdp.ShardedTrainable(params, lora, device=device, offload=config.fsdp_cpu_offload,
                                          fp32_master=config.fp32_master_weights)  # fmt: skip
        params, lora = trainable.params, trainable.lora
    else:
        trainable = Trainable(params, lora, full=full, fp32_master=config.fp32_master_weights)

    checkpointing = config.checkpointing
    if checkpointing == "auto":
        checkpointing = "layer" if device.type == "cuda" else "none"
    compile_layers = device.type == "cuda" if config.compile is None else config.compile
    dropout = config.lora_dropout > 0 and not full
    layer_fn = layer_function(
        checkpointing, compile=compile_layers, mlp_chunk=config.mlp_chunk, preserve_rng=dropout,
        keep_layers=config.keep_layers,
    )  # fmt: skip
    graphs = None
    if use_graphs(config, device, checkpointing, dropout):
        # ids are checked on the host, with no device read per replay: SFT's Stream and DPO /
        # ORPO's PairStream as they collate, GRPO's prompts by generate_tokens (its completions
        # are sampled from the model's own vocabulary)
        graphs = StepGraphs(trainable.tensors, max_graphs=4 if method is None else 8,
                            vocab_size=None)  # fmt: skip
        if method is not None:  # pairs / rollouts padded to 64, 128, 256... tokens: few graphs
            method.bucket = methods.data.GRAPH_BUCKET

    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    if method is None:
        stream = Stream(data, config, pad_id, device, rank=distributed.rank(),
                        world_size=distributed.world_size(),
                        vocab_size=params.config.vocab_size)  # fmt: skip
    else:
        stream = method.stream(data, config, pad_id, device)
    per_epoch = len(stream.plan(0)) * (config.num_iterations if config.method == "grpo" else 1)
    total_steps = config.max_steps or max(
        1, math.ceil(config.epochs * per_epoch / (config.grad_accum * distributed.world_size()))
    )
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    optimizer = build_optimizer(
        trainable.named, name=config.optimizer, lr=config.lr,
        weight_decay=config.weight_decay, betas=config.betas, eps=config.eps,
    )  # fmt: skip
    scheduler = build_scheduler(
        optimizer, schedule=config.schedule, total_steps=total_steps, warmup_steps=warmup,
        min_lr_ratio=config.min_lr_ratio,
    )  # fmt: skip
    run = Run(
        config=config, run_dir=run_dir, params=params, tokenizer=tokenizer, lora=lora, data=data,
        eval_data=eval_data, trainable=trainable, stream=stream, optimizer=optimizer,
        scheduler=scheduler, layer_fn=layer_fn, device=device, total_steps=total_steps,
        graphs=graphs,
    )  # fmt: skip
    if method is not None:
        run.method = method
        method.bind(run)  # before a resume restores the weights: references are the starting ones
    run_dir.mkdir(parents=True, exist_ok=True)
    options = json.loads(json.dumps(config.to_dict(), default=str))
    if resume_from is not None:
        if config.distributed == "fsdp" and full:
            state = fsdp.load_checkpoint(resume_from, trainable, optimizer, scheduler)
        else:
            state = load_checkpoint(
                resume_from, named=trainable.named, optimizer=optimizer, scheduler=scheduler
            )
        run.step, run.position, run.last_checkpoint = state["step"], state["position"], resume_from
        if main:
            truncate_metrics(run.metrics_path, run.step)
        changed = apply_changed_options(run, saved_options(state, run_dir), options)
        if main:
            print(f"fnlm.train: resumed from {resume_from} (step {run.step}){changed}")
    else:
        if config.overwrite and main:
            run.replaced = replace_contents(run_dir)
        torch.manual_seed(config.seed)
        if main:
            run.metrics_path.write_text("")
    if main:
        files.write_json(run_dir / RUN_CONFIG, options)
    distributed.broadcast_tensors(trainable.tensors)  # replicas start equal whatever their init
    return run


# Options that change which rows make up a step: the checkpoint's data position then points into
# another order than the one it was saved in.
DATA_OPTIONS = ("data", "eval_data", "eval_fraction", "batch_size", "grad_accum", "max_seq_length",
                "packing", "packing_strategy", "train_on_responses_only", "truncation",
                "pad_to_multiple", "seed")  # fmt: skip
# Options whose change means nothing for the continued run.
UNTRACKED_OPTIONS = ("resume", "overwrite", "progress", "out")


def saved_options(state: dict, run_dir: Path) -> dict:
    """The options the checkpoint was trained with: its state.json's, else the run's
    train_config.json."""
    if isinstance(state.get("config"), dict):
        return state["config"]
    return read_run_config(run_dir)


def apply_changed_options(run: Run, saved: dict, options: dict) -> str:
    """On resume: the restored optimizer and schedule take this run's lr, betas, eps and
    weight_decay (the checkpoint's state would silently keep the old ones); returns the report of
    the options that differ from the checkpoint's ("" when none)."""
    c = run.config
    for group in run.optimizer.param_groups:
        decays = any(t.dim() >= 2 for t in group["params"])
        group.update(betas=tuple(c.betas), eps=c.eps, initial_lr=c.lr,
                     weight_decay=c.weight_decay if decays else 0.0)  # fmt: skip
    scheduler = run.scheduler
    scheduler.base_lrs = [c.lr for _ in run.optimizer.param_groups]
    for group, base, factor in zip(
        run.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]
    changed = {
        k: (saved[k], v)
        for k, v in options.items()
        if k in saved and saved[k] != v and k not in UNTRACKED_OPTIONS
    }
    if not changed:
        return ""
    text = "; options changed since the checkpoint, applied from here: " + ", ".join(
        f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()
    )
    if any(k in DATA_OPTIONS for k in changed):
        text += (
            " (the checkpoint's data position refers to the earlier data order, so the rows of "
            "the coming steps differ from an uninterrupted run's)"
        )
    return text
