"""Batches of tokenized examples: pack examples into rows (best fit, or wrapped over the row
ends), collate packed or padded micro-batches, plan an epoch's micro-batches from a seed.
`fnlm.data` re-exports these names.

    plan = fnlm.batches.epoch_plan(data, batch_size=2, max_seq_length=2048, packing=True, seed=0, epoch=0)
    batch = fnlm.batches.collate(data, plan[0], pad_id=0, packing=True, length=2048)
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from fnlm.errors import ArgumentError

if TYPE_CHECKING:  # fnlm.data imports this module
    from fnlm.data import Example, TokenizedData

IGNORE_INDEX = -100  # labels of tokens that carry no loss (transformers' convention)
PACKING_STRATEGIES = ("bfd", "wrapped")

# A packed row's item: an example's index (the whole example) or (index, start, stop), the
# tokens [start, stop) of it (`wrap`'s pieces).
Piece = int | tuple[int, int, int]


def pack(lengths: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_seq_length` tokens: best fit decreasing
    (the longest example first, each into the fullest row it still fits), as TRL's "bfd" packing,
    so rows come out nearly full (the trainer pads every row to max_seq_length). Rows are in the
    order they were opened; `epoch_plan` shuffles them."""
    for index, length in enumerate(lengths):
        if length > max_seq_length:
            raise ArgumentError(
                f"example {index} has {length} tokens, more than max_seq_length={max_seq_length}"
            )
    rows: list[list[int]] = []
    # rows with room r left wait in by_room[r]; bit r of `open_rooms` says by_room[r] is not empty,
    # so the best fit for a length L is the lowest set bit at or above L (one shift and a mask)
    by_room: list[list[int]] = [[] for _ in range(max_seq_length + 1)]
    open_rooms = 0
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        fitting = open_rooms >> length
        if fitting:
            room = length + (fitting & -fitting).bit_length() - 1
            row = by_room[room].pop()
            if not by_room[room]:
                open_rooms &= ~(1 << room)
        else:
            row, room = len(rows), max_seq_length
            rows.append([])
        rows[row].append(index)
        room -= length
        if room > 0:
            by_room[room].append(row)
            open_rooms |= 1 << room
    return rows


def wrap(lengths: Sequence[int], max_seq_length: int) -> list[list[Piece]]:
    """Fill rows of exactly `max_seq_length` tokens (the last one excepted) with the examples in
    the given order, cutting an example at a row's end: it goes on at the start of the next row
    as a piece of its own (attention stays inside each piece, as inside each example). The piece
    after a cut starts again at the cut's last token, whose target is never learned (a piece's
    first label is ignored; see `collate_packed`): so no token loses its loss to a cut, at one
    token per cut. A row with one token of room left is padded instead (a one-token piece
    learns nothing). Returns rows of `Piece`s: (index, start, stop) for a part of an example,
    its index for a whole one."""
    if max_seq_length < 2:
        raise ArgumentError(f"wrapped packing needs max_seq_length >= 2, got {max_seq_length}")
    rows: list[list[Piece]] = [[]]
    room = max_seq_length
    for index, length in enumerate(lengths):
        start = 0
        while start < length:
            if room < 2:
                rows.append([])
                room = max_seq_length
            stop = min(length, start + room)
            whole = start == 0 and stop == length
            rows[-1].append(index if whole else (index, start, stop))
            room -= stop - start
            if stop == length:
                break
            start = stop - 1  # the next piece repeats the cut's last token (see above)
    return [row for row in rows if row]


def piece(examples: Sequence[Example], item: Piece) -> Example:
    """The example (or the part of it) a packed row's item names."""
    if isinstance(item, int):
        return examples[item]
    index, start, stop = item
    example = examples[index]
    return type(example)(example.tokens[start:stop], example.labels[start:stop])


def collate_packed(
    examples: Sequence[Sequence[Example]],
    *,
    pad_id: int,
    pad_to_multiple: int = 1,
    length: int | None = None,
) -> dict[str, torch.Tensor]:
    """A batch of packed rows: each row holds several examples back to back.

    Returns {"tokens", "labels", "positions", "segments"} [rows, seq]: positions restart at 0 for
    each example, segments number the examples of a row from 1 (padding is segment 0) so
    attention stays inside each example, and the label of each example's first token is -100 so
    the previous example's last token does not learn to predict it. When every row holds a single
    example and no padding, positions and segments are left out (plain causal attention).
    length: every row padded to exactly this many tokens, positions and segments always given —
    one batch shape for the whole run (the trainer: no recompilation, one CUDA graph).
    """
    lengths = [sum(len(e) for e in row) for row in examples]
    if length is not None and max(lengths) > length:
        raise ArgumentError(f"a packed row holds {max(lengths)} tokens, more than length={length}")
    seq = length if length is not None else _round_up(max(lengths), pad_to_multiple)
    batch = len(examples)
    tokens = torch.full((batch, seq), pad_id, dtype=torch.int64)
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.int64)
    positions = torch.zeros((batch, seq), dtype=torch.int64)
    segments = torch.zeros((batch, seq), dtype=torch.int64)
    for r, row in enumerate(examples):
        at = 0
        for s, example in enumerate(row, start=1):
            n = len(example)
            tokens[r, at : at + n] = example.tokens
            labels[r, at : at + n] = example.labels
            labels[r, at] = IGNORE_INDEX
            positions[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = s
            at += n
    out = {"tokens": tokens, "labels": labels}
    if length is not None or any(len(row) > 1 for row in examples) or any(n < seq for n in lengths):
        out.update(positions=positions, segments=segments)
    return out


def collate_padded(
    examples: Sequence[Example], *, pad_id: int, pad_to_multiple: int = 1
) -> dict[str, torch.Tensor]:
    """A right-padded batch {"tokens", "labels", "attention_mask"} [batch, longest]."""
    seq = _round_up(max(len(e) for e in examples), pad_to_multiple)
    tokens = torch.full((len(examples), seq), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), seq), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((len(examples), seq), dtype=torch.int64)
    for r, example in enumerate(examples):
        n = len(example)
        tokens[r, :n] = example.tokens
        labels[r, :n] = example.labels
        mask[r, :n] = 1
    out = {"tokens": tokens, "labels": labels}
    if bool((mask == 0).any()):
        out["attention_mask"] = mask
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def trained_tokens(batch: dict) -> int:
    """How many tokens of a batch carry a loss (labels are shifted by one inside `fnlm.loss`)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def epoch_plan(
    data: TokenizedData,
    *,
    batch_size: int,
    max_seq_length: int,
    packing: bool,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    strategy: str = "bfd",
) -> list[list[list[Piece]]]:
    """The micro-batches of one epoch as example indices: [micro-batch][row][example], where a
    packed row's example may be a `Piece` of one (strategy "wrapped").

    strategy (with `packing`): "bfd", whole examples by best fit decreasing (`pack`), or
    "wrapped", every row full, examples cut at the rows' ends (`wrap`). The order is a pure
    function of (seed, epoch), so a resumed run sees the same batches.
    """
    if batch_size < 1:
        raise ArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    if strategy not in PACKING_STRATEGIES:
        raise ArgumentError(
            f"packing strategy must be one of {PACKING_STRATEGIES}, got {strategy!r}"
        )
    order = list(range(len(data.examples)))
    if shuffle:
        random.Random(f"{seed}/{epoch}").shuffle(order)
    if packing:
        lengths = [len(data.examples[i]) for i in order]
        rows = (pack if strategy == "bfd" else wrap)(lengths, max_seq_length)
        if shuffle:  # best fit opens rows longest example first; their order is the seed's
            random.Random(f"{seed}/{epoch}/rows").shuffle(rows)
        rows = [[_reindex(item, order) for item in row] for row in rows]
    else:
        rows = [[i] for i in order]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def _reindex(item: Piece, order: list[int]) -> Piece:
    return order[item] if isinstance(item, int) else (order[item[0]], *item[1:])


def collate(
    data: TokenizedData,
    micro_batch: list[list[Piece]],
    *,
    pad_id: int,
    packing: bool,
    pad_to_multiple: int = 1,
    length: int | None = None,
) -> dict[str, torch.Tensor]:
    """The batch dict of one planned micro-batch (see `epoch_plan`); `length` fixes the length of
    packed rows (see `collate_packed`)."""
    if packing:
        rows = [[piece(data.examples, item) for item in row] for row in micro_batch]
        return collate_packed(rows, pad_id=pad_id, pad_to_multiple=pad_to_multiple, length=length)
    examples = [data.examples[row[0]] for row in micro_batch]
    return collate_padded(examples, pad_id=pad_id, pad_to_multiple=pad_to_multiple)


def micro_batches(
    data: TokenizedData,
    *,
    batch_size: int,
    max_seq_length: int,
    pad_id: int = 0,
    packing: bool = True,
    seed: int = 3407,
    epoch: int = 0,
    shuffle: bool = True,
    pad_to_multiple: int = 1,
    strategy: str = "bfd",
) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of one epoch, in order: packed rows (`packing`, by `strategy`: see
    `epoch_plan`) or right-padded examples."""
    plan = epoch_plan(
        data,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        packing=packing,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        strategy=strategy,
    )
    for micro_batch in plan:
        yield collate(
            data, micro_batch, pad_id=pad_id, packing=packing, pad_to_multiple=pad_to_multiple
        )
