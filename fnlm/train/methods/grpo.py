"""GRPO: completions sampled by fnlm's KV-cache decoder from the weights being trained, scored by
the user's reward functions, group-normalized advantages and TRL's clipped policy loss.

    rewards = load_rewards(["mypkg.rewards:exact_match", "rewards.py:has_answer_tags"])
    advantages = group_advantages(total_rewards, num_generations=8)
    per_token = policy_loss(logps, old_logps, advantages, epsilon_low=0.2, epsilon_high=0.2)
    loss = reduce_loss(per_token, mask, "grpo", max_completion_length=256)

The formulas are TRL 1.15's `GRPOTrainer` (trl/trainer/grpo_trainer.py: `_compute_loss` for the
loss types and the KL term, `_generate_and_score_completions` for the advantages,
`_calculate_rewards` for how reward functions are called); the tests compare with it. Rollouts
run on the very tensors being trained (adapters attached unmerged, no copy, no merge), so the
policy that samples is the policy that is updated.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from fnlm import quant
from fnlm.data import IGNORE_INDEX, epoch_plan
from fnlm.errors import ArgumentError, FnlmError
from fnlm.generate import Sampling, generate_tokens, release_graphs
from fnlm.params import tree_map
from fnlm.train.methods.data import padded_length, summed_stats
from fnlm.train.methods.logprobs import token_logprobs

GRPO_LOSSES = ("grpo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")


class RewardError(FnlmError):
    """A reward function failed, returned the wrong number of rewards, or a non-finite one."""


# ---------------------------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------------------------


def load_reward(spec: str) -> tuple[str, Callable]:
    """(name, function) for "package.module:function" or "path/to/file.py:function"."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise ArgumentError(f"reward {spec!r}: expected 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader = importlib.util.spec_from_file_location(f"fnlm_reward_{path.stem}", path)
            if loader is None or not path.is_file():
                raise FileNotFoundError(path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[loader.name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any import error is reported with its spec
        raise ArgumentError(f"reward {spec!r}: cannot import {module_name!r}: {e}") from e
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ArgumentError(f"reward {spec!r}: {module_name!r} has no function {function_name!r}")
    return spec, function


def score(
    rewards: list[tuple[str, Callable]], prompts: list, completions: list,
    completion_ids: list[list[int]], columns: dict[str, list],
) -> torch.Tensor:  # fmt: skip
    """Rewards [n, functions] fp32, each function called as TRL calls it:
    f(prompts=, completions=, completion_ids=, **columns) -> one float (or None: not scored) per
    completion. Raises RewardError naming the function when it raises, returns the wrong number
    of values, or a value that is not a finite number."""
    out = torch.full((len(completions), len(rewards)), math.nan)
    for j, (name, function) in enumerate(rewards):
        try:
            values = function(prompts=prompts, completions=completions,
                              completion_ids=completion_ids, **columns)  # fmt: skip
        except Exception as e:  # the user's function: stop with its name and the cause
            raise RewardError(f"reward function {name} raised {type(e).__name__}: {e}") from e
        try:
            values = list(values)
        except TypeError:
            raise RewardError(
                f"reward function {name} returned {type(values).__name__}; expected a list of "
                f"{len(completions)} floats"
            ) from None
        if len(values) != len(completions):
            raise RewardError(
                f"reward function {name} returned {len(values)} rewards for {len(completions)} "
                "completions (one per completion expected)"
            )
        for i, value in enumerate(values):
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise RewardError(
                    f"reward function {name} returned {value!r} for completion {i}; rewards must "
                    "be finite numbers (or None for 'not scored')"
                )
            out[i, j] = float(value)
    return out


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> torch.Tensor:
    """TRL's advantages ("sum_then_normalize"): reward minus its group's mean, divided by the
    group's (or batch's) std + 1e-4 unless scale_rewards is "none"; rows not scored (NaN) get 0.
    rewards [n] with the num_generations completions of each prompt consecutive."""
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (_nanstd(groups, dim=1).repeat_interleave(num_generations) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (_nanstd(rewards, dim=None) + 1e-4)
    elif scale_rewards != "none":
        raise ArgumentError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    return torch.nan_to_num(advantages, nan=0.0)


def _nanstd(x: torch.Tensor, dim) -> torch.Tensor:
    # TRL's nanstd: the unbiased (n - 1) std over the non-NaN values
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    variance = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    return (variance * count / (count - 1)).sqrt()


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *,
    epsilon_low: float = 0.2, epsilon_high: float = 0.2, ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Per-token loss [b, t] -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) with r = exp(logps -
    old_logps), plus beta * k3 KL to the reference (exp(ref - logps) - (ref - logps) - 1) when beta
    is not 0; and the per-token KL and "clipped region" mask for the metrics."""
    advantages = advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    stats = {
        "clipped": ((ratio < 1 - epsilon_low) & (advantages < 0))
        | ((ratio > 1 + epsilon_high) & (advantages > 0))
    }
    if beta != 0.0:
        if ref_logps is None:
            raise ArgumentError("policy_loss: beta != 0 needs ref_logps")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        loss = loss + beta * kl
        stats["kl"] = kl
    return loss, stats


def reduce_loss(
    per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, *, max_completion_length: int
) -> torch.Tensor:
    """TRL's normalization of one batch: "grpo" the mean over sequences of each sequence's token
    mean; "bnpo" the mean over all completion tokens; "dr_grpo" the token sum divided by
    (sequences x max_completion_length)."""
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    raise ArgumentError(f"loss_type must be one of {GRPO_LOSSES}, got {loss_type!r}")


# ---------------------------------------------------------------------------------------------
# The method: rollouts as the step's micro-batches, the loss, the metrics
# ---------------------------------------------------------------------------------------------


class Grpo:
    """GRPO in a run: `stream` yields rollout micro-batches (batch_size prompts x num_generations
    completions each) reused for num_iterations optimizer steps; `loss` is the summed form of
    `reduce_loss` whose normalizer `count` train_step divides by over the whole step."""

    name = "grpo"

    def __init__(self, config):
        self.config = config
        self.rewards = [load_reward(spec) for spec in config.rewards]
        weights = config.reward_weights or (1.0,) * len(self.rewards)
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.reference = None  # full mode with beta != 0: the starting weights (a frozen copy)
        self.run = None
        self.pad_id = 0
        self.rollout_stats: dict = {}
        self.bucket = 0  # > 0: rollouts padded to a few lengths (CUDA graphs)

    def bind(self, run) -> None:
        self.run = run
        if run.config.mode == "full" and self.config.beta and self.reference is None:
            self.reference = tree_map(lambda t: t.detach().clone(), run.params)

    def count(self, batch: dict) -> int:
        rows = batch["tokens"].shape[0]
        if self.config.loss_type == "bnpo":
            return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return rows

    # rollouts ---------------------------------------------------------------------------
    def policy(self):
        """(params, lora) the rollouts sample from: the trained tensors themselves, dropout off
        (no autograd graph: none is kept alive past the rollouts)."""
        with torch.no_grad():
            return self.run.trainable.model(False)

    def rollout(self, prompts: list, seed: int) -> list[dict]:
        """Micro-batches of completions for `prompts` (a list per micro-batch of Prompt rows)."""
        run, c = self.run, self.config
        tok = run.tokenizer
        g = c.num_generations
        flat = [p for micro in prompts for p in micro for _ in range(g)]
        tick = time.perf_counter()
        params, lora = self.policy()
        dense = c.rollout_dequantized and has_quantized(params)
        if dense:
            params = dequantized(params)
        sampling = Sampling(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, seed=seed)
        completion_ids = generate_tokens(
            params, [p.tokens.tolist() for p in flat], lora=lora, sampling=sampling,
            max_new_tokens=c.max_completion_length, eos_token_ids=tok.eos_token_ids,
            pad_token_id=self.pad_id,
        )  # fmt: skip
        if dense or not c.keep_rollout_graphs or getattr(run.trainable, "master", None) is not None:
            # asked for, or the policy is a fresh copy (the dequantized base, full mode's cast of
            # the master weights) whose decode graph and cache are never found again: freed now
            release_graphs()
        del params
        completion_ids = [ids or [tok.eos_token_id] for ids in completion_ids]
        rollout_s = time.perf_counter() - tick
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in completion_ids]
        completions = [
            [{"role": "assistant", "content": t}] if isinstance(p.prompt, list) else t
            for p, t in zip(flat, texts)
        ]
        keys = sorted({k for p in flat for k in p.columns})
        columns = {k: [p.columns.get(k) for p in flat] for k in keys}
        per_function = score(self.rewards, [p.prompt for p in flat], completions,
                             completion_ids, columns)  # fmt: skip
        total = (per_function * self.weights).nansum(1)
        total[torch.isnan(per_function).all(1)] = math.nan
        advantages = group_advantages(total, g, c.scale_rewards)
        self.rollout_stats = {
            "reward": float(torch.nanmean(total)),
            "reward_std": float(_nanstd(total.view(-1, g), dim=1).nanmean()),
            "completion_length": sum(map(len, completion_ids)) / len(completion_ids),
            "rollout_s": round(rollout_s, 3),
            **{f"reward/{name}": float(torch.nanmean(per_function[:, j]))
               for j, (name, _) in enumerate(self.rewards)},
        }  # fmt: skip
        batches, at = [], 0
        for micro in prompts:
            n = len(micro) * g
            batch = collate_rollouts(flat[at : at + n], completion_ids[at : at + n], self.pad_id,
                                     bucket=self.bucket,
                                     limit=c.max_prompt_length + c.max_completion_length)  # fmt: skip
            batch["advantages"] = advantages[at : at + n]
            batches.append({k: v.to(run.device) for k, v in batch.items()})
            at += n
        with torch.no_grad():
            for batch in batches:
                if c.num_iterations > 1:
                    p, lora = self.policy()
                    batch["old_logps"] = token_logprobs(
                        p, batch, lora=lora, temperature=c.temperature
                    )
                if c.beta:
                    ref = self.reference if self.reference is not None else run.params
                    batch["ref_logps"] = token_logprobs(
                        ref, batch, lora=None, temperature=c.temperature
                    )
        return batches

    # loss -------------------------------------------------------------------------------
    def step_loss(self, run, batch: dict, training: bool) -> tuple[torch.Tensor, dict]:
        """(summed loss, stats as 0-d tensors): no host sync, so the step can be a CUDA graph
        (the rollouts, old and reference log-probs are batch inputs computed before it)."""
        c = self.config
        params, lora = run.trainable.model(training)
        layer_fn = run.layer_fn if training else None
        logps = token_logprobs(
            params, batch, lora=lora, layer_fn=layer_fn, temperature=c.temperature
        )
        old = batch.get("old_logps", logps.detach())
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1).float()
        epsilon_high = c.epsilon if c.epsilon_high is None else c.epsilon_high
        per_token, stats = policy_loss(
            logps, old, batch["advantages"], epsilon_low=c.epsilon, epsilon_high=epsilon_high,
            ref_logps=batch.get("ref_logps"), beta=c.beta,
        )  # fmt: skip
        out = {"tokens": mask.sum(), "clip_ratio": (stats["clipped"] * mask).sum()}
        if "kl" in stats:
            out["kl"] = (stats["kl"].detach() * mask).sum()
        if c.loss_type == "grpo":
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), out
        if c.loss_type == "bnpo":
            return (per_token * mask).sum(), out
        return (per_token * mask).sum() / c.max_completion_length, out

    def metrics(self, stats: list[dict] = ()) -> dict:
        """The rollouts' metrics and the step's clip ratio (and KL) per completion token, from
        its micro-batches' stats (as `step_loss` returns them; one host sync)."""
        totals = summed_stats(list(stats)) or {"tokens": 0.0, "clip_ratio": 0.0}
        out = dict(self.rollout_stats)
        tokens = max(1.0, totals.pop("tokens"))
        out.update({k: round(v / tokens, 6) for k, v in totals.items()})
        return out


def collate_rollouts(prompts: list, completion_ids: list[list[int]], pad_id: int, *,
                     bucket: int = 0, limit: int = 0) -> dict:  # fmt: skip
    """prompt + completion rows, right-padded (to `padded_length`: bucket > 0 pads to a few
    lengths, for CUDA graphs): {"tokens", "labels" (the completion ids), "attention_mask"};
    positions count from each row's first token."""
    rows = [(p.tokens.tolist(), ids) for p, ids in zip(prompts, completion_ids)]
    seq = padded_length(max(len(a) + len(b) for a, b in rows), bucket=bucket, limit=limit)
    tokens = torch.full((len(rows), seq), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), seq), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((len(rows), seq), dtype=torch.int64)
    for r, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(completion)
        tokens[r, : n + m] = torch.tensor(prompt + completion)
        labels[r, n : n + m] = torch.tensor(completion)
        mask[r, : n + m] = 1
    return {"tokens": tokens, "labels": labels, "attention_mask": mask}


class RolloutStream:
    """The step's micro-batches for GRPO: at a data position (epoch, index, iteration) it takes
    `count` micro-batches of prompts, samples and scores their completions, and hands the same
    rollouts to num_iterations consecutive steps. A resumed run in the middle of the iterations
    samples that batch again (with the same seed, from the restored weights)."""

    def __init__(self, method: Grpo, data, config, device: torch.device):
        self.method, self.data, self.config, self.device = method, data, config, device
        self.plans: dict[int, list] = {}
        self.buffer: tuple | None = None

    def plan(self, epoch: int) -> list:
        if epoch not in self.plans:
            self.plans = {epoch: epoch_plan(
                self.data, batch_size=self.config.batch_size, max_seq_length=self.config.max_seq_length,
                packing=False, seed=self.config.seed, epoch=epoch,
            )}  # fmt: skip
        return self.plans[epoch]

    def take(self, position: dict, count: int) -> tuple[list[dict], dict]:
        epoch, index = position["epoch"], position["index"]
        iteration = position.get("iteration", 0)
        key = (epoch, index)
        if self.buffer is None or self.buffer[0] != key:
            micro, e, i = [], epoch, index
            while len(micro) < count:
                plan = self.plan(e)
                if i >= len(plan):
                    e, i = e + 1, 0
                    continue
                micro.append([self.data.examples[row[0]] for row in plan[i]])
                i += 1
            seed = (self.config.seed * 1_000_003 + epoch * 10_007 + index) % 2**31
            self.buffer = (key, self.method.rollout(micro, seed), {"epoch": e, "index": i})
        _, batches, after = self.buffer
        if iteration + 1 < self.config.num_iterations:
            return batches, {"epoch": epoch, "index": index, "iteration": iteration + 1}
        return batches, dict(after, iteration=0)

    def epoch_fraction(self, position: dict) -> float:
        done = position["index"] / max(1, len(self.plan(position["epoch"])))
        return round(position["epoch"] + done, 4)


def has_quantized(params) -> bool:
    """Whether any weight of `params` is quantized."""
    return any(map(quant.is_quantized, pytree.tree_leaves(params, is_leaf=quant.is_quantized)))


def dequantized(params):
    """`params` with each quantized linear weight replaced by its dequantized tensor (in its
    compute dtype), for decoding many rows without a dequantize per step. Mixture-of-experts
    stacks stay quantized: their kernels take a quantized stack as [E·out, in], a dense one as
    [E, out, in]."""

    def visit(path, leaf):
        if quant.is_quantized(leaf) and not any(getattr(k, "key", None) == "experts" for k in path):
            return leaf.dequantize()
        return leaf

    with torch.no_grad():
        return pytree.tree_map_with_path(visit, params, is_leaf=quant.is_quantized)
