"""The run loop: step, log, evaluate, checkpoint, stop on Ctrl-C — each a call into the parts
(`setup.start` builds the run, `step.train_step` makes one optimizer step, `checkpoint` writes)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from fnlm import data as data_lib
from fnlm import lora as lora_lib
from fnlm.params import Params
from fnlm.train import distributed, trackers
from fnlm.train.checkpoint import (
    checkpoint_step,
    list_checkpoints,
    save_full_model,
    set_aside_checkpoints,
)
from fnlm.train.config import NonFiniteLossError, TrainConfig, TrainResult
from fnlm.train.monitor import StopFlag, log, out_of_memory, peak_memory_gib
from fnlm.train.plot import plot_losses
from fnlm.train.setup import Run, start
from fnlm.train.step import train_step
from fnlm.train.stream import Stream, real_tokens


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

    Under `torchrun --nproc_per_node N` each process joins the process group (`distributed`) and
    trains its share of every step: the global batch is batch_size x grad_accum x N; rank 0
    writes the checkpoints, metrics and the result. A rank failing in a step stops all with its
    error (RankFailedError on the others). config.distributed="fsdp" shards the model over the
    processes (`fnlm.train.fsdp`; also on one process): a full fine-tune's checkpoints are then
    written by every rank (its shards), LoRA's adapters are replicated and saved as without
    fsdp; the returned params are the (trained) model gathered on rank 0, this rank's DTensor
    shards on the others.
    """
    own_group = distributed.init(config.device, single=config.distributed == "fsdp")
    try:
        return _train(config, params, tokenizer, lora, data, eval_data, callback)
    finally:
        if own_group:
            distributed.teardown()


def _train(config, params, tokenizer, lora, data, eval_data, callback) -> TrainResult:
    run = start(
        config, params=params, tokenizer=tokenizer, lora=lora, data=data, eval_data=eval_data
    )
    if distributed.is_main():
        trackers.start(run.metrics_path, config)  # report_to
    losses, eval_losses, status = [], [], "completed"
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    shown = config.progress and distributed.is_main()
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not shown, unit="step",
               dynamic_ncols=True)  # fmt: skip
    started, clock = time.perf_counter(), StepClock()
    try:
        with StopFlag() as stop:
            while run.step < run.total_steps:
                entry = advance(run, started, clock)
                losses.append(entry["loss"])
                if run.step % config.log_every == 0 or run.step == run.total_steps:
                    log(run.metrics_path, entry)
                if run.eval_data is not None and config.eval_every:
                    if run.step % config.eval_every == 0:
                        entry["eval_loss"] = evaluate_now(run, eval_losses)
                        clock.restart()
                if shown:  # drawn by update, at tqdm's pace: no terminal write every step
                    bar.set_postfix(
                        loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}",
                        tok_s=f"{entry['tokens_per_s']:.0f}", mem=f"{entry['peak_mem_gib']:.2f}G",
                        refresh=False,
                    )  # fmt: skip
                bar.update(1)
                if config.save_every and run.step % config.save_every == 0:
                    if run.step < run.total_steps:
                        run.checkpoint()
                        clock.restart()
                        if distributed.is_main():
                            plot_losses(run.metrics_path, run.run_dir / "loss.png")
                if callback is not None:
                    callback(entry)
                if distributed.active():  # a Ctrl-C seen by one rank stops all at this step
                    stop.requested = distributed.sum_over_ranks([stop.requested])[0] > 0
                if stop.requested:
                    status = "interrupted"
                    break
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, keep what was saved
        bar.close()
        print(f"\nfnlm.train: interrupted; the last checkpoint is {run.last_checkpoint}")
        raise
    finally:
        bar.close()
    return finish(run, status, losses, eval_losses)


class StepClock:
    """Seconds per step without a device sync: from one step's device read (train_step's
    "read_at") to the next, which in a steady run is the whole step (the GPU's work, the host's
    launches and the loop's logging); after a pause (`restart`: evaluation, a checkpoint) or at
    the first step, from the step's own start."""

    def __init__(self):
        self.last: float | None = None

    def seconds(self, started: float, read_at: float) -> float:
        since = started if self.last is None else self.last
        self.last = read_at
        return max(read_at - since, 1e-9)

    def restart(self) -> None:
        self.last = None


def advance(run: Run, started: float, clock: StepClock | None = None) -> dict:
    """One optimizer step of `run` (grad_accum micro-batches); returns the step's metrics.
    Raises NonFiniteLossError (after logging the bad step) when the loss is NaN or infinite.

    Supervised runs (`Stream`) count the tokens on the host and collate the next step's batches
    while the GPU runs this one's forward and backward (train_step's while_waiting); the methods'
    streams (pairs with reference log-probs, GRPO's rollouts from the current weights) are taken
    when their step starts. clock: the run's StepClock (tokens_per_s)."""
    tick = time.perf_counter()
    grad_accum, prefetch = run.config.grad_accum, None
    if run.method is None and isinstance(run.stream, Stream):
        step = run.stream.step_at(run.position, grad_accum)
        batches, next_position = step.batches, step.position
        count, real = step.trained, step.real
        if run.step + 1 < run.total_steps:
            prefetch = functools.partial(run.stream.prefetch, next_position, grad_accum)
    else:
        batches, next_position = run.stream.take(run.position, grad_accum)
        count = data_lib.trained_tokens if run.method is None else run.method.count
        real = real_tokens
    try:
        result = train_step(
            run.loss, batches, run.optimizer, run.scheduler, run.trainable.tensors, count=count,
            max_grad_norm=run.config.max_grad_norm, graphs=run.graphs, real=real,
            while_waiting=prefetch,
        )  # fmt: skip
    except torch.OutOfMemoryError as e:
        shape = "x".join(str(n) for n in batches[0]["tokens"].shape)
        what = f"in training step {run.step + 1} (micro-batch {shape} tokens)"
        raise out_of_memory(e, what, run.device) from None
    seconds = (clock or StepClock()).seconds(tick, result["read_at"])
    if not math.isfinite(result["loss"]):
        stop_on_non_finite(run, result)
    check_divergence(run, result)
    run.step, run.position = run.step + 1, next_position
    run.updates += 1
    tokens = result["tokens"]  # over the ranks, summed with the step's count
    extra = {} if run.method is None else run.method.metrics(result.get("stats", ()))
    return {
        "step": run.step,
        "epoch": run.stream.epoch_fraction(run.position),
        "loss": result["loss"],
        "lr": result["lr"],
        "grad_norm": result["grad_norm"],
        "tokens": tokens,
        "trained_tokens": result["trained_tokens"],
        "tokens_per_s": tokens / seconds,
        "peak_mem_gib": round(peak_memory_gib(run.device), 3),
        "elapsed_s": round(time.perf_counter() - started, 3),
        **extra,
    }


def stop_on_non_finite(run: Run, result: dict) -> None:
    """Stop on a NaN / infinite loss, as `stop_diverged` says."""
    stop_diverged(
        run, result, f"the loss is {result['loss']} (gradient norm {result['grad_norm']})",
        first_bad=run.step + 1,
    )  # fmt: skip


# A loss above ln |V| (worse than a uniform guess) and this many times its running level, twice
# in a row, is a divergence; a fine-tuned model's loss sits far below ln |V|.
SPIKE_FACTOR = 2.0
# Weight of the newest loss in the running level (an exponential moving average).
LEVEL_WEIGHT = 0.1


def check_divergence(run: Run, result: dict) -> None:
    """Stop (`stop_diverged`) when the finite loss of step run.step + 1 shows a dead or diverged
    model: a collapse to a uniform output (loss = ln |V| with a gradient norm of exactly 0: the
    model no longer learns), or a spike far above the running level of the loss, two steps in a
    row. A step that passes lets `Run.checkpoint`'s deferred pruning go ahead."""
    if run.method is not None:  # the watch reads a token cross-entropy (SFT)
        run.prune_checkpoints()
        return
    vocab = run.params.config.vocab_size
    uniform = math.log(vocab)
    loss, step = result["loss"], run.step + 1
    if result["grad_norm"] == 0.0 and abs(loss - uniform) <= 1e-3 * uniform:
        stop_diverged(
            run, result, f"the model collapsed to a uniform output: loss {loss:.4f} = ln |V| "
            f"({vocab} tokens) with a gradient norm of 0", first_bad=step,
        )  # fmt: skip
    level = run.loss_level
    if level is not None and loss > uniform and loss > SPIKE_FACTOR * level:
        if run.spike_since is not None:
            stop_diverged(
                run, result, f"the loss spiked to {loss:.4f} from a running level of {level:.4f} "
                f"(above ln |V| = {uniform:.2f}) for steps {run.spike_since}-{step}",
                first_bad=run.spike_since,
            )  # fmt: skip
        run.spike_since = step
        return
    run.spike_since = None
    run.loss_level = loss if level is None else (1 - LEVEL_WEIGHT) * level + LEVEL_WEIGHT * loss
    run.prune_checkpoints()


def stop_diverged(run: Run, result: dict, what: str, *, first_bad: int) -> None:
    """Log the bad step, set aside the checkpoints that may hold the bad update and raise
    NonFiniteLossError naming the last good checkpoint.

    The loss of step t is computed with the weights of checkpoint-(t-1), so when step
    `first_bad` went wrong, checkpoints from step first_bad - 1 on may hold the update that broke
    the model: they are renamed diverged-checkpoint-N (kept, but neither resumed from nor pruned),
    and the newest earlier one is the last good checkpoint, which `resume` continues from."""
    log(run.metrics_path, {"step": run.step + 1, "loss": result["loss"],
                           "grad_norm": result["grad_norm"]})  # fmt: skip
    plot_losses(run.metrics_path, run.run_dir / "loss.png")
    main = distributed.is_main()
    aside = set_aside_checkpoints(run.run_dir, after=first_bad - 2) if main else []
    distributed.barrier()
    good = list_checkpoints(run.run_dir)
    run.last_checkpoint = good[-1] if good else None
    kept = (
        f"the last good checkpoint is {run.last_checkpoint}"
        if run.last_checkpoint
        else "no checkpoint from before it exists"
    )
    if aside:
        names = [p.name for p in aside]
        kept += f" (later ones, which may hold the bad update, were renamed {names})"
    if run.updates == 0:  # the weights are the ones the run started from
        advice = (
            "No update was made before this step in this run, so the learning rate is not the "
            "cause: the model's forward gives these values with the weights it started from "
            "(check the checkpoint's values and dtype, and a DPO reference model), or the data "
            "of this step does"
        )
    else:
        advice = (
            f"Lower the learning rate (now {result['lr']:.3g}) and resume, keep max_grad_norm "
            "set, or check the data of this step"
        )
    raise NonFiniteLossError(
        f"{what} at step {run.step + 1} (epoch {run.position['epoch']}, micro-batch "
        f"{run.position['index']}); training stopped and {kept}. {advice}"
    )


def evaluate_now(run: Run, eval_losses: list) -> float:
    value = run.eval_loss()
    eval_losses.append((run.step, value))
    log(run.metrics_path, {"step": run.step, "eval_loss": value})
    return value


def finish(run: Run, status: str, losses: list, eval_losses: list) -> TrainResult:
    """The last evaluation and checkpoint, the loss plot, and the adapter or model."""
    complete = status == "completed"
    if (
        run.eval_data is not None
        and complete
        and (not eval_losses or eval_losses[-1][0] != run.step)
    ):
        evaluate_now(run, eval_losses)
    last = run.last_checkpoint
    if last is None or checkpoint_step(last) != run.step:
        run.checkpoint()
    run.prune_checkpoints()
    main = distributed.is_main()
    plot = plot_losses(run.metrics_path, run.run_dir / "loss.png") if main else None
    if main:
        trackers.finish(run.metrics_path)
    full = run.config.mode == "full"
    final = run.trainable.final_params()  # FSDP (full or LoRA): the base gathered by all ranks
    if not complete:
        print(
            f"fnlm.train: interrupted at step {run.step}; checkpoint {run.last_checkpoint}; "
            "continue with resume"
        )
    elif full and main:
        save_full_model(run.run_dir, final, run.tokenizer)
    elif main:
        lora_lib.save(run.run_dir, run.lora, params=final)  # its base: lora.config's
    distributed.barrier()  # no rank returns before the result is written
    return TrainResult(
        run_dir=run.run_dir, step=run.step, status=status, losses=losses,
        params=final, lora=run.lora,
        tokenizer=run.tokenizer, checkpoint=run.last_checkpoint, metrics=run.metrics_path,
        plot=plot, eval_losses=eval_losses,
    )  # fmt: skip
