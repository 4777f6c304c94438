"""Tokenization: one row -> examples (tokens + labels), long texts split into blocks, and the
tokenized dataset (`TokenizedData`) with its counts."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from fnlm.batches import IGNORE_INDEX
from fnlm.data.chat import chat_pieces
from fnlm.data.rows import Row, map_columns, standardize
from fnlm.errors import ArgumentError, DataError

BAD_ROW_POLICIES = ("stop", "skip")
SKIPPED_SHOWN = 5  # skipped rows named in the log (all are counted)


@dataclass(frozen=True)
class Example:
    """Token ids and labels (same length; -100 where nothing is learned), as int32 tensors."""

    tokens: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.numel()


def tokenize_example(
    tok,
    sample: dict,
    *,
    train_on_responses_only: bool = True,
    where: str = "example",
    template_kwargs: dict | None = None,
) -> Example:
    """Tokens and labels of one standardized sample ({"messages"} or {"text"}).

    Text: `encode(text)` with the tokenizer's special tokens, plus eos if it is not already
    last; every token is learned. Chat: the template's render, tokenized piece by piece (see
    `chat_pieces`) with add_special_tokens=False (the template writes its own bos); with
    `train_on_responses_only`, only assistant pieces are learned. `template_kwargs` go to the
    chat template (enable_thinking=False).
    """
    if "text" in sample:
        ids = list(tok.encode(sample["text"], add_special_tokens=True))
        eos = tok.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        tokens = torch.tensor(ids, dtype=torch.int32)
        return Example(tokens, tokens.clone())
    if not getattr(tok, "chat_template", None):
        raise DataError(
            f"{where}: chat rows need a chat template, and this tokenizer has none; use 'text' "
            "rows or a tokenizer with a chat template"
        )
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in chat_pieces(tok, sample["messages"], where, template_kwargs):
        piece = list(tok.encode(text, add_special_tokens=False))
        ids.extend(piece)
        labels.extend(
            piece if trained or not train_on_responses_only else [IGNORE_INDEX] * len(piece)
        )
    return Example(torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32))


def text_blocks(example: Example, max_seq_length: int) -> list[Example]:
    """A long text example as blocks of at most `max_seq_length` tokens, each starting with the
    previous block's last token: that token is only context there (a block's first token is
    never a target), so every target of the document is learned exactly once, as unsplit.

    >>> [len(b) for b in text_blocks(Example(torch.arange(10), torch.arange(10)), 4)]
    [4, 4, 4]
    """
    if max_seq_length < 2:
        raise ArgumentError(f"max_seq_length must be at least 2, got {max_seq_length}")
    n, step = len(example), max_seq_length - 1
    starts = range(0, max(n - 1, 1), step)
    return [
        Example(example.tokens[s : s + max_seq_length], example.labels[s : s + max_seq_length])
        for s in starts
    ]


@dataclass
class RowResult:
    """What one row became: examples as (tokens, labels) lists, counts, or the error that made
    it a bad row (the message names the row)."""

    examples: list[tuple[list[int], list[int]]] = field(default_factory=list)
    truncated: int = 0
    tokens_cut: int = 0
    blocks: int = 0
    dropped: int = 0
    error: str = ""


@dataclass(frozen=True)
class RowOptions:
    """How rows become examples (the options of `prepare` that change the tokens)."""

    max_seq_length: int
    train_on_responses_only: bool = True
    truncation: bool = True
    text_blocks: bool = True
    columns: dict | None = None
    template_kwargs: dict | None = None

    def key(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, default=str)


def tokenize_row(tok, value: Any, where: str, options: RowOptions) -> RowResult:
    """One raw row (a dict, or a JSONL line's text) -> RowResult; never raises for bad data.

    Text rows longer than max_seq_length are split into blocks (`text_blocks`, options.text_blocks)
    or, as chats are, cut (truncation) or refused. A chat left without a learned token is
    dropped (counted, not an error).
    """
    try:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON: {e.msg} at column {e.colno}") from None
        sample = standardize(map_columns(Row(value, where), options.columns))
        example = tokenize_example(
            tok, sample, train_on_responses_only=options.train_on_responses_only, where=where,
            template_kwargs=options.template_kwargs,
        )  # fmt: skip
        result = RowResult()
        limit = options.max_seq_length
        if len(example) > limit and "text" in sample and options.text_blocks:
            pieces = text_blocks(example, limit)
            result.blocks = len(pieces)
        elif len(example) > limit:
            if not options.truncation:
                raise DataError(
                    f"{where}: the example is {len(example)} tokens long, more than "
                    f"max_seq_length={limit}; raise max_seq_length or allow truncation"
                )
            result.truncated, result.tokens_cut = 1, len(example) - limit
            pieces = [Example(example.tokens[:limit], example.labels[:limit])]
        else:
            pieces = [example]
        for piece in pieces:
            # Position 0 is never a target (labels are shifted), so it does not count as learned.
            if bool((piece.labels[1:] != IGNORE_INDEX).any()):
                result.examples.append((piece.tokens.tolist(), piece.labels.tolist()))
        result.dropped = int(not result.examples)
        return result
    except Exception as e:  # a bad row, reported by the caller's policy with its place
        message = str(e) if isinstance(e, DataError) else f"{where}: {type(e).__name__}: {e}"
        return RowResult(error=message)


class RowCounter:
    """Sums RowResults into the stats of a TokenizedData; applies the bad-row policy."""

    def __init__(self, on_bad_row: str, source: str):
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ArgumentError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
        self.on_bad_row, self.source = on_bad_row, source
        self.stats = dict(rows=0, truncated=0, tokens_cut=0, dropped=0, blocks=0, skipped=0)
        self.skipped_rows: list[str] = []

    def add(self, rows: int = 1, truncated=0, tokens_cut=0, dropped=0, blocks=0, error="") -> None:
        self.stats["rows"] += rows
        self.stats["truncated"] += truncated
        self.stats["tokens_cut"] += tokens_cut
        self.stats["dropped"] += dropped
        self.stats["blocks"] += blocks
        if error:
            self.bad(error)

    def count(self, result: RowResult) -> None:
        """Add one row's result."""
        self.add(1, truncated=result.truncated, tokens_cut=result.tokens_cut,
                 dropped=result.dropped, blocks=result.blocks, error=result.error)  # fmt: skip

    def bad(self, error: str) -> None:
        if self.on_bad_row == "stop":
            raise DataError(
                f"{error} (data source {self.source}; on_bad_row='skip' skips such rows and "
                "reports them)"
            )
        self.stats["skipped"] += 1
        if len(self.skipped_rows) < SKIPPED_SHOWN:
            self.skipped_rows.append(error)

    def finish(self, examples: list[Example]) -> dict:
        if not examples:
            raise DataError(
                f"{self.source}: none of its {self.stats['rows']} rows has a token to learn "
                f"(chats without assistant turns, or responses cut off by max_seq_length"
                f"{'; ' + str(self.stats['skipped']) + ' bad rows skipped' if self.stats['skipped'] else ''})"
            )
        stats = dict(self.stats, examples=len(examples))
        stats["tokens"] = sum(len(e) for e in examples)
        stats["trained_tokens"] = sum(int((e.labels[1:] != IGNORE_INDEX).sum()) for e in examples)
        if self.skipped_rows:
            stats["skipped_rows"] = list(self.skipped_rows)
        return stats


@dataclass
class TokenizedData:
    """A tokenized dataset: examples plus what happened on the way (counts for the log)."""

    examples: list[Example]
    source: str
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def split(self, fraction: float, seed: int = 3407) -> tuple[TokenizedData, TokenizedData]:
        """(train, held-out) with `fraction` of the examples (at least one) held out, seeded."""
        if not 0.0 < fraction < 1.0:
            raise ArgumentError(f"eval fraction must lie in (0, 1), got {fraction!r}")
        if len(self.examples) < 2:
            raise DataError(f"{self.source}: {len(self)} example(s) cannot be split for evaluation")
        order = list(range(len(self.examples)))
        random.Random(seed).shuffle(order)
        n_eval = min(len(order) - 1, max(1, round(fraction * len(order))))
        held = set(order[:n_eval])
        train = [e for i, e in enumerate(self.examples) if i not in held]
        evaluation = [self.examples[i] for i in sorted(held)]
        return (
            TokenizedData(train, self.source, dict(self.stats, examples=len(train))),
            TokenizedData(evaluation, f"{self.source} (held out)", {"examples": len(evaluation)}),
        )


def tokenizer_fingerprint(tok) -> str:
    """A hash of what decides the token ids: vocabulary and rules, special tokens, template."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend", None) or getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:  # an unknown tokenizer: fingerprint it by its behaviour on a probe text
        probe = "Hello, world! 123 ünïcödé\n\tcode()  <|end|>"
        h.update(repr(tok.encode(probe, add_special_tokens=True)).encode())
    template = getattr(tok, "chat_template", None)
    h.update(json.dumps(template, sort_keys=True).encode())
    h.update(repr((tok.bos_token_id, tok.eos_token_id)).encode())
    return h.hexdigest()
