"""What a run is told (`TrainConfig`), the choices it accepts, and what it returns (`TrainResult`)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fnlm.errors import ArgumentError, FnlmError
from fnlm.params import Params

MODES = ("qlora", "lora", "full")
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "paged_adamw32bit")
CHECKPOINTING = ("auto", "none", "layer", "offload")
CHECKPOINT_PREFIX = "step-"
TMP_PREFIX = ".tmp-"


class NonFiniteLossError(FnlmError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything a run needs; `scripts/train.py` fills it from flags or a TOML / YAML file."""

    # what to train on
    model: str | None = None  # hub id, local dir, .gguf; None: the embedded SmolLM2-135M-Instruct
    data: str | None = None  # JSONL / JSON / Parquet file, directory, or `datasets` name
    out: str = "runs/fnlm"
    eval_data: str | None = None  # a held-out source; else eval_fraction of `data`
    eval_fraction: float = 0.0
    # model and adapters
    mode: str = "qlora"  # "qlora" (NF4 base + LoRA) | "lora" (16-bit base + LoRA) | "full"
    dtype: str | None = None  # None: bf16 on capable GPUs, fp16 on older, fp32 on CPU
    device: str | None = None
    fp32_master_weights: bool = False  # full mode on a 16-bit model: optimize fp32 copies
    r: int = 16
    alpha: float = 16
    lora_dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    modules_to_save: tuple[str, ...] = ()  # e.g. ("embed", "lm_head"): trained in full
    rslora: bool = False
    # data
    max_seq_length: int = 2048
    packing: bool = True
    train_on_responses_only: bool = True
    truncation: bool = True
    pad_to_multiple: int = 8
    # optimization
    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0  # never applied to norms and biases (1-D tensors)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # floor of the linear / cosine decay, as a fraction of lr
    max_grad_norm: float | None = 1.0
    batch_size: int = 2  # rows per micro-batch
    grad_accum: int = 4  # micro-batches per optimizer step
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    seed: int = 3407
    # speed and memory
    checkpointing: str = "auto"  # "none" | "layer" | "offload" (saved inputs to pinned CPU memory)
    # torch.compile each layer (a str names the backend); None: on CUDA only
    compile: bool | str | None = None
    mlp_chunk: int = 0  # tile the MLP along the sequence in chunks of this many tokens (0: off)
    # replay each micro-batch's forward + backward as a CUDA graph (one per batch shape);
    # None: on CUDA when possible (no LoRA dropout, no offload)
    cuda_graphs: bool | None = None
    # bookkeeping
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    save_total_limit: int = 2  # checkpoints kept (the newest ones)
    eval_every: int = 0
    log_every: int = 1
    resume: bool | str = False  # True: the newest checkpoint of `out`; a path: that checkpoint
    overwrite: bool = False  # allow a fresh run in an `out` that already has checkpoints
    progress: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.modules_to_save = tuple(self.modules_to_save)
        self.betas = tuple(self.betas)
        choices = {
            "mode": MODES,
            "schedule": SCHEDULES,
            "optimizer": OPTIMIZERS,
            "checkpointing": CHECKPOINTING,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ArgumentError(
                    f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in ("batch_size", "grad_accum", "max_seq_length", "r", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ArgumentError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ArgumentError(
                f"TrainConfig.max_steps must be a positive integer, got {self.max_steps!r}"
            )
        if self.max_steps is None and not self.epochs > 0:
            raise ArgumentError(f"TrainConfig.epochs must be positive, got {self.epochs!r}")
        if not self.lr > 0:
            raise ArgumentError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ArgumentError(
                f"TrainConfig.eval_fraction must lie in [0, 1), got {self.eval_fraction!r}"
            )
        if self.eval_every and not (self.eval_data or self.eval_fraction):
            raise ArgumentError("TrainConfig.eval_every needs eval_data or eval_fraction")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from a dict (e.g. a parsed TOML / YAML file); unknown keys are an error that
        names them and the closest valid keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k.replace("-", "_") not in known]
        if unknown:
            hints = {k: difflib.get_close_matches(k.replace("-", "_"), known, n=1) for k in unknown}
            text = ", ".join(
                f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items()
            )
            raise ArgumentError(f"unknown training option(s) {text}")
        return cls(**{k.replace("-", "_"): v for k, v in values.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What `train` returns: the trained state and where everything was written."""

    run_dir: Path
    step: int
    status: str  # "completed" | "interrupted"
    losses: list[float]
    params: Params
    lora: Any  # fnlm.lora.Lora, or None in full mode
    tokenizer: Any
    checkpoint: Path | None
    metrics: Path
    plot: Path | None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
