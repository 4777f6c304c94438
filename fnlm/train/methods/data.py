"""Data of the preference and RL methods: preference pairs (DPO, ORPO) and prompts (GRPO).

Preference rows, in TRL's formats (each row checked; a bad one is a DataError naming it):

    {"prompt": "2+2?", "chosen": " 4", "rejected": " 5"}                        standard
    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
     "rejected": [{"role": "assistant", ...}]}                                  conversational
    {"chosen": [user, assistant], "rejected": [user, assistant']}               implicit prompt

Tokenized as TRL's DPOTrainer does: conversational rows render prompt (with the generation
prompt) and prompt + completion with the chat template; standard rows are encoded with the
tokenizer's special tokens and eos is appended to the completions; the completion starts where
the tokenized prompt and prompt + completion diverge. Prompt rows for GRPO: {"prompt": str or
messages, ...}; the other columns reach the reward functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fnlm.data import IGNORE_INDEX, Row, TokenizedData, _turns, read_rows
from fnlm.data.chat import common_prefix
from fnlm.errors import DataError, TokenizerError


@dataclass(frozen=True)
class Pair:
    """One preference pair: prompt, chosen and rejected completion ids (int32)."""

    prompt: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor

    def __len__(self) -> int:
        return 2 * self.prompt.numel() + self.chosen.numel() + self.rejected.numel()


@dataclass(frozen=True)
class Prompt:
    """One GRPO prompt: its ids, the prompt as written (str or messages) and the row's other
    columns (passed to the reward functions)."""

    tokens: torch.Tensor
    prompt: Any
    columns: dict

    def __len__(self) -> int:
        return self.tokens.numel()


# Pairs or prompts, with the source and counts for the log: the container of supervised data
# (its `split` holds out a seeded fraction) with other examples in it.
MethodData = TokenizedData


def _conversational(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _messages(row: Row, value, key: str) -> list[dict]:
    return _turns(row, value, "role", "content", key)


def preference_row(row: Row) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of one row, all strings or all message lists; an implicit prompt
    (no 'prompt' key, or a standard prompt beside conversational completions) is the longest
    common prefix of chosen and rejected, as TRL's extract_prompt takes it."""
    value = row.value
    if not isinstance(value, dict) or "chosen" not in value or "rejected" not in value:
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise DataError(
            f"{row.where}: a preference row needs 'chosen' and 'rejected' (and usually 'prompt'); "
            f"found {keys}"
        )
    chosen, rejected, prompt = value["chosen"], value["rejected"], value.get("prompt")
    kinds = {_conversational(chosen), _conversational(rejected)}
    if len(kinds) != 1 or not (
        kinds == {True} or (isinstance(chosen, str) and isinstance(rejected, str))
    ):
        raise DataError(
            f"{row.where}: 'chosen' and 'rejected' must both be strings or both be lists of "
            f"messages, got {type(chosen).__name__} and {type(rejected).__name__}"
        )
    conversational = kinds == {True}
    if prompt is None or _conversational(prompt) != conversational:
        cut = 0
        while cut < min(len(chosen), len(rejected)) and chosen[cut] == rejected[cut]:
            cut += 1
        if not conversational and cut < len(chosen) and cut > 0 and chosen[cut - 1] == " ":
            cut -= 1
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    elif not conversational and not isinstance(prompt, str):
        raise DataError(f"{row.where}: 'prompt' must be a string, got {type(prompt).__name__}")
    if conversational:
        prompt, chosen, rejected = (
            _messages(row, v, k) if v else v
            for v, k in ((prompt, "prompt"), (chosen, "chosen"), (rejected, "rejected"))
        )
    if not prompt or not chosen or not rejected:
        empty = [
            k for k, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)) if not v
        ]
        raise DataError(
            f"{row.where}: empty {', '.join(empty)} (after taking out the shared prompt)"
        )
    return prompt, chosen, rejected


def _ids(tok, where: str, value, *, generation_prompt: bool = False) -> list[int]:
    if isinstance(value, str):
        return list(tok.encode(value, add_special_tokens=True))
    try:
        text = tok.apply_chat_template(
            value, add_generation_prompt=generation_prompt, tokenize=False
        )
    except TokenizerError as e:
        raise DataError(f"{where}: the chat template failed: {e}") from None
    return list(tok.encode(text, add_special_tokens=False))


def tokenize_pair(tok, row: Row, max_seq_length: int) -> tuple[Pair | None, int]:
    """(the pair of one preference row, tokens cut): None when the prompt alone fills
    max_seq_length (TRL drops those too); completions longer than the room left are cut at
    their end (TRL's keep_start)."""
    prompt, chosen, rejected = preference_row(row)
    if isinstance(prompt, str):
        eos = tok.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
    elif not getattr(tok, "chat_template", None):
        raise DataError(f"{row.where}: conversational rows need a tokenizer with a chat template")
    full_chosen, full_rejected = prompt + chosen, prompt + rejected
    prompt_ids = _ids(tok, row.where, prompt, generation_prompt=True)
    chosen_ids, rejected_ids = (
        _ids(tok, row.where, full_chosen),
        _ids(tok, row.where, full_rejected),
    )
    cut = min(common_prefix(prompt_ids, chosen_ids), common_prefix(prompt_ids, rejected_ids))
    chosen_ids, rejected_ids = chosen_ids[cut:], rejected_ids[cut:]
    if cut >= max_seq_length:
        return None, 0
    room = max_seq_length - cut
    lost = max(0, len(chosen_ids) - room) + max(0, len(rejected_ids) - room)
    as_tensor = lambda ids: torch.tensor(ids, dtype=torch.int32)
    pair = Pair(
        as_tensor(prompt_ids[:cut]), as_tensor(chosen_ids[:room]), as_tensor(rejected_ids[:room])
    )
    return pair, lost


def prepare_pairs(source: str, tok, *, max_seq_length: int) -> MethodData:
    """Preference pairs from a JSONL / JSON / Parquet file, directory or `datasets` name."""
    pairs, dropped, empty, truncated, tokens_cut = [], 0, [], 0, 0
    for row in read_rows(source):
        pair, lost = tokenize_pair(tok, row, max_seq_length)
        truncated, tokens_cut = truncated + (lost > 0), tokens_cut + lost
        if pair is None:
            dropped += 1
        elif not pair.chosen.numel() or not pair.rejected.numel():
            empty.append(row.where)
        else:
            pairs.append(pair)
    if empty:
        raise DataError(
            f"{empty[0]}: a completion tokenizes to nothing ({len(empty)} row(s) in all)"
        )
    if not pairs:
        raise DataError(f"{source}: no preference pair fits max_seq_length={max_seq_length}")
    stats = {"dropped": dropped, "truncated": truncated, "tokens_cut": tokens_cut}
    return MethodData(pairs, str(source), stats)


def prepare_prompts(source: str, tok, *, max_prompt_length: int) -> MethodData:
    """GRPO prompts ({"prompt": str or messages, ...other columns}); prompts longer than
    max_prompt_length keep their last tokens (TRL's GRPO truncates on the left too)."""
    prompts, truncated, tokens_cut = [], 0, 0
    for row in read_rows(source):
        value = row.value
        if not isinstance(value, dict) or "prompt" not in value:
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise DataError(
                f"{row.where}: a GRPO row needs a 'prompt' (string or messages); found {keys}"
            )
        prompt = value["prompt"]
        if _conversational(prompt):
            prompt = _messages(row, prompt, "prompt")
        elif not isinstance(prompt, str) or not prompt:
            raise DataError(
                f"{row.where}: 'prompt' must be a non-empty string or a list of messages"
            )
        ids = _ids(tok, row.where, prompt, generation_prompt=True)
        truncated += len(ids) > max_prompt_length
        tokens_cut += max(0, len(ids) - max_prompt_length)
        columns = {k: v for k, v in value.items() if k != "prompt"}
        prompts.append(
            Prompt(torch.tensor(ids[-max_prompt_length:], dtype=torch.int32), prompt, columns)
        )
    return MethodData(prompts, str(source), {"truncated": truncated, "tokens_cut": tokens_cut})


# The shortest padded length of the methods' batches when the step runs as CUDA graphs (then
# 2x, 4x, ... up to max_seq_length: a handful of captured shapes).
GRAPH_BUCKET = 64


def padded_length(longest: int, *, pad_to_multiple: int = 1, bucket: int = 0,
                  limit: int = 0) -> int:  # fmt: skip
    """The padded length of a batch whose longest row has `longest` tokens: a multiple of
    pad_to_multiple; with bucket > 0, the smallest of bucket, 2 bucket, 4 bucket, ... that holds
    it, at most `limit` (the longest a row can be), so that a run's batches take a handful of
    shapes (each a CUDA graph captured once: fnlm.train.graphs)."""
    seq = longest
    if bucket > 0:
        seq = bucket
        while seq < longest:
            seq *= 2
        seq = max(longest, min(seq, limit)) if limit else seq
    return -(-seq // pad_to_multiple) * pad_to_multiple


def summed_stats(stats: list[dict]) -> dict[str, float]:
    """The micro-batches' stats (dicts of 0-d tensors, as the methods' `step_loss` return them)
    summed per key, read with one host sync; {} for none."""
    if not stats:
        return {}
    keys = list(stats[0])
    values = torch.stack([torch.stack([s[k].float() for k in keys]) for s in stats])
    return dict(zip(keys, values.sum(0).tolist(), strict=True))


def collate_pairs(pairs: list[Pair], *, pad_id: int, pad_to_multiple: int = 1, bucket: int = 0,
                  limit: int = 0) -> dict:  # fmt: skip
    """[chosen rows; rejected rows] right-padded (to `padded_length`): {"tokens", "labels"
    (completion tokens), "prompt_labels" (the chosen rows' prompt tokens, for ORPO's NLL),
    "attention_mask"}."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    longest = max(len(a) + len(b) for a, b in rows)
    seq = padded_length(longest, pad_to_multiple=pad_to_multiple, bucket=bucket, limit=limit)
    tokens = torch.full((len(rows), seq), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), seq), IGNORE_INDEX, dtype=torch.int64)
    prompt_labels = labels.clone()
    mask = torch.zeros((len(rows), seq), dtype=torch.int64)
    for r, (prompt, completion) in enumerate(rows):
        n, m = prompt.numel(), completion.numel()
        tokens[r, :n], tokens[r, n : n + m] = prompt, completion
        labels[r, n : n + m] = completion
        if r < len(pairs):
            prompt_labels[r, :n] = prompt
        mask[r, : n + m] = 1
    return {"tokens": tokens, "labels": labels, "prompt_labels": prompt_labels,
            "attention_mask": mask}  # fmt: skip
