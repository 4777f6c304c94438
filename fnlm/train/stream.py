"""Micro-batches for a run, in a seeded order that a data position (epoch, index) resumes; the
next step's collated ahead, while the GPU runs the current one (`Stream.prefetch`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fnlm import data as data_lib
from fnlm.errors import ArgumentError
from fnlm.train.config import TrainConfig
from fnlm.train.graphs import check_ids


@dataclass
class Step:
    """One optimizer step's micro-batches, on the device, with what the loop needs of them counted
    on the host before the copy (so reading them costs no device sync)."""

    batches: list[dict]  # this rank's micro-batches, on the device (copies may still run)
    position: dict  # the data position of the step after this one
    trained: list[int]  # trained tokens per micro-batch (data.trained_tokens)
    real: list[int]  # tokens that are not padding per micro-batch (real_tokens)


class Stream:
    """Micro-batches across epochs from a (epoch, index) position; order fixed by the seed.
    vocab_size: each micro-batch's token and label ids are checked against it on the host, as
    it is collated (fnlm.train.graphs.check_ids; None: not checked)."""

    def __init__(self, data, config: TrainConfig, pad_id: int, device: torch.device, *,
                 rank: int = 0, world_size: int = 1, vocab_size: int | None = None):  # fmt: skip
        self.data, self.config, self.pad_id, self.device = data, config, pad_id, device
        self.vocab_size = vocab_size
        self.rank, self.world_size = rank, world_size
        self.plans: dict[int, list] = {}
        self.ready: tuple[tuple, Step] | None = None  # (its key, the prefetched step)

    def plan(self, epoch: int) -> list:
        if epoch not in self.plans:
            plan = data_lib.epoch_plan(
                self.data,
                batch_size=self.config.batch_size,
                max_seq_length=self.config.max_seq_length,
                packing=self.config.packing,
                seed=self.config.seed,
                epoch=epoch,
                strategy=self.config.packing_strategy,
            )
            # two epochs kept: a prefetch across an epoch's end still leaves the current one
            self.plans = {e: p for e, p in self.plans.items() if e == epoch - 1} | {epoch: plan}
        return self.plans[epoch]

    def take(self, position: dict, count: int) -> tuple[list[dict], dict]:
        """This rank's `count` micro-batches of the step starting at `position`, and the next
        step's position. With N ranks a step spans count x N consecutive plan entries and rank r
        takes the r-th run of `count` of them: the plan (and so the position, which any world
        size resumes) does not depend on N, and every example is seen once per epoch."""
        step = self.step_at(position, count)
        return step.batches, step.position

    def step_at(self, position: dict, count: int) -> Step:
        """`take`'s step with its host-side counts: the prefetched one when `prefetch` built this
        very step (same position and count), else collated now."""
        key = _key(position, count)
        ready, self.ready = self.ready, None
        if ready is not None and ready[0] == key:
            return ready[1]
        return self.collate_step(position, count)

    def prefetch(self, position: dict, count: int) -> None:
        """Collate the step at `position` now and start its copies to the device (from pinned
        memory on CUDA, not waiting for them), so that the next `step_at(position, count)` finds
        it ready: the run loop calls this while the GPU runs the current step."""
        self.ready = (_key(position, count), self.collate_step(position, count))

    def collate_step(self, position: dict, count: int) -> Step:
        epoch, index = position["epoch"], position["index"]
        step, first = Step([], {}, [], []), self.rank * count
        pinned = self.device.type == "cuda"  # a pinned source lets the copy run asynchronously
        for taken in range(count * self.world_size):
            plan = self.plan(epoch)
            while index >= len(plan):
                epoch, index = epoch + 1, 0
                plan = self.plan(epoch)
            if first <= taken < first + count:
                # packed rows all have max_seq_length tokens: one shape, compiled and captured once
                batch = data_lib.collate(
                    self.data, plan[index], pad_id=self.pad_id, packing=self.config.packing,
                    pad_to_multiple=self.config.pad_to_multiple,
                    length=self.config.max_seq_length,
                )  # fmt: skip
                if self.vocab_size is not None:
                    try:
                        check_ids(batch, self.vocab_size)
                    except ArgumentError as e:
                        raise ArgumentError(
                            f"{getattr(self.data, 'source', 'the training data')}: the micro-batch of examples {plan[index]} "
                            f"(epoch {epoch}): {e}"
                        ) from None
                step.trained.append(data_lib.trained_tokens(batch))
                step.real.append(real_tokens(batch))
                step.batches.append({
                    k: (v.pin_memory() if pinned else v).to(self.device, non_blocking=True)
                    for k, v in batch.items()
                })  # fmt: skip
            index += 1
        step.position = {"epoch": epoch, "index": index}
        return step

    def epoch_fraction(self, position: dict) -> float:
        """The position as a fractional epoch count (for the metrics)."""
        done = position["index"] / max(1, len(self.plan(position["epoch"])))
        return round(position["epoch"] + done, 4)


def _key(position: dict, count: int) -> tuple:
    return tuple(sorted(position.items())), count


def real_tokens(batch: dict) -> int:
    """Tokens of a micro-batch that are not padding."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "segments" in batch:
        return int((batch["segments"] > 0).sum())
    return batch["tokens"].numel()
