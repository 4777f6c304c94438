"""Single-GPU fine-tuning: QLoRA (default), LoRA on 16-bit weights, or full fine-tuning.

    result = fnlm.train.train(fnlm.train.TrainConfig(model=None, data="data/demo.jsonl",
                                                     out="runs/demo", mode="lora", max_steps=60))
    result.lora, result.run_dir, result.losses

The pieces are library functions a user can recombine: `build_optimizer`, `build_scheduler`,
`layer_function` (activation checkpointing, CPU offload, torch.compile, MLP tiling), `train_step`
(gradient accumulation normalised by the step's trained tokens), `evaluate`, `save_checkpoint` /
`load_checkpoint` (atomic directories), `plot_losses` (a PNG without matplotlib).

A run directory holds config.json, metrics.jsonl (one line per step and per evaluation),
loss.png, checkpoints/step-NNNNNNNN/ (trainable tensors, optimizer, scheduler, RNG and data
position; the adapter in PEFT format) and, at the end, adapter/ (LoRA modes) or model/ (full).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import shutil
import signal
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint

from fnlm import data as data_lib
from fnlm.errors import ArgumentError, CheckpointError, DeviceMemoryError, FnlmError
from fnlm.models import decoder
from fnlm.params import Params, leaf_paths, path_name, tree_map

MODES = ("qlora", "lora", "full")
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "paged_adamw32bit")
CHECKPOINTING = ("auto", "none", "layer", "offload")
CHECKPOINT_PREFIX = "step-"
TMP_PREFIX = ".tmp-"


class NonFiniteLossError(FnlmError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


def build_optimizer(
    named: Sequence[tuple[str, torch.Tensor]],
    *,
    name: str = "adamw",
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over the trainable tensors, with weight decay on matrices only (norm weights and
    biases, the 1-D tensors, get none).

    name: "adamw" (torch; fused kernel on CUDA), or bitsandbytes' "adamw8bit", "paged_adamw",
    "paged_adamw8bit", "paged_adamw32bit" (paged optimizers move their state to CPU under memory
    pressure). Raises ArgumentError for an unknown name or no trainable tensors.
    """
    tensors = [t for _, t in named]
    if not tensors:
        raise ArgumentError("build_optimizer: there are no trainable tensors")
    decay = [t for t in tensors if t.dim() >= 2]
    no_decay = [t for t in tensors if t.dim() < 2]
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    options = dict(lr=lr, betas=tuple(betas), eps=eps)
    if name == "adamw":
        fused = all(t.is_cuda and t.is_floating_point() for t in tensors)
        return torch.optim.AdamW(groups, fused=fused or None, **options)
    if name not in OPTIMIZERS:
        raise ArgumentError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    import bitsandbytes as bnb

    classes = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw32bit": bnb.optim.PagedAdamW32bit,
    }
    return classes[name](groups, **options)


def lr_factor(
    step: int, *, schedule: str, warmup: int, total: int, min_ratio: float = 0.0
) -> float:
    """The learning-rate multiplier before optimizer step `step` (0-based), as transformers'
    get_{constant,linear,cosine}_schedule_with_warmup compute it (so step 0 of a warm-up is 0),
    with the decay floored at `min_ratio`."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        value = max(0.0, 1.0 - progress)
    elif schedule == "cosine":
        value = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    else:
        raise ArgumentError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    return min_ratio + (1.0 - min_ratio) * value


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_factor`; call `.step()` after each optimizer step."""
    if schedule not in SCHEDULES:
        raise ArgumentError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, schedule=schedule, warmup=warmup_steps, total=total_steps, min_ratio=min_lr_ratio
        ),
    )


# ---------------------------------------------------------------------------------------------
# The layer function: checkpointing, offload, compile, MLP tiling
# ---------------------------------------------------------------------------------------------


class _OffloadedCheckpoint(torch.autograd.Function):
    """Activation checkpointing whose one saved tensor, the layer input, waits in pinned CPU memory.

    Forward runs the layer without a graph and copies its input to the host on a side stream (the
    copy overlaps the next layers' compute); backward brings it back, reruns the layer with the
    same RNG state and backpropagates through it. The gradients of the tensors the layer closes
    over (adapters, or weights in full fine-tuning) accumulate through that inner backward, which
    is why this runs under `.backward()` (not `torch.autograd.grad`), like reentrant checkpointing.
    What Unsloth calls use_gradient_checkpointing="unsloth".
    """

    @staticmethod
    def forward(ctx, run, slot, x, anchor):
        ctx.run, ctx.device = run, x.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        if x.is_cuda:
            host = _pinned_buffer(slot, x)
            stream = _side_stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                host.copy_(x, non_blocking=True)
                ctx.copied = torch.cuda.Event()
                ctx.copied.record(stream)
            x.record_stream(stream)  # x's memory is not reused before the copy has read it
        else:
            host, ctx.copied = x.detach(), None
        ctx.host = host
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.copied is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.copied)
            x = ctx.host.to(ctx.device, non_blocking=True)
        else:
            x = ctx.host
        x = x.detach().requires_grad_(True)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad():
                y = ctx.run(x)
        torch.autograd.backward(y, grad)
        ctx.host = None
        return None, None, x.grad, None


_PINNED: dict[tuple, torch.Tensor] = {}
_STREAMS: dict[torch.device, Any] = {}


def _pinned_buffer(slot: int, x: torch.Tensor) -> torch.Tensor:
    """One reusable pinned host buffer per layer slot (pinning allocations are slow)."""
    key = (slot, tuple(x.shape), x.dtype)
    if key not in _PINNED:
        for old in [k for k in _PINNED if k[0] == slot]:
            del _PINNED[old]
        _PINNED[key] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return _PINNED[key]


def _side_stream(device: torch.device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def tiled_layer_forward(config, p, x, cos, sin, mask, *, chunk: int):
    """`decoder.layer_forward` with the MLP run over `chunk`-token pieces of the sequence, each
    checkpointed, so only one piece's MLP activations ([chunk, intermediate]) are alive at a time.
    The MLP is token-wise, so the result is the same; parallel blocks fall back to the plain layer."""
    if config.parallel_block or x.shape[1] <= chunk:
        return decoder.layer_forward(config, p, x, cos, sin, mask)
    attn = decoder.attention(
        config, p["attn"], decoder.block_input(config, p, "norm_attn", x), cos, sin, mask
    )
    x = x + decoder.block_output(config, p, "norm_attn", attn)

    def mlp_piece(piece):
        out = decoder.mlp(config, p["mlp"], decoder.block_input(config, p, "norm_mlp", piece))
        return piece + decoder.block_output(config, p, "norm_mlp", out)

    pieces = [
        torch.utils.checkpoint.checkpoint(mlp_piece, piece, use_reentrant=False)
        if torch.is_grad_enabled()
        else mlp_piece(piece)
        for piece in x.split(chunk, dim=1)
    ]
    return torch.cat(pieces, dim=1)


def layer_function(
    checkpointing: str = "none", *, compile: bool | str = False, mlp_chunk: int = 0
) -> Callable:
    """The `layer_fn` for `fnlm.loss`: decoder.layer_forward, optionally MLP-tiled, compiled and
    checkpointed.

    checkpointing: "none" (keep all activations), "layer" (keep each layer's input, recompute the
    layer in backward; torch's non-reentrant checkpoint) or "offload" (as "layer", with the input
    kept in pinned CPU memory, copied on a side stream).
    compile: torch.compile the layer (one graph reused by every layer of the same shapes); a
    string names the compile backend (e.g. "aot_eager" for tests on CPU).
    mlp_chunk: > 0 tiles the MLP along the sequence (see `tiled_layer_forward`).
    """
    if checkpointing not in ("none", "layer", "offload"):
        raise ArgumentError(
            f"checkpointing must be 'none', 'layer' or 'offload', got {checkpointing!r}"
        )
    inner = decoder.layer_forward
    if mlp_chunk:

        def inner(config, p, x, cos, sin, mask):
            return tiled_layer_forward(config, p, x, cos, sin, mask, chunk=mlp_chunk)

    if compile:
        backend = compile if isinstance(compile, str) else "inductor"
        # Shapes vary with packing / padding: after the first change the length becomes symbolic.
        inner = torch.compile(inner, backend=backend)
    if checkpointing == "none":
        return inner
    if checkpointing == "layer":

        def checkpointed(config, p, x, cos, sin, mask):
            if not torch.is_grad_enabled():
                return inner(config, p, x, cos, sin, mask)
            return torch.utils.checkpoint.checkpoint(
                inner, config, p, x, cos, sin, mask, use_reentrant=False
            )

        return checkpointed

    anchor = torch.empty(0, requires_grad=True)  # makes backward run even when x needs no grad
    calls = [0]

    def offloaded(config, p, x, cos, sin, mask):
        if not torch.is_grad_enabled():
            return inner(config, p, x, cos, sin, mask)
        # Layers run in order, once per forward (the recompute in backward calls `inner`
        # directly), so the call count numbers them; each number reuses one pinned buffer.
        slot = calls[0] % config.num_layers
        calls[0] += 1
        run = lambda h: inner(config, p, h, cos, sin, mask)
        return _OffloadedCheckpoint.apply(run, slot, x, anchor)

    return offloaded


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def train_step(
    loss_fn: Callable[[dict], torch.Tensor],
    batches: Sequence[dict],
    optimizer: torch.optim.Optimizer,
    scheduler,
    tensors: Sequence[torch.Tensor],
    *,
    max_grad_norm: float | None = 1.0,
) -> dict:
    """One optimizer step over several micro-batches (gradient accumulation).

    loss_fn(batch) returns the SUMMED token loss of a micro-batch; each is divided by the number
    of trained tokens of the whole step before its backward, so the gradient equals that of one
    big batch holding all micro-batches (not an average of per-micro-batch means).
    Returns {"loss", "grad_norm", "lr", "trained_tokens", "tokens"}; when the loss or gradient
    norm is not finite, no update is made and the returned loss says so.
    """
    total_tokens = sum(data_lib.trained_tokens(b) for b in batches)
    denominator = max(total_tokens, 1)
    summed = None
    for batch in batches:
        loss = loss_fn(batch)
        (loss / denominator).backward()
        summed = loss.detach() if summed is None else summed + loss.detach()
    mean = float(summed) / denominator
    lr = optimizer.param_groups[0]["lr"]
    if not math.isfinite(mean):
        optimizer.zero_grad(set_to_none=True)
        return {"loss": mean, "grad_norm": float("nan"), "lr": lr, "trained_tokens": total_tokens}
    limit = max_grad_norm if max_grad_norm else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(tensors, limit))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return {
            "loss": float("nan"),
            "grad_norm": grad_norm,
            "lr": lr,
            "trained_tokens": total_tokens,
        }
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": mean, "grad_norm": grad_norm, "lr": lr, "trained_tokens": total_tokens}


@torch.no_grad()
def evaluate(loss_fn: Callable[[dict], torch.Tensor], batches: Iterator[dict]) -> float:
    """Mean token loss over batches (summed losses / trained tokens), without gradients."""
    total, tokens = 0.0, 0
    for batch in batches:
        total += float(loss_fn(batch))
        tokens += data_lib.trained_tokens(batch)
    return total / max(tokens, 1)


# ---------------------------------------------------------------------------------------------
# What is trained
# ---------------------------------------------------------------------------------------------


class _Trainable:
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
            from fnlm import lora as lora_lib

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


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    named: Sequence[tuple[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    position: dict,
    extra: dict | None = None,
    lora=None,
    params: Params | None = None,
    keep: int = 0,
) -> Path:
    """Write checkpoints/step-NNNNNNNN/ atomically: everything goes into a temporary directory
    that is renamed into place, so a crash leaves either the whole checkpoint or none.

    Holds trainable.safetensors (the trained tensors by fnlm path name), optimizer.pt,
    scheduler.pt, rng.pt (CPU and CUDA generators), state.json (step, data position, `extra`)
    and, for LoRA runs, adapter/ in PEFT's format. keep > 0 removes all but the newest `keep`.
    """
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(TMP_PREFIX + "*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    work = Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}{final.name}-"))
    try:
        save_file(
            {name: t.detach().contiguous().cpu() for name, t in named},
            work / "trainable.safetensors",
        )
        torch.save(optimizer.state_dict(), work / "optimizer.pt")
        torch.save(scheduler.state_dict(), work / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, work / "rng.pt")
        state = {"step": step, "position": position, **(extra or {})}
        (work / "state.json").write_text(json.dumps(state, indent=2))
        if lora is not None:
            from fnlm import lora as lora_lib

            lora_lib.save(work / "adapter", lora, params=params)
        _fsync_tree(work)
        if final.exists():  # the same step saved again (e.g. interrupted right after a save)
            old = root / f"{TMP_PREFIX}old-{final.name}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def load_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    named: Sequence[tuple[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
) -> dict:
    """Restore a `save_checkpoint` directory into live tensors, optimizer, scheduler and RNG.

    Returns its state.json. Raises CheckpointError naming the file when something is missing or
    does not match the run (different trainable tensors or shapes).
    """
    from safetensors.torch import load_file

    path = Path(checkpoint)
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        if not (path / name).is_file():
            raise CheckpointError(
                f"checkpoint {path} has no {name}; it is not an fnlm training checkpoint"
            )
    saved = load_file(path / "trainable.safetensors")
    names = [n for n, _ in named]
    if set(saved) != set(names):
        missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        raise CheckpointError(
            f"checkpoint {path} trains other tensors than this run (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); resume with the same mode, targets and model"
        )
    with torch.no_grad():
        for name, tensor in named:
            if tuple(saved[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, the run has "
                    f"{tuple(tensor.shape)}"
                )
            tensor.copy_(saved[name])
    device = named[0][1].device
    optimizer.load_state_dict(
        torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())


def save_full_model(directory: str | os.PathLike, params: Params, tokenizer=None) -> Path:
    """A fully fine-tuned model as a transformers checkpoint (config.json + model.safetensors
    under the checkpoint's own tensor names, + the tokenizer), loadable by fnlm.load and
    transformers alike. Written to a temporary directory and renamed into place."""
    from safetensors.torch import save_file

    from fnlm import models

    directory = Path(directory)
    names = models.family(params.config.model_type).weight_names(params.config)
    from fnlm.params import get_path

    tensors = {
        hf: get_path(params, path).detach().contiguous().cpu() for hf, (path, _) in names.items()
    }
    config = params.config.hf_dict()
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f"{TMP_PREFIX}{directory.name}-"))
    try:
        save_file(tensors, work / "model.safetensors", metadata={"format": "pt"})
        (work / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save(work)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(work, directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return directory


# ---------------------------------------------------------------------------------------------
# The loss-curve PNG (no matplotlib needed)
# ---------------------------------------------------------------------------------------------

# 3x5 pixel glyphs, one string of 15 bits per character (rows top to bottom).
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001010010", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", "s": "000011010001110", "t": "010111010010011",
    "p": "000111101111100", "l": "110010010010111", "o": "000111101101111",
    "v": "000101101101010", "a": "000011101101011", "i": "010000010010010",
    "n": "000110101101101", " ": "000000000000000", ":": "000010000010000",
}  # fmt: skip


def plot_losses(
    metrics: str | os.PathLike, png: str | os.PathLike, *, width: int = 640, height: int = 400
) -> Path | None:
    """Draw the training loss (blue) and eval loss (orange) of a metrics.jsonl as a PNG.

    Axes are labelled with the step and loss ranges. Returns the PNG path, or None when there
    is nothing to draw yet.
    """
    train, evals = [], []
    for line in Path(metrics).read_text().splitlines():
        entry = json.loads(line)
        if "eval_loss" in entry and math.isfinite(entry["eval_loss"]):
            evals.append((entry["step"], entry["eval_loss"]))
        elif "loss" in entry and math.isfinite(entry["loss"]):
            train.append((entry["step"], entry["loss"]))
    points = train + evals
    if not points:
        return None
    image = [[(255, 255, 255)] * width for _ in range(height)]
    left, right, top, bottom = 46, width - 12, 12, height - 24
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi - y_lo < 1e-6:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_pixel(x, y):
        px = left + (x - x_lo) / (x_hi - x_lo) * (right - left)
        py = bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)
        return round(px), round(py)

    grey, black = (200, 200, 200), (0, 0, 0)
    for i in range(5):  # horizontal grid lines with loss labels
        y = y_lo + (y_hi - y_lo) * i / 4
        _, py = to_pixel(x_lo, y)
        _line(image, left, py, right, py, grey)
        _text(image, 2, py - 2, f"{y:.3g}", black)
    _line(image, left, top, left, bottom, black)
    _line(image, left, bottom, right, bottom, black)
    _text(image, left, bottom + 6, f"step {x_lo}", black)
    label = f"{x_hi}"
    _text(image, right - 4 * len(label) * 2, bottom + 6, label, black)
    for series, color in ((train, (31, 119, 180)), (evals, (255, 127, 14))):
        pixels = [to_pixel(x, y) for x, y in series]
        for (x0, y0), (x1, y1) in zip(pixels, pixels[1:]):
            _line(image, x0, y0, x1, y1, color)
        for x0, y0 in pixels if len(pixels) == 1 or color != (31, 119, 180) else []:
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    _dot(image, x0 + dx, y0 + dy, color)
    _text(image, right - 90, top + 2, "loss", (31, 119, 180))
    if evals:
        _text(image, right - 50, top + 2, "eval", (255, 127, 14))
    return _write_png(Path(png), image)


def _dot(image, x, y, color) -> None:
    if 0 <= y < len(image) and 0 <= x < len(image[0]):
        image[y][x] = color


def _line(image, x0, y0, x1, y1, color) -> None:
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(steps + 1):
        _dot(image, round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), color)


def _text(image, x, y, text: str, color, scale: int = 2) -> None:
    for k, char in enumerate(text.lower()):
        bits = _GLYPHS.get(char, _GLYPHS[" "])
        for r in range(5):
            for c in range(3):
                if bits[r * 3 + c] == "1":
                    for dy in range(scale):
                        for dx in range(scale):
                            _dot(image, x + (k * 4 + c) * scale + dx, y + r * scale + dy, color)


def _write_png(path: Path, image) -> Path:
    height, width = len(image), len(image[0])
    raw = b"".join(b"\x00" + bytes(v for pixel in row for v in pixel) for row in image)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return (
            struct.pack(">I", len(payload))
            + body
            + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class _StopFlag:
    """Ctrl-C during training asks for a checkpoint at the end of the current step; a second
    Ctrl-C interrupts at once. Only installed from the main thread."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _out_of_memory(e: Exception, what: str, device: torch.device) -> DeviceMemoryError:
    detail = str(e).split("\n")[0]
    total = (
        torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cuda"
        else 0
    )
    peak = _peak_memory_gib(device)
    return DeviceMemoryError(
        f"out of memory {what} (peak {peak:.2f} GiB allocated of {total:.1f} GiB): {detail}. "
        "Lower batch_size or max_seq_length, use mode='qlora', checkpointing='offload' or mlp_chunk"
    )


class _Stream:
    """Micro-batches across epochs from a (epoch, index) position; order fixed by the seed."""

    def __init__(self, data, config: TrainConfig, pad_id: int, device: torch.device):
        self.data, self.config, self.pad_id, self.device = data, config, pad_id, device
        self.plans: dict[int, list] = {}

    def plan(self, epoch: int) -> list:
        if epoch not in self.plans:
            self.plans = {epoch: data_lib.epoch_plan(
                self.data,
                batch_size=self.config.batch_size,
                max_seq_length=self.config.max_seq_length,
                packing=self.config.packing,
                seed=self.config.seed,
                epoch=epoch,
            )}  # fmt: skip
        return self.plans[epoch]

    def take(self, position: dict, count: int) -> tuple[list[dict], dict]:
        epoch, index = position["epoch"], position["index"]
        batches = []
        while len(batches) < count:
            plan = self.plan(epoch)
            if index >= len(plan):
                epoch, index = epoch + 1, 0
                continue
            batch = data_lib.collate(
                self.data, plan[index], pad_id=self.pad_id, packing=self.config.packing,
                pad_to_multiple=self.config.pad_to_multiple,
            )  # fmt: skip
            batches.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
            index += 1
        return batches, {"epoch": epoch, "index": index}


def _real_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "segments" in batch:
        return int((batch["segments"] > 0).sum())
    return batch["tokens"].numel()


def load_for_training(config: TrainConfig):
    """(params, tokenizer) for a config: NF4 base for qlora, 16-bit for lora and full."""
    import fnlm

    quant = "nf4" if config.mode == "qlora" else None
    return fnlm.load(
        config.model, quant=quant, dtype=config.dtype, device=config.device,
        max_seq_length=config.max_seq_length,
    )  # fmt: skip


def train(
    config: TrainConfig,
    *,
    params: Params | None = None,
    tokenizer=None,
    lora=None,
    data: data_lib.TokenizedData | None = None,
    eval_data: data_lib.TokenizedData | None = None,
    callback: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Fine-tune a model as `config` says; returns the trained state and the run's paths.

    params / tokenizer: an already loaded model (else `config.model` is loaded: NF4 for
        mode="qlora", 16-bit otherwise). lora: starting adapters (else fresh ones from
        fnlm.lora.init with config.r / alpha / targets / seed). data / eval_data: tokenized data
        (else read from config.data / config.eval_data).
    callback(metrics): called after each step (after its checkpoint) with the step's metrics.
    Ctrl-C finishes the current step, writes a checkpoint and returns status "interrupted";
    `config.resume` continues from it with the same loss trajectory as an uninterrupted run.

    Raises NonFiniteLossError when the loss turns NaN/inf (the last good checkpoint stays),
    DataError for bad data, DeviceMemoryError when the model or a step does not fit.
    """
    from tqdm.auto import tqdm

    from fnlm import lora as lora_lib

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

    for source in (config.data, config.eval_data):
        if source is not None and data is None:
            data_lib.check_source(source)
    if params is None:
        try:
            params, loaded_tok = load_for_training(config)
        except torch.OutOfMemoryError as e:
            raise _out_of_memory(e, "loading the model", torch.device("cuda")) from None
        tokenizer = tokenizer or loaded_tok
    if tokenizer is None and data is None:
        raise ArgumentError("train: the model has no tokenizer; pass tokenizer= or tokenized data=")
    device = next(t.device for _, t in leaf_paths(dict(params)) if isinstance(t, torch.Tensor))

    if data is None:
        if config.data is None:
            raise ArgumentError(
                "train: no data; set TrainConfig.data (a file, directory or dataset name)"
            )
        data = data_lib.prepare(
            config.data, tokenizer, max_seq_length=config.max_seq_length,
            train_on_responses_only=config.train_on_responses_only, truncation=config.truncation,
            cache_dir=config.cache_dir,
        )  # fmt: skip
    if eval_data is None and config.eval_data:
        eval_data = data_lib.prepare(
            config.eval_data, tokenizer, max_seq_length=config.max_seq_length,
            train_on_responses_only=config.train_on_responses_only, truncation=config.truncation,
            cache_dir=config.cache_dir,
        )  # fmt: skip
    elif eval_data is None and config.eval_fraction:
        data, eval_data = data.split(config.eval_fraction, config.seed)
    _report_data(data, eval_data)

    full = config.mode == "full"
    if not full and lora is None:
        lora = lora_lib.init(
            params, r=config.r, alpha=config.alpha, targets=config.targets,
            dropout=config.lora_dropout, rslora=config.rslora, seed=config.seed,
            modules_to_save=config.modules_to_save, base_model_name_or_path=config.model,
        )  # fmt: skip
    trainable = _Trainable(params, lora, full=full, fp32_master=config.fp32_master_weights)

    checkpointing = config.checkpointing
    if checkpointing == "auto":
        checkpointing = "layer" if device.type == "cuda" else "none"
    compile_layers = device.type == "cuda" if config.compile is None else config.compile
    layer_fn = layer_function(checkpointing, compile=compile_layers, mlp_chunk=config.mlp_chunk)

    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    stream = _Stream(data, config, pad_id, device)
    per_epoch = len(stream.plan(0))
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

    step, position, last_checkpoint = 0, {"epoch": 0, "index": 0}, None
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, named=trainable.named, optimizer=optimizer, scheduler=scheduler
        )
        step, position, last_checkpoint = state["step"], state["position"], resume_from
        _truncate_metrics(metrics_path, step)
        print(f"fnlm.train: resumed from {resume_from} (step {step})")
    else:
        torch.manual_seed(config.seed)
        metrics_path.write_text("")
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))

    def loss_fn(batch, training=True):
        import fnlm

        run_params, run_lora = trainable.model(training)
        return fnlm.loss(
            run_params,
            batch,
            lora=run_lora,
            reduction="sum",
            layer_fn=layer_fn if training else decoder.layer_forward,
        )

    def eval_loss() -> float:
        batches = (
            {k: v.to(device) for k, v in b.items()}
            for b in data_lib.micro_batches(
                eval_data, batch_size=config.batch_size, max_seq_length=config.max_seq_length,
                pad_id=pad_id, packing=config.packing, shuffle=False,
                pad_to_multiple=config.pad_to_multiple,
            )
        )  # fmt: skip
        return evaluate(lambda b: loss_fn(b, training=False), batches)

    def checkpoint() -> Path:
        return save_checkpoint(
            run_dir, step, named=trainable.named, optimizer=optimizer, scheduler=scheduler,
            position=position, extra={"total_steps": total_steps}, lora=lora, params=params,
            keep=config.save_total_limit,
        )  # fmt: skip

    losses, eval_losses, status = [], [], "completed"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not config.progress,
        unit="step",
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    try:
        with _StopFlag() as stop:
            while step < total_steps:
                tick = time.perf_counter()
                batches, next_position = stream.take(position, config.grad_accum)
                try:
                    result = train_step(
                        loss_fn, batches, optimizer, scheduler, trainable.tensors,
                        max_grad_norm=config.max_grad_norm,
                    )  # fmt: skip
                except torch.OutOfMemoryError as e:
                    shape = "x".join(str(n) for n in batches[0]["tokens"].shape)
                    raise _out_of_memory(
                        e, f"in training step {step + 1} (micro-batch {shape} tokens)", device
                    ) from None
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - tick
                if not math.isfinite(result["loss"]):
                    _log(
                        metrics_path,
                        {
                            "step": step + 1,
                            "loss": result["loss"],
                            "grad_norm": result["grad_norm"],
                        },
                    )
                    plot_losses(metrics_path, run_dir / "loss.png")
                    kept = (
                        f"the last good checkpoint is {last_checkpoint}"
                        if last_checkpoint
                        else "no checkpoint had been written yet"
                    )
                    raise NonFiniteLossError(
                        f"the loss is {result['loss']} (gradient norm {result['grad_norm']}) at step "
                        f"{step + 1} (epoch {position['epoch']}, micro-batch {position['index']}); "
                        f"training stopped and {kept}. Lower the learning rate (now {result['lr']:.3g}), "
                        "keep max_grad_norm set, or check the data of this step"
                    )
                step, position = step + 1, next_position
                tokens = sum(_real_tokens(b) for b in batches)
                entry = {
                    "step": step,
                    "epoch": round(
                        position["epoch"]
                        + position["index"] / max(1, len(stream.plan(position["epoch"]))),
                        4,
                    ),
                    "loss": result["loss"],
                    "lr": result["lr"],
                    "grad_norm": result["grad_norm"],
                    "tokens": tokens,
                    "trained_tokens": result["trained_tokens"],
                    "tokens_per_s": tokens / seconds,
                    "peak_mem_gib": round(_peak_memory_gib(device), 3),
                    "elapsed_s": round(time.perf_counter() - started, 3),
                }
                losses.append(result["loss"])
                if step % config.log_every == 0 or step == total_steps:
                    _log(metrics_path, entry)
                if eval_data is not None and config.eval_every and step % config.eval_every == 0:
                    value = eval_loss()
                    eval_losses.append((step, value))
                    _log(metrics_path, {"step": step, "eval_loss": value})
                    entry["eval_loss"] = value
                bar.update(1)
                bar.set_postfix(
                    loss=f"{result['loss']:.4f}", lr=f"{result['lr']:.2e}",
                    tok_s=f"{entry['tokens_per_s']:.0f}", mem=f"{entry['peak_mem_gib']:.2f}G",
                )  # fmt: skip
                if config.save_every and step % config.save_every == 0 and step < total_steps:
                    last_checkpoint = checkpoint()
                    plot_losses(metrics_path, run_dir / "loss.png")
                if callback is not None:
                    callback(entry)
                if stop.requested:
                    status = "interrupted"
                    break
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, keep what was saved
        bar.close()
        print(f"\nfnlm.train: interrupted; the last checkpoint is {last_checkpoint}")
        raise
    finally:
        bar.close()

    if (
        eval_data is not None
        and status == "completed"
        and (not eval_losses or eval_losses[-1][0] != step)
    ):
        value = eval_loss()
        eval_losses.append((step, value))
        _log(metrics_path, {"step": step, "eval_loss": value})
    if last_checkpoint is None or last_checkpoint.name != f"{CHECKPOINT_PREFIX}{step:08d}":
        last_checkpoint = checkpoint()
    plot = plot_losses(metrics_path, run_dir / "loss.png")
    if status == "interrupted":
        print(
            f"fnlm.train: interrupted at step {step}; checkpoint {last_checkpoint}; continue with resume"
        )
    elif full:
        save_full_model(run_dir / "model", trainable.final_params(), tokenizer)
    else:
        lora_lib.save(
            run_dir / "adapter", lora, params=params, base_model_name_or_path=config.model
        )
    return TrainResult(
        run_dir=run_dir, step=step, status=status, losses=losses,
        params=trainable.final_params() if full else params, lora=lora, tokenizer=tokenizer,
        checkpoint=last_checkpoint, metrics=metrics_path, plot=plot, eval_losses=eval_losses,
    )  # fmt: skip


def _log(path: Path, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop what an interrupted run logged after its checkpoint."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def _report_data(data, eval_data) -> None:
    s = data.stats
    text = (
        f"fnlm.train: {len(data)} training examples, {sum(len(e) for e in data.examples):,} tokens"
    )
    if s.get("truncated"):
        text += f"; {s['truncated']} example(s) truncated ({s['tokens_cut']:,} tokens cut)"
    if s.get("dropped"):
        text += f"; {s['dropped']} row(s) without a token to learn dropped"
    if eval_data is not None:
        text += f"; {len(eval_data)} held-out examples"
    print(text)
