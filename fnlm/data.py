"""Training data: read rows, render chats, mask prompts, tokenize (cached), pack or pad batches.

    data = fnlm.data.prepare("data/demo.jsonl", tok, max_seq_length=1024)   # -> TokenizedData
    for batch in fnlm.data.micro_batches(data, batch_size=4, max_seq_length=1024, epoch=0):
        loss = fnlm.loss(params, batch, lora=lora, reduction="sum")

Sources: a JSONL / JSON / Parquet file, a directory of them, or (with the optional `datasets`
package) a hub dataset name. Row formats, detected per row:

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}     chat
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}       ShareGPT
    {"instruction": ..., "input": ..., "output": ...}                                Alpaca
    {"prompt": ..., "completion": ...}                                               prompt/completion
    {"text": ...}                                                                    raw text

Everything but raw text becomes a chat and is rendered with the model's chat template; with
`train_on_responses_only` only the assistant turns (and their end-of-turn tokens) carry labels.
Labels are aligned with the tokens as in transformers (`fnlm.loss` shifts them) and are -100
where nothing is learned.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fnlm import files
from fnlm.batches import (  # noqa: F401  (fnlm.data's batch functions live in fnlm.batches)
    IGNORE_INDEX,
    collate,
    collate_packed,
    collate_padded,
    epoch_plan,
    micro_batches,
    pack,
    trained_tokens,
)
from fnlm.errors import ArgumentError, DataError, TokenizerError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
# Bump when the tokenized layout or the rendering rules change, so old caches are not reused.
CACHE_VERSION = 1

ROLE_ALIASES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}  # fmt: skip

FORMATS_HELP = (
    "'messages' (chat: role/content), 'conversations' (ShareGPT: from/value), "
    "'instruction' + 'output' (Alpaca), 'prompt' + 'completion', or 'text'"
)


# ---------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from ("data/train.jsonl line 17"), for messages."""

    value: Any
    where: str


def read_rows(source: str | os.PathLike, *, split: str = "train") -> list[Row]:
    """All records of a JSONL / JSON / Parquet file, a directory of such files (sorted by name),
    or a `datasets` hub name / saved dataset (optional dependency; `split` picks the split).

    Raises DataError when the source does not exist, holds no rows, or a line is not valid JSON
    (naming the file and line).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _read_hf_dataset(str(path), split)
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"data directory {path} holds no {'/'.join(FILE_SUFFIXES)} files")
        rows = [row for f in files for row in _read_file(f)]
    elif path.is_file():
        rows = _read_file(path)
    else:
        check_source(source)
        rows = _read_hf_dataset(str(source), split)
    if not rows:
        raise DataError(f"data source {source} holds no rows")
    return rows


def check_source(source: str | os.PathLike) -> None:
    """Fail early (before a model is loaded) when a local data path does not exist."""
    path = Path(source).expanduser()
    if not path.exists() and (
        path.suffix in FILE_SUFFIXES or str(source).startswith((".", "/", "~"))
    ):
        raise DataError(f"data file {path} does not exist")


def _read_file(path: Path) -> list[Row]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        f"data file {path}: unknown file type {path.suffix!r}; expected one of {FILE_SUFFIXES}"
    )


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(Row(json.loads(line), f"{path} line {number}"))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {number} is not valid JSON: {e.msg} at column {e.colno}"
                ) from None
    return rows


def _read_json(path: Path) -> list[Row]:
    doc = files.read_json(path, error=DataError)  # names the line and column of a mistake
    if isinstance(doc, dict):  # {"train": [...]} / {"data": [...]}: the one list inside
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path} holds a JSON object with keys {sorted(doc)}; expected a list of rows "
                "(or an object with exactly one list of rows)"
            )
        doc = lists[0]
    if not isinstance(doc, list):
        raise DataError(f"{path} must hold a JSON list of rows, got {type(doc).__name__}")
    return [Row(value, f"{path} row {i}") for i, value in enumerate(doc)]


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {path} needs pyarrow, which is not installed; "
            "`pip install pyarrow` (or `pip install fnlm[data]`)"
        ) from None
    records = pq.read_table(path).to_pylist()
    return [Row(value, f"{path} row {i}") for i, value in enumerate(records)]


def _read_hf_dataset(name: str, split: str) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data source {name!r} is not a file or directory here; to read it as a hub dataset, "
            "install the optional `datasets` package (`pip install fnlm[data]`)"
        ) from None
    try:
        if Path(name).is_dir():
            dataset = datasets.load_from_disk(name)
        else:
            dataset = datasets.load_dataset(name, split=split)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    except Exception as e:  # datasets raises many types; the message says what went wrong
        raise DataError(f"could not load dataset {name!r} (split {split!r}): {e}") from None
    return [Row(value, f"{name}[{split}] row {i}") for i, value in enumerate(dataset)]


# ---------------------------------------------------------------------------------------------
# Row formats -> a chat or a text
# ---------------------------------------------------------------------------------------------


def row_format(row: Row) -> str:
    """ "messages", "sharegpt", "alpaca", "prompt_completion" or "text" for one row.

    Raises DataError naming the row and the keys it has when none fits.
    """
    value = row.value
    if not isinstance(value, dict):
        raise DataError(
            f"{row.where}: a row must be a JSON object, got {type(value).__name__}; "
            f"expected keys {FORMATS_HELP}"
        )
    if isinstance(value.get("messages"), list):
        return "messages"
    if isinstance(value.get("conversations"), list):
        turns = value["conversations"]
        if turns and isinstance(turns[0], dict) and "role" in turns[0]:
            return "messages"
        return "sharegpt"
    if "instruction" in value and "output" in value:
        return "alpaca"
    if "prompt" in value and "completion" in value:
        return "prompt_completion"
    if isinstance(value.get("text"), str):
        return "text"
    raise DataError(
        f"{row.where}: unknown row format; found keys {sorted(value)}; expected {FORMATS_HELP}"
    )


def standardize(row: Row) -> dict:
    """A row as {"messages": [{"role", "content"}, ...]} or {"text": str}.

    ShareGPT roles (human/gpt/system/...) become user/assistant/system/tool; Alpaca becomes an
    optional system turn, a user turn (instruction, then the input after a blank line) and an
    assistant turn. Raises DataError naming the row for malformed turns.
    """
    kind = row_format(row)
    value = row.value
    if kind == "text":
        return {"text": value["text"]}
    if kind == "alpaca":
        user = _text(row, value, "instruction")
        extra = value.get("input")
        if extra is not None:
            extra = _text(row, value, "input")
            if extra.strip():
                user = f"{user}\n\n{extra}"
        messages = [{"role": "user", "content": user}]
        if value.get("system"):
            messages.insert(0, {"role": "system", "content": _text(row, value, "system")})
        messages.append({"role": "assistant", "content": _text(row, value, "output")})
        return {"messages": messages}
    if kind == "prompt_completion":
        prompt, completion = value["prompt"], value["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion},
                ]
            }
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational form
            return {"messages": _turns(row, prompt + completion, "role", "content", "prompt")}
        raise DataError(
            f"{row.where}: 'prompt' and 'completion' must both be strings or both be lists of "
            f"messages, got {type(prompt).__name__} and {type(completion).__name__}"
        )
    if kind == "sharegpt":
        return {"messages": _turns(row, value["conversations"], "from", "value", "conversations")}
    key = "messages" if "messages" in value else "conversations"
    return {"messages": _turns(row, value[key], "role", "content", key)}


def _text(row: Row, value: dict, key: str) -> str:
    text = value[key]
    if not isinstance(text, str):
        raise DataError(f"{row.where}: {key!r} must be a string, got {type(text).__name__}")
    return text


def _turns(row: Row, turns: list, role_key: str, content_key: str, field: str) -> list[dict]:
    if not turns:
        raise DataError(f"{row.where}: {field!r} is an empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            keys = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise DataError(
                f"{row.where}: {field}[{i}] must be an object with {role_key!r} and "
                f"{content_key!r}; found {keys}"
            )
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        if role is None:
            raise DataError(
                f"{row.where}: {field}[{i}] has unknown {role_key} {turn[role_key]!r}; expected one "
                f"of {sorted(ROLE_ALIASES)}"
            )
        content = turn[content_key]
        if isinstance(content, list):  # multimodal-style parts: keep the text parts
            content = "".join(
                p.get("text", "")
                for p in content
                if isinstance(p, dict) and p.get("type") == "text"
            )
        if not isinstance(content, str):
            raise DataError(
                f"{row.where}: {field}[{i}].{content_key} must be a string, got "
                f"{type(content).__name__}"
            )
        message = {k: v for k, v in turn.items() if k not in (role_key, content_key)}
        message.update(role=role, content=content)
        messages.append(message)
    return messages


# ---------------------------------------------------------------------------------------------
# Tokenization: one example = tokens + labels
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """Token ids and labels (same length; -100 where nothing is learned), as int32 tensors."""

    tokens: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.numel()


def chat_pieces(tok, messages: list[dict], where: str = "conversation") -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_response) pieces.

    Each assistant turn is the text between the prompt rendered with `add_generation_prompt`
    and the conversation rendered up to and including that turn, so it holds exactly what the
    model generates at inference (its content and end-of-turn marker). Needs a chat template
    whose renders of growing prefixes extend one another (true of common templates; templates
    that rewrite earlier turns, e.g. dropping past reasoning, are not). Raises DataError otherwise.
    """

    def render(msgs, generation_prompt=False) -> str:
        try:
            return tok.apply_chat_template(
                msgs, add_generation_prompt=generation_prompt, tokenize=False
            )
        except TokenizerError as e:
            raise DataError(f"{where}: the chat template failed: {e}") from None

    full = render(messages)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(
                f"{where}: the conversation starts with an assistant turn; there is no prompt "
                "to answer (start with a user or system message)"
            )
        prompt = render(messages[:i], generation_prompt=True)
        upto = render(messages[: i + 1])
        if not (prompt.startswith(done) and upto.startswith(prompt) and full.startswith(upto)):
            raise DataError(
                f"{where}: the chat template does not render this conversation turn by turn "
                f"(assistant turn {i} changes earlier text), so responses cannot be masked; "
                "train on the whole text instead (train_on_responses_only=False)"
            )
        pieces.append((prompt[len(done) :], False))
        pieces.append((upto[len(prompt) :], True))
        done = upto
    if len(full) > len(done):
        pieces.append((full[len(done) :], False))
    return [(text, trained) for text, trained in pieces if text]


def tokenize_example(
    tok,
    sample: dict,
    *,
    train_on_responses_only: bool = True,
    where: str = "example",
) -> Example:
    """Tokens and labels of one standardized sample ({"messages"} or {"text"}).

    Text: `encode(text)` with the tokenizer's special tokens, plus eos if it is not already
    last; every token is learned. Chat: the template's render, tokenized piece by piece (see
    `chat_pieces`) with add_special_tokens=False (the template writes its own bos); with
    `train_on_responses_only`, only assistant pieces are learned.
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
    for text, trained in chat_pieces(tok, sample["messages"], where):
        piece = list(tok.encode(text, add_special_tokens=False))
        ids.extend(piece)
        labels.extend(
            piece if trained or not train_on_responses_only else [IGNORE_INDEX] * len(piece)
        )
    return Example(torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32))


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


def prepare(
    source: str | os.PathLike,
    tok,
    *,
    max_seq_length: int,
    train_on_responses_only: bool = True,
    truncation: bool = True,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TokenizedData:
    """Read, standardize and tokenize a data source; the result is cached on disk.

    max_seq_length: examples longer than this are cut (truncation=True; counted in
        stats["truncated"] and stats["tokens_cut"]) or rejected (truncation=False: DataError
        naming the row and its length).
    train_on_responses_only: chat rows learn their assistant turns only.
    cache_dir: where tokenized datasets are kept (default $FNLM_CACHE/tokenized); the key covers
        the data files' contents, the tokenizer, the chat template and these options.
    Examples left without any learned token (e.g. a chat with no assistant turn, or one cut
    before its response) are dropped and counted in stats["dropped"].
    Raises DataError for missing/empty sources, unknown row formats and over-long examples.
    """
    if max_seq_length < 2:
        raise ArgumentError(f"max_seq_length must be at least 2, got {max_seq_length}")
    options = dict(
        max_seq_length=max_seq_length,
        train_on_responses_only=train_on_responses_only,
        truncation=truncation,
        split=split,
    )
    cache_file = None
    if use_cache and Path(source).expanduser().exists():
        key = _cache_key(Path(source).expanduser(), tok, options)
        cache_file = _cache_root(cache_dir) / f"{Path(source).stem}-{key}.pt"
        if cache_file.is_file():
            try:
                return _load_cache(cache_file, str(source))
            except Exception as e:  # a damaged cache is rebuilt, never trusted
                warnings.warn(f"ignoring unreadable data cache {cache_file}: {e}", stacklevel=2)
    rows = read_rows(source, split=split)
    examples = []
    stats = dict(rows=len(rows), truncated=0, tokens_cut=0, dropped=0)
    for row in rows:
        example = tokenize_example(
            tok, standardize(row), train_on_responses_only=train_on_responses_only, where=row.where
        )
        if len(example) > max_seq_length:
            if not truncation:
                raise DataError(
                    f"{row.where}: the example is {len(example)} tokens long, more than "
                    f"max_seq_length={max_seq_length}; raise max_seq_length or allow truncation"
                )
            stats["truncated"] += 1
            stats["tokens_cut"] += len(example) - max_seq_length
            example = Example(example.tokens[:max_seq_length], example.labels[:max_seq_length])
        # Position 0 is never a target (labels are shifted), so it does not count as learned.
        if not bool((example.labels[1:] != IGNORE_INDEX).any()):
            stats["dropped"] += 1
            continue
        examples.append(example)
    if not examples:
        raise DataError(
            f"{source}: none of its {len(rows)} rows has a token to learn "
            "(chats without assistant turns, or responses cut off by max_seq_length)"
        )
    stats["examples"] = len(examples)
    stats["tokens"] = sum(len(e) for e in examples)
    stats["trained_tokens"] = sum(int((e.labels[1:] != IGNORE_INDEX).sum()) for e in examples)
    data = TokenizedData(examples, str(source), stats)
    if cache_file is not None:
        _save_cache(cache_file, data)
    return data


def _cache_root(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("FNLM_CACHE") or Path.home() / ".cache" / "fnlm"
    return Path(root).expanduser() / "tokenized"


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


def _cache_key(path: Path, tok, options: dict) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    h.update(tokenizer_fingerprint(tok).encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(str(CACHE_VERSION).encode())
    return h.hexdigest()[:16]


def _save_cache(path: Path, data: TokenizedData) -> None:
    lengths = torch.tensor([len(e) for e in data.examples], dtype=torch.int64)
    payload = {
        "version": CACHE_VERSION,
        "lengths": lengths,
        "tokens": torch.cat([e.tokens for e in data.examples]),
        "labels": torch.cat([e.labels for e in data.examples]),
        "stats": data.stats,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, lambda tmp: torch.save(payload, tmp))


def _load_cache(path: Path, source: str) -> TokenizedData:
    payload = torch.load(path, weights_only=True)
    if payload["version"] != CACHE_VERSION:
        raise ValueError(f"cache version {payload['version']} != {CACHE_VERSION}")
    lengths = payload["lengths"].tolist()
    tokens = payload["tokens"].split(lengths)
    labels = payload["labels"].split(lengths)
    examples = [Example(t, lab) for t, lab in zip(tokens, labels)]
    return TokenizedData(examples, source, dict(payload["stats"], cached=str(path)))
