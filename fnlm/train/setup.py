"""Everything a run is made of before its first step: the run directory (fresh, resumed or
overwritten), the model, the data, the adapters, the layer function, optimizer and schedule."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fnlm import data as data_lib
from fnlm import lora as lora_lib
from fnlm.errors import ArgumentError
from fnlm.load import load as load_model
from fnlm.load import model_id
from fnlm.loss import loss as model_loss
from fnlm.models import decoder
from fnlm.params import Params, leaf_paths
from fnlm.train import methods
from fnlm.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from fnlm.train.config import TrainConfig
from fnlm.train.graphs import StepGraphs
from fnlm.train.layers import layer_function
from fnlm.train.monitor import out_of_memory, report_data, truncate_metrics
from fnlm.train.optim import build_optimizer, build_scheduler
from fnlm.train.step import Trainable, evaluate
from fnlm.train.stream import Stream


def load_for_training(config: TrainConfig):
    """(params, tokenizer) for a config: NF4 base for qlora, 16-bit for lora and full."""
    quant = "nf4" if config.mode == "qlora" else None
    return load_model(
        config.model, quant=quant, dtype=config.dtype, device=config.device,
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
    position: dict = field(default_factory=lambda: {"epoch": 0, "index": 0})
    last_checkpoint: Path | None = None
    method: object = None  # fnlm.train.methods: None for sft

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def loss(self, batch: dict, training: bool = True) -> torch.Tensor:
        """The summed token loss of a micro-batch (the trainer's layer function when training)."""
        if self.method is not None:
            return self.method.loss(self, batch, training)
        run_params, run_lora = self.trainable.model(training)
        layer_fn = self.layer_fn if training else decoder.layer_forward
        return model_loss(run_params, batch, lora=run_lora, reduction="sum", layer_fn=layer_fn)

    def eval_loss(self) -> float:
        if self.method is not None:
            return self.method.eval_loss(self)
        c = self.config
        batches = (
            {k: v.to(self.device) for k, v in b.items()}
            for b in data_lib.micro_batches(
                self.eval_data, batch_size=c.batch_size, max_seq_length=c.max_seq_length,
                pad_id=self.stream.pad_id, packing=c.packing, shuffle=False,
                pad_to_multiple=c.pad_to_multiple,
            )
        )  # fmt: skip
        return evaluate(lambda b: self.loss(b, training=False), batches)

    def checkpoint(self) -> Path:
        self.last_checkpoint = save_checkpoint(
            self.run_dir, self.step, named=self.trainable.named, optimizer=self.optimizer,
            scheduler=self.scheduler, position=self.position,
            extra={"total_steps": self.total_steps}, lora=self.lora, params=self.params,
            keep=self.config.save_total_limit,
        )  # fmt: skip
        return self.last_checkpoint


def use_graphs(config: TrainConfig, device: torch.device, checkpointing: str, dropout: bool):
    """Whether the step runs as CUDA graphs: asked for, or unset and possible (CUDA, no adapter
    dropout, whose recomputation needs the RNG state, and no offload, which syncs streams)."""
    possible = device.type == "cuda" and not dropout and checkpointing != "offload"
    if config.cuda_graphs and not possible:
        raise ArgumentError(
            "cuda_graphs=True needs a CUDA device, lora_dropout=0 and checkpointing other than "
            f"'offload' (device {device.type}, lora_dropout {config.lora_dropout}, "
            f"checkpointing {checkpointing!r})"
        )
    return possible if config.cuda_graphs is None else config.cuda_graphs


def prepare_run_dir(config: TrainConfig) -> Path | None:
    """Check `config.out` against resume / overwrite; returns the checkpoint to resume from."""
    run_dir = Path(config.out)
    checkpoints = list_checkpoints(run_dir)
    resume_from = None
    if config.resume:
        resume_from = (
            Path(config.resume)
            if isinstance(config.resume, str)
            else (checkpoints[-1] if checkpoints else None)
        )
        if resume_from is None:
            print(f"fnlm.train: no checkpoint in {run_dir} to resume from; starting fresh")
    elif checkpoints and not config.overwrite:
        raise ArgumentError(
            f"{run_dir} already holds checkpoints (newest {checkpoints[-1].name}); pass resume=True "
            "(--resume) to continue that run, overwrite=True to start over, or another out directory"
        )
    elif checkpoints:
        shutil.rmtree(run_dir / "checkpoints")
    run_dir.mkdir(parents=True, exist_ok=True)
    return resume_from


def prepare_data(config: TrainConfig, tokenizer, data, eval_data):
    """(data, eval_data) tokenized from the config's sources unless given."""
    options = dict(
        max_seq_length=config.max_seq_length, train_on_responses_only=config.train_on_responses_only,
        truncation=config.truncation, cache_dir=config.cache_dir,
    )  # fmt: skip
    if data is None:
        if config.data is None:
            raise ArgumentError(
                "train: no data; set TrainConfig.data (a file, directory or dataset name)"
            )
        data = data_lib.prepare(config.data, tokenizer, **options)
    if eval_data is None and config.eval_data:
        eval_data = data_lib.prepare(config.eval_data, tokenizer, **options)
    elif eval_data is None and config.eval_fraction:
        data, eval_data = data.split(config.eval_fraction, config.seed)
    report_data(data, eval_data)
    return data, eval_data


def start(config: TrainConfig, *, params=None, tokenizer=None, lora=None, data=None,
          eval_data=None) -> Run:  # fmt: skip
    """Build the Run for `config` (loading what is not given) and restore its checkpoint when
    resuming; a fresh run seeds torch and writes config.json and an empty metrics file."""
    resume_from = prepare_run_dir(config)
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
    method = methods.build(config)  # None: supervised fine-tuning
    if method is None:
        data, eval_data = prepare_data(config, tokenizer, data, eval_data)
    else:
        data, eval_data = method.prepare(config, tokenizer, data, eval_data)
        report_data(data, eval_data)

    full = config.mode == "full"
    if not full and lora is None:
        lora = lora_lib.init(
            params, r=config.r, alpha=config.alpha, targets=config.targets,
            dropout=config.lora_dropout, rslora=config.rslora, seed=config.seed,
            modules_to_save=config.modules_to_save, base_model_name_or_path=model_id(config.model),
        )  # fmt: skip
    trainable = Trainable(params, lora, full=full, fp32_master=config.fp32_master_weights)

    checkpointing = config.checkpointing
    if checkpointing == "auto":
        checkpointing = "layer" if device.type == "cuda" else "none"
    compile_layers = device.type == "cuda" if config.compile is None else config.compile
    dropout = config.lora_dropout > 0 and not full
    layer_fn = layer_function(
        checkpointing, compile=compile_layers, mlp_chunk=config.mlp_chunk, preserve_rng=dropout
    )
    graphs = None
    if method is None and use_graphs(config, device, checkpointing, dropout):
        graphs = StepGraphs(trainable.tensors, vocab_size=params.config.vocab_size)

    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    if method is None:
        stream = Stream(data, config, pad_id, device)
    else:
        stream = method.stream(data, config, pad_id, device)
    per_epoch = len(stream.plan(0)) * (config.num_iterations if config.method == "grpo" else 1)
    total_steps = config.max_steps or max(
        1, math.ceil(config.epochs * per_epoch / config.grad_accum)
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
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, named=trainable.named, optimizer=optimizer, scheduler=scheduler
        )
        run.step, run.position, run.last_checkpoint = state["step"], state["position"], resume_from
        truncate_metrics(run.metrics_path, run.step)
        print(f"fnlm.train: resumed from {resume_from} (step {run.step})")
    else:
        torch.manual_seed(config.seed)
        run.metrics_path.write_text("")
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    return run
