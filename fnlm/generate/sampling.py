"""Sampling: the knobs in one frozen `Sampling`, transformers' logits processors, the next token.

Sampling(temperature=0.7, top_p=0.9, seed=0)      # validated on construction
choose(logits, Sampling(temperature=0.7), generator=g)
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from fnlm.errors import ArgumentError


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy decoding; otherwise a draw after, in
    transformers' order, repetition_penalty (> 1 discourages tokens of the prompt and output),
    temperature, top_k (0 = off), top_p (1 = off) and min_p (0 = off); `seed` (None = unseeded)
    makes the draws reproducible. Raises ArgumentError naming the first value out of range."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ArgumentError(
                f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ArgumentError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ArgumentError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ArgumentError(f"min_p must lie in [0, 1] (0 = off), got {self.min_p!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ArgumentError(
                f"repetition_penalty must be a number > 0 (1 = off), got {self.repetition_penalty!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ArgumentError(f"seed must be None or an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def of(cls, sampling: Sampling | None = None, **knobs) -> Sampling:
        """`sampling` (default: greedy) with the keyword `knobs` replacing its fields, so
        `generate(..., temperature=0.7)` and `generate(..., sampling=Sampling(temperature=0.7))`
        mean the same. Raises ArgumentError for a name that is not a field."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(knobs) - names)
        if unknown:
            raise ArgumentError(
                f"unknown sampling argument(s) {', '.join(unknown)}; Sampling has "
                f"{', '.join(sorted(names))}"
            )
        if sampling is not None and not isinstance(sampling, cls):
            raise ArgumentError(f"sampling must be a fnlm.generate.Sampling, got {sampling!r}")
        return dataclasses.replace(sampling or cls(), **knobs)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded with `seed` for sampled decoding, else None."""
        if self.seed is None or self.greedy:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


GREEDY = Sampling()


def check_max_new_tokens(max_new_tokens) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ArgumentError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


def penalize(scores: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty on the tokens where `seen` [batch, vocab] is True."""
    if penalty == 1.0 or seen is None:
        return scores
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def process_logits(
    logits: torch.Tensor, sampling: Sampling = GREEDY, *, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores [batch, vocab] after transformers' processors, in its order: repetition penalty
    (on tokens where `seen` [batch, vocab] is True), temperature, top-k, top-p, min-p. Filtered
    tokens get -inf; at least one token always survives. temperature 0 is taken as 1 here (greedy
    decoding skips the warpers)."""
    scores = penalize(logits.float(), seen, sampling.repetition_penalty)
    if sampling.temperature not in (0.0, 1.0):
        scores = scores / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - sampling.top_p
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    if sampling.min_p > 0.0:
        probs = scores.softmax(-1)
        remove = probs < sampling.min_p * probs.amax(-1, keepdim=True)
        remove.scatter_(-1, probs.argmax(-1, keepdim=True), False)
        scores = scores.masked_fill(remove, -math.inf)
    return scores


def choose(
    logits: torch.Tensor,
    sampling: Sampling = GREEDY,
    *,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token [batch] from logits [batch, vocab]: argmax when temperature is 0, else a
    draw from softmax(process_logits(...)). Sampling divides the probabilities by Exp(1) noise
    and takes the argmax (same distribution as torch.multinomial, without a device sync)."""
    if sampling.greedy:
        return penalize(logits.float(), seen, sampling.repetition_penalty).argmax(-1)
    probs = process_logits(logits, sampling, seen=seen).softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)
