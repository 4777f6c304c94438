"""Micro-batches for a run, in a seeded order that a data position (epoch, index) resumes."""

from __future__ import annotations

import torch

from fnlm import data as data_lib
from fnlm.train.config import TrainConfig


class Stream:
    """Micro-batches across epochs from a (epoch, index) position; order fixed by the seed."""

    def __init__(self, data, config: TrainConfig, pad_id: int, device: torch.device, *,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        self.data, self.config, self.pad_id, self.device = data, config, pad_id, device
        self.rank, self.world_size = rank, world_size
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
        """This rank's `count` micro-batches of the step starting at `position`, and the next
        step's position. With N ranks a step spans count x N consecutive plan entries and rank r
        takes the r-th run of `count` of them: the plan (and so the position, which any world
        size resumes) does not depend on N, and every example is seen once per epoch."""
        epoch, index = position["epoch"], position["index"]
        batches, first = [], self.rank * count
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
                batches.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
            index += 1
        return batches, {"epoch": epoch, "index": index}

    def epoch_fraction(self, position: dict) -> float:
        """The position as a fractional epoch count (for the metrics)."""
        done = position["index"] / max(1, len(self.plan(position["epoch"])))
        return round(position["epoch"] + done, 4)


def real_tokens(batch: dict) -> int:
    """Tokens of a micro-batch that are not padding."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "segments" in batch:
        return int((batch["segments"] > 0).sum())
    return batch["tokens"].numel()
