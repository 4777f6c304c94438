"""DPO and ORPO: preference losses over the same params / adapter pytrees as supervised training.

The formulas are TRL 1.15's (trl/trainer/dpo_trainer.py `DPOTrainer._compute_loss`,
trl/experimental/orpo/orpo_trainer.py `ORPOTrainer.odds_ratio_loss` / `concatenated_forward`),
and the tests compare losses and gradients with those trainers on the same model and batch.

    losses, stats = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)

DPO's reference model is the same base with the adapters off (lora=None): no second copy of the
weights. In full fine-tuning the reference log-probs are computed once, before the first update,
from the starting weights (`precompute_ref_log_probs`, optional in the LoRA modes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fnlm import kernels
from fnlm.errors import ArgumentError
from fnlm.train.methods.data import collate_pairs, summed_stats
from fnlm.train.methods.logprobs import final_hidden, head_weight, sequence_logprobs

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
    label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Per-pair DPO losses [b] and the detached rewards, from summed completion log-probs [b].

    loss_type: "sigmoid" -logsigmoid(beta * d), with label_smoothing e the conservative DPO of
        TRL < 1.0 (-(1 - e) logsigmoid(beta d) - e logsigmoid(-beta d)); "hinge" relu(1 - beta d);
        "ipo" (d_avg - 1 / (2 beta))^2 with d_avg the per-token log-ratio difference (needs the
        token counts); "robust" TRL's robust DPO with flip rate label_smoothing in [0, 0.5).
    d = (chosen - ref_chosen) - (rejected - ref_rejected).
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
        if e:
            losses = (1 - e) * losses - e * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ArgumentError("dpo_loss: loss_type='ipo' needs chosen_tokens and rejected_tokens")
        average = chosen_ratio / chosen_tokens.clamp(
            min=1
        ) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (average - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean = -(1 - e) * F.logsigmoid(beta * delta)
        flipped = -e * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * e)
    else:
        raise ArgumentError(f"dpo_loss: loss_type must be one of {DPO_LOSSES}, got {loss_type!r}")
    rewards_chosen, rewards_rejected = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return losses, {"rewards_chosen": rewards_chosen, "rewards_rejected": rewards_rejected}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, *, beta: float):
    """(per-pair odds-ratio term [b] to subtract from the NLL, log-odds [b]) from the mean
    per-token completion log-probs: beta * logsigmoid(log odds(chosen) - log odds(rejected))."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return beta * F.logsigmoid(log_odds), log_odds


class Preference:
    """The DPO / ORPO method of a run: its data, batches, loss and metrics.

    `step_loss` returns the summed loss and its stats as tensors (no host sync: the step can be
    a CUDA graph, fnlm.train.graphs); DPO's precomputed reference log-probs are a batch input
    ("ref_logps", `with_reference`), others a no-grad forward inside the step. bucket > 0 pads
    batches to a few lengths (`padded_length`), set when the step runs as CUDA graphs."""

    def __init__(self, config):
        self.config = config
        self.name = config.method
        self.reference = None  # params of a given reference model (TrainConfig.ref_model)
        self.ref_cache: dict[int, tuple[float, float]] = {}
        self.run = None
        self.bucket = 0

    # data -------------------------------------------------------------------------------
    def collate(self, pairs, pad_id: int) -> dict:
        """A micro-batch of pairs (`collate_pairs`) with "pair_keys" [b] (CPU: the reference
        cache's keys)."""
        batch = collate_pairs(pairs, pad_id=pad_id, pad_to_multiple=self.config.pad_to_multiple,
                              bucket=self.bucket, limit=self.config.max_seq_length)  # fmt: skip
        batch["pair_keys"] = torch.tensor([id(p) for p in pairs], dtype=torch.int64)
        return batch

    @staticmethod
    def count(batch: dict) -> int:
        """What a step's loss is averaged over: pairs."""
        return batch["tokens"].shape[0] // 2

    # reference --------------------------------------------------------------------------
    def reference_logprobs(self, run, batch: dict) -> torch.Tensor:
        """Summed completion log-probs [2b] of the reference: precomputed ones (the batch's
        "pair_keys" in the cache), else a given reference model, else the base with the adapters
        off (LoRA modes). Full mode's come from the cache (the starting weights, `precompute`).
        Without the keys no host sync: inside a captured step it is a no-grad forward."""
        keys = batch.get("pair_keys")
        cached = None if keys is None else self.cached_reference(keys, batch["tokens"].device)
        if cached is not None:
            return cached
        if self.reference is None and run.config.mode == "full":
            raise ArgumentError("full-mode DPO: the reference log-probs were not precomputed")
        params = run.params if self.reference is None else self.reference
        with torch.no_grad():
            sums, _ = sequence_logprobs(params, batch, lora=None)
        return sums.float()

    def cached_reference(self, keys: torch.Tensor, device) -> torch.Tensor | None:
        """The precomputed reference log-probs [2b] of these pair keys (CPU), or None."""
        keys = keys.tolist()
        if not all(k in self.ref_cache for k in keys):
            return None
        pairs = [self.ref_cache[k] for k in keys]
        values = [c for c, _ in pairs] + [r for _, r in pairs]
        return torch.tensor(values, dtype=torch.float32).to(device)

    def with_reference(self, run, batch: dict) -> dict:
        """The batch as the step takes it, without the CPU "pair_keys": DPO's precomputed
        reference log-probs become the input "ref_logps" [2b]; otherwise the step computes them
        itself (a no-grad forward of the reference, inside the CUDA graph when captured)."""
        batch = dict(batch)
        keys = batch.pop("pair_keys", None)
        if self.name != "dpo" or keys is None:
            return batch
        cached = self.cached_reference(keys, batch["tokens"].device)
        if cached is not None:
            batch["ref_logps"] = cached
        elif self.reference is None and run.config.mode == "full":
            raise ArgumentError("full-mode DPO: the reference log-probs were not precomputed")
        return batch

    def precompute(self, run, batches) -> None:
        """Reference log-probs of every pair, computed now (before the first update)."""
        params = run.trainable.model(False)[0] if self.reference is None else self.reference
        with torch.no_grad():
            for batch in batches:
                sums, _ = sequence_logprobs(params, batch, lora=None)
                b = self.count(batch)
                values = sums.float().tolist()
                for i, key in enumerate(batch["pair_keys"].tolist()):
                    self.ref_cache[key] = (values[i], values[b + i])

    # loss -------------------------------------------------------------------------------
    def step_loss(self, run, batch: dict, training: bool) -> tuple[torch.Tensor, dict]:
        """(summed per-pair loss, stats as 0-d tensors) of a micro-batch (train_step divides the
        loss by the step's pairs; `metrics` reads the stats)."""
        params, lora = run.trainable.model(training)
        layer_fn = run.layer_fn if training else None
        c = self.config
        b = self.count(batch)
        if self.name == "orpo":
            return self.orpo(params, lora, batch, layer_fn, b)
        sums, counts = sequence_logprobs(params, batch, lora=lora, layer_fn=layer_fn)
        ref = batch["ref_logps"] if "ref_logps" in batch else self.reference_logprobs(run, batch)
        losses, rewards = dpo_loss(
            sums[:b], sums[b:], ref[:b], ref[b:], beta=c.beta, loss_type=c.loss_type,
            label_smoothing=c.label_smoothing, chosen_tokens=counts[:b], rejected_tokens=counts[b:],
        )  # fmt: skip
        stats = _reward_stats(b, rewards["rewards_chosen"], rewards["rewards_rejected"], sums)
        stats["logps_chosen"] = sums[:b].detach().sum()
        stats["logps_rejected"] = sums[b:].detach().sum()
        return losses.sum(), stats

    def orpo(self, params, lora, batch: dict, layer_fn, b: int) -> tuple[torch.Tensor, dict]:
        """NLL of the chosen rows (prompt and completion, as TRL's ORPO) minus the odds-ratio term."""
        model, x, targets = final_hidden(params, batch, lora=lora, layer_fn=layer_fn)
        weight = head_weight(model).to(x.dtype)
        config = model.config
        prompt_targets = torch.cat([batch["prompt_labels"][:, 1:],
                                    torch.full_like(batch["prompt_labels"][:, :1], -100)], 1)  # fmt: skip

        def summed(i, t):  # fixed shapes: the ignored positions are skipped by ignore_index
            return -kernels.fused_linear_cross_entropy(
                x[i], weight, t[i], ignore_index=-100, reduction="sum",
                softcap=config.final_softcap, logit_scale=config.logit_scale,
            )  # fmt: skip

        completion = torch.stack([summed(i, targets) for i in range(2 * b)])
        counts = (targets != -100).sum(1).clamp(min=1)
        prompt = torch.stack([summed(i, prompt_targets) for i in range(b)])
        nll_tokens = counts[:b].sum() + (prompt_targets[:b] != -100).sum()
        nll = -(completion[:b].sum() + prompt.sum()) / nll_tokens.clamp(min=1)
        means = completion / counts
        ratio, log_odds = orpo_loss(means[:b], means[b:], beta=self.config.beta)
        beta = self.config.beta
        stats = _reward_stats(b, beta * means[:b].detach(), beta * means[b:].detach(), completion)
        stats["nll"] = nll.detach() * b
        stats["log_odds_ratio"] = log_odds.detach().sum()
        return nll * b - ratio.sum(), stats

    def metrics(self, stats: list[dict] = ()) -> dict:
        """The step's logged metrics (means over its pairs) from its micro-batches' stats (as
        `step_loss` returns them), read with one host sync."""
        totals = summed_stats(list(stats))
        pairs = totals.pop("pairs", 0)
        if not pairs:
            return {}
        return {k: round(v / pairs, 6) for k, v in totals.items()}


def _reward_stats(b: int, chosen_r: torch.Tensor, rejected_r: torch.Tensor, like) -> dict:
    """The reward stats of b pairs, summed (0-d fp32 tensors)."""
    return {
        "pairs": torch.full((), float(b), device=like.device),
        "rewards_chosen": chosen_r.sum().float(),
        "rewards_rejected": rejected_r.sum().float(),
        "margin": (chosen_r - rejected_r).sum().float(),
        "accuracy": (chosen_r > rejected_r).float().sum(),
    }
