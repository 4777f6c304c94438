"""Training methods beyond supervised fine-tuning, as loss functions over the same params / adapter
pytrees: DPO and ORPO (`preference`), GRPO (`grpo`). `TrainConfig.method` picks one; the run
loop asks `build` for the method object and then only calls its hooks:

    method.prepare(config, tokenizer)        -> (data, eval_data)   its rows, tokenized
    method.stream(data, config, pad_id, dev) -> a Stream-like        its micro-batches
    method.bind(run)                                                  reference, precomputation
    method.step_loss(run, batch, training)   -> (summed loss, stats)  divided by the step's
    method.count(batch)                      -> int                   summed counts (train_step)
    method.metrics(stats)                    -> dict                  the step's logged metrics
    method.eval_loss(run)                    -> float
"""

from __future__ import annotations

import torch

from fnlm.data import check_source, epoch_plan
from fnlm.errors import ArgumentError
from fnlm.train.graphs import check_ids
from fnlm.train.methods.data import MethodData, prepare_pairs, prepare_prompts
from fnlm.train.methods.grpo import (
    GRPO_LOSSES,
    SCALE_REWARDS,
    Grpo,
    RewardError,
    RolloutStream,
    group_advantages,
    load_reward,
    policy_loss,
    reduce_loss,
    score,
)
from fnlm.train.methods.logprobs import sequence_logprobs, token_logprobs
from fnlm.train.methods.options import METHODS, check_method
from fnlm.train.methods.preference import DPO_LOSSES, Preference, dpo_loss, orpo_loss


class PairStream:
    """Micro-batches of preference pairs across epochs from a (epoch, index) position, in the same
    seeded order as `fnlm.train.Stream` (no packing: each row is one chosen or rejected sequence)."""

    def __init__(self, method: Preference, data: MethodData, config, pad_id: int, device):
        self.method, self.data, self.config = method, data, config
        self.pad_id, self.device = pad_id, device
        self.plans: dict[int, list] = {}

    def plan(self, epoch: int, shuffle: bool = True) -> list:
        if epoch not in self.plans:
            self.plans = {epoch: epoch_plan(
                self.data, batch_size=self.config.batch_size, max_seq_length=self.config.max_seq_length,
                packing=False, seed=self.config.seed, epoch=epoch, shuffle=shuffle,
            )}  # fmt: skip
        return self.plans[epoch]

    def collate(self, micro_batch: list) -> dict:
        """The pairs' batch on the device, its token and label ids checked on the host first
        (as fnlm.train.Stream does: the captured step cannot check them, and a check on the
        device would read it back before every replay)."""
        pairs = [row[0] for row in micro_batch]
        batch = self.method.collate([self.data.examples[i] for i in pairs], self.pad_id)
        run = self.method.run
        if run is not None:
            try:
                check_ids(batch, run.params.config.vocab_size)
            except ArgumentError as e:
                raise ArgumentError(f"{self.data.source}: the pairs {pairs}: {e}") from None
        return {k: v if k == "pair_keys" else v.to(self.device, non_blocking=True)
                for k, v in batch.items()}  # fmt: skip

    def take(self, position: dict, count: int) -> tuple[list[dict], dict]:
        epoch, index = position["epoch"], position["index"]
        batches = []
        while len(batches) < count:
            plan = self.plan(epoch)
            if index >= len(plan):
                epoch, index = epoch + 1, 0
                continue
            batches.append(self.method.with_reference(self.method.run, self.collate(plan[index])))
            index += 1
        return batches, {"epoch": epoch, "index": index}

    def all_batches(self):
        """Every pair once, in order (evaluation and reference precomputation)."""
        for start in range(0, len(self.data), self.config.batch_size):
            rows = [[i] for i in range(start, min(start + self.config.batch_size, len(self.data)))]
            yield self.collate(rows)

    def epoch_fraction(self, position: dict) -> float:
        done = position["index"] / max(1, len(self.plan(position["epoch"])))
        return round(position["epoch"] + done, 4)


class PreferenceMethod(Preference):
    """DPO / ORPO with the run hooks."""

    def prepare(self, config, tokenizer, data, eval_data):
        return _prepare(config, data, eval_data,
                        lambda s: prepare_pairs(s, tokenizer, max_seq_length=config.max_seq_length))  # fmt: skip

    def stream(self, data, config, pad_id: int, device):
        self.pad_id, self.device = pad_id, device
        return PairStream(self, data, config, pad_id, device)

    def bind(self, run) -> None:
        """Load the reference model if one is given; in full mode without one (or with
        precompute_ref_log_probs), the reference log-probs of every training and held-out pair
        are computed now, from the starting weights, before the first update."""
        self.run = run
        if self.name != "dpo":
            return
        if self.config.ref_model:
            self.reference = load_reference(self.config, run.device)
        if not ((run.config.mode == "full" and self.reference is None)
                or self.config.precompute_ref_log_probs):  # fmt: skip
            return
        for data in (run.data, run.eval_data):
            if data is not None:
                self.precompute(
                    run, PairStream(self, data, self.config, self.pad_id, self.device).all_batches()
                )

    def eval_loss(self, run) -> float:
        stream = PairStream(self, run.eval_data, self.config, self.pad_id, self.device)
        total, pairs = 0.0, 0
        with torch.no_grad():
            for batch in stream.all_batches():
                loss, _ = self.step_loss(run, self.with_reference(run, batch), training=False)
                total += float(loss)
                pairs += self.count(batch)
        return total / max(pairs, 1)


class GrpoMethod(Grpo):
    """GRPO with the run hooks."""

    def bind(self, run) -> None:
        if self.config.ref_model and self.config.beta:
            self.reference = load_reference(self.config, run.device)
        super().bind(run)

    def prepare(self, config, tokenizer, data, eval_data):
        return _prepare(config, data, eval_data, lambda s: prepare_prompts(
            s, tokenizer, max_prompt_length=config.max_prompt_length))  # fmt: skip

    def stream(self, data, config, pad_id: int, device):
        self.pad_id = pad_id
        return RolloutStream(self, data, config, device)

    def eval_loss(self, run) -> float:
        raise ArgumentError("GRPO runs have no eval loss; leave eval_data / eval_every unset")


def load_reference(config, device):
    """The params of TrainConfig.ref_model, 16-bit, on the run's device."""
    from fnlm.load import load

    params, _ = load(config.ref_model, quant=None, dtype=config.dtype, device=str(device),
                     max_seq_length=config.max_seq_length)  # fmt: skip
    return params


def _prepare(config, data, eval_data, read):
    if data is None:
        if config.data is None:
            raise ArgumentError(
                "train: no data; set TrainConfig.data (a file, directory or dataset name)"
            )
        check_source(config.data)
        data = read(config.data)
    if eval_data is None and config.eval_data:
        eval_data = read(config.eval_data)
    elif eval_data is None and config.eval_fraction:
        data, eval_data = data.split(config.eval_fraction, config.seed)
    return data, eval_data


def build(config):
    """The method object of `config.method`, or None for supervised fine-tuning."""
    if config.method == "sft":
        return None
    if config.method in ("dpo", "orpo"):
        return PreferenceMethod(config)
    return GrpoMethod(config)


__all__ = [
    "DPO_LOSSES", "GRPO_LOSSES", "METHODS", "SCALE_REWARDS", "Grpo", "GrpoMethod", "MethodData",
    "PairStream", "Preference", "check_method", "PreferenceMethod", "RewardError", "RolloutStream", "build",
    "dpo_loss", "group_advantages", "load_reward", "orpo_loss", "policy_loss", "prepare_pairs",
    "prepare_prompts", "reduce_loss", "score", "sequence_logprobs", "token_logprobs",
]  # fmt: skip
