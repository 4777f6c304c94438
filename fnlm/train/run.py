"""The run: set up model, data, adapters, optimizer; loop over steps with logging, evaluation,
checkpoints and Ctrl-C handling; write the adapter or model at the end."""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fnlm import data as data_lib
from fnlm import lora as lora_lib
from fnlm.errors import ArgumentError, DeviceMemoryError
from fnlm.load import load as load_model
from fnlm.loss import loss as model_loss
from fnlm.models import decoder
from fnlm.params import Params, leaf_paths
from fnlm.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_full_model,
)
from fnlm.train.config import CHECKPOINT_PREFIX, NonFiniteLossError, TrainConfig, TrainResult
from fnlm.train.layers import layer_function
from fnlm.train.optim import build_optimizer, build_scheduler
from fnlm.train.plot import plot_losses
from fnlm.train.step import Trainable, evaluate, train_step


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


class Stream:
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
    quant = "nf4" if config.mode == "qlora" else None
    return load_model(
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
    trainable = Trainable(params, lora, full=full, fp32_master=config.fp32_master_weights)

    checkpointing = config.checkpointing
    if checkpointing == "auto":
        checkpointing = "layer" if device.type == "cuda" else "none"
    compile_layers = device.type == "cuda" if config.compile is None else config.compile
    layer_fn = layer_function(checkpointing, compile=compile_layers, mlp_chunk=config.mlp_chunk)

    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    stream = Stream(data, config, pad_id, device)
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
        run_params, run_lora = trainable.model(training)
        return model_loss(
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
