"""Rows of training data: read them from files (JSONL / JSON / Parquet, or a directory of them),
detect their format, and standardize them into a chat ({"messages": [...]}) or a text ({"text"}).

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}     chat
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}       ShareGPT
    {"instruction": ..., "input": ..., "output": ...}                                Alpaca
    {"prompt": ..., "completion": ...}                                               prompt/completion
    {"text": ...}                                                                    raw text

`columns` maps these keys to a dataset's own column names ({"text": "body"}).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fnlm import files
from fnlm.errors import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
ROLE_ALIASES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}  # fmt: skip

# The keys of the row formats, which `columns` may map to a dataset's own column names.
ROW_KEYS = (
    "messages", "conversations", "instruction", "input", "output", "system", "prompt",
    "completion", "text",
)  # fmt: skip

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
    found = local_files(source)
    if found is None:  # a saved dataset, a hub dataset's repository or a hub name
        rows = _read_hf_dataset(str(Path(source).expanduser()), split)
    else:
        rows = [row for f in found for row in _read_file(f)]
    if not rows:
        raise DataError(f"data source {source} holds no rows")
    return rows


def local_files(source: str | os.PathLike) -> list[Path] | None:
    """The data files of a local file or directory of files (sorted by name); None for a saved
    `datasets` directory or a name that is not a local path (a hub dataset).
    Raises DataError for a directory without data files."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        check_source(source)
        return None
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return None
    if _declares_configs(path / "README.md"):  # a hub dataset's repository: `datasets` reads it
        return None
    found = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
    if not found:
        raise DataError(f"data directory {path} holds no {'/'.join(FILE_SUFFIXES)} files")
    return found


def _declares_configs(readme: Path) -> bool:
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    return text.startswith("---") and "\nconfigs:" in text.split("\n---", 1)[0]


def raw_rows(path: Path) -> list[Row]:
    """The rows of one data file, JSONL lines left as their text (parsed per row, so that one
    bad line is one bad row); blank lines are left out."""
    if path.suffix != ".jsonl":
        return _read_file(path)
    with open(path, encoding="utf-8") as f:
        return [Row(line, f"{path} line {n}") for n, line in enumerate(f, start=1) if line.strip()]


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
    try:
        records = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError: a damaged file
        raise DataError(f"{path} is not a readable Parquet file: {e}") from None
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
    for key, kind in (("messages", "list"), ("conversations", "list"), ("text", "string")):
        if key in value:  # the format's key, but not holding what that format holds
            raise DataError(
                f"{row.where}: {key!r} must be a {kind}, got {type(value[key]).__name__} "
                f"(keys {sorted(value)}; expected {FORMATS_HELP})"
            )
    raise DataError(
        f"{row.where}: unknown row format; found keys {sorted(value)}; expected {FORMATS_HELP}"
    )


def map_columns(row: Row, columns: dict[str, str] | None) -> Row:
    """The row with its columns renamed to fnlm's keys ({"text": "body"}: the dataset's "body"
    column is the text) and None values dropped (Arrow fills the columns a row lacks with None).
    Raises DataError naming the row when a mapped column is missing."""
    value = row.value
    if not isinstance(value, dict):
        return row
    if columns:
        missing = [c for c in columns.values() if c not in value]
        if missing:
            raise DataError(
                f"{row.where}: no column {missing[0]!r} (mapped by columns={columns}); the row "
                f"has {sorted(value)}"
            )
        mapped = set(columns.values())
        renamed = {k: v for k, v in value.items() if k not in mapped and k not in columns}
        renamed.update({key: value[column] for key, column in columns.items()})
        value = renamed
    return Row({k: v for k, v in value.items() if v is not None}, row.where)


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
