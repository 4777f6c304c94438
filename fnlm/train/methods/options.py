"""The method options of `TrainConfig`: their defaults per method and their checks."""

from __future__ import annotations

import math

from fnlm.errors import ArgumentError
from fnlm.train.config import METHODS
from fnlm.train.methods.grpo import GRPO_LOSSES, SCALE_REWARDS
from fnlm.train.methods.preference import DPO_LOSSES

LOSS_TYPES = {"dpo": DPO_LOSSES, "grpo": GRPO_LOSSES}
DEFAULT_BETA = {
    "dpo": 0.1,
    "orpo": 0.1,
    "grpo": 0.0,
}  # TRL 1.15's DPOConfig / ORPOConfig / GRPOConfig


def _fail(name: str, what: str, value) -> None:
    raise ArgumentError(f"TrainConfig.{name} must be {what}, got {value!r}")


def check_method(config) -> None:
    """Fill the method's defaults (beta, loss_type) and refuse options that do not fit it, naming
    the option. Called by TrainConfig.__post_init__."""
    method = config.method
    if method not in METHODS:
        _fail("method", f"one of {METHODS}", method)
    config.rewards = (config.rewards,) if isinstance(config.rewards, str) else tuple(config.rewards)
    config.reward_weights = tuple(float(w) for w in config.reward_weights)
    if config.rollout_dequantized and method != "grpo":
        _fail("rollout_dequantized", "off for a method without rollouts (grpo has them)", True)
    if method == "sft":
        return
    if config.beta is None:
        config.beta = DEFAULT_BETA[method]
    if (
        isinstance(config.beta, bool)
        or not isinstance(config.beta, int | float)
        or not (math.isfinite(config.beta) and config.beta >= 0)
    ):
        _fail("beta", "a finite number >= 0", config.beta)
    if method in ("dpo", "orpo") and config.beta == 0:
        _fail("beta", f"positive for {method}", config.beta)
    allowed = LOSS_TYPES.get(method)
    if config.loss_type is None and allowed:
        config.loss_type = allowed[0]
    if allowed is None and config.loss_type is not None:
        _fail("loss_type", f"unset for {method} (it has one loss)", config.loss_type)
    if allowed and config.loss_type not in allowed:
        _fail("loss_type", f"one of {allowed} for {method}", config.loss_type)
    if not 0.0 <= config.label_smoothing < 0.5:
        _fail("label_smoothing", "in [0, 0.5)", config.label_smoothing)
    if method != "grpo":
        return
    if not config.rewards:
        raise ArgumentError(
            "TrainConfig.rewards: GRPO needs at least one reward function ('module:function' or "
            "'file.py:function'; --reward on the command line)"
        )
    if config.reward_weights and len(config.reward_weights) != len(config.rewards):
        raise ArgumentError(
            f"TrainConfig.reward_weights has {len(config.reward_weights)} weights for "
            f"{len(config.rewards)} reward functions"
        )
    for name, low in (("num_generations", 2), ("max_prompt_length", 1),
                      ("max_completion_length", 1), ("num_iterations", 1)):  # fmt: skip
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            _fail(name, f"an integer >= {low}", value)
    if not (isinstance(config.top_k, int) and config.top_k >= 0):
        _fail("top_k", "an integer >= 0 (0 = off)", config.top_k)
    if not 0 < config.top_p <= 1:
        _fail("top_p", "in (0, 1]", config.top_p)
    if not config.temperature > 0:
        _fail("temperature", "positive (the loss divides the logits by it)", config.temperature)
    if not 0 < config.epsilon < 1:
        _fail("epsilon", "in (0, 1)", config.epsilon)
    if config.epsilon_high is not None and not config.epsilon_high > 0:
        _fail("epsilon_high", "positive", config.epsilon_high)
    if config.scale_rewards not in SCALE_REWARDS:
        _fail("scale_rewards", f"one of {SCALE_REWARDS}", config.scale_rewards)
    if config.eval_data or config.eval_fraction or config.eval_every:
        raise ArgumentError(
            "TrainConfig.eval_data / eval_fraction / eval_every: GRPO runs have no eval loss; "
            "leave them unset (the mean reward is logged each step)"
        )
