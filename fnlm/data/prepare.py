"""`prepare`: a data source -> TokenizedData, read in this process (local files) or through
`datasets` (hub and saved datasets, streaming, several processes), cached either way."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from fnlm import files
from fnlm.data import sources
from fnlm.data.rows import local_files, raw_rows
from fnlm.data.tokenize import (
    BAD_ROW_POLICIES,
    Example,
    RowCounter,
    RowOptions,
    TokenizedData,
    tokenize_row,
    tokenizer_fingerprint,
)
from fnlm.errors import ArgumentError

CACHE_VERSION = sources.CACHE_VERSION


def prepare(
    source: str | os.PathLike,
    tok,
    *,
    max_seq_length: int,
    train_on_responses_only: bool = True,
    truncation: bool = True,
    text_blocks: bool = True,
    split: str = "train",
    subset: str | None = None,
    columns: dict[str, str] | None = None,
    streaming: bool = False,
    num_proc: int | None = None,
    on_bad_row: str = "stop",
    template_kwargs: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TokenizedData:
    """Read, standardize and tokenize a data source; the result is cached on disk.

    source: a JSONL / JSON / Parquet file, a directory of them, a saved `datasets` directory, or
        a hub dataset name (`split`, `subset` = its configuration name).
    max_seq_length: text rows longer than this are split into blocks (`text_blocks`; no token
        lost, see `text_blocks`); other examples are cut (truncation=True; counted in
        stats["truncated"] and stats["tokens_cut"]) or are bad rows (truncation=False).
    train_on_responses_only: chat rows learn their assistant turns only (see `chat_pieces`).
    columns: fnlm's row keys -> the dataset's column names, e.g. {"text": "body"}.
    streaming: read rows as they arrive (hub datasets are not downloaded whole); not cached.
    num_proc: tokenize in this many processes (through `datasets`).
    on_bad_row: "stop" raises DataError naming the row and source; "skip" leaves it out,
        counted in stats["skipped"] with the first ones named in stats["skipped_rows"].
    template_kwargs: passed to the chat template, e.g. {"enable_thinking": False}.
    cache_dir: where tokenized data is kept (default $FNLM_CACHE/tokenized); the key covers the
        data's contents, the tokenizer, the chat template and the options that change tokens.
    Examples left without any learned token (a chat with no assistant turn, or one cut before
    its response) are dropped and counted in stats["dropped"].
    Raises DataError for missing/empty sources and bad rows (on_bad_row="stop").
    """
    if not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ArgumentError(f"max_seq_length must be at least 2, got {max_seq_length}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ArgumentError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    if num_proc is not None and (not isinstance(num_proc, int) or num_proc < 1):
        raise ArgumentError(f"num_proc must be a positive integer, got {num_proc!r}")
    if streaming and (num_proc or 1) > 1:
        raise ArgumentError(
            "streaming reads and tokenizes rows in this process as they arrive; num_proc > 1 "
            "needs the whole dataset (leave streaming off)"
        )
    options = RowOptions(
        max_seq_length=max_seq_length, train_on_responses_only=train_on_responses_only,
        truncation=truncation, text_blocks=text_blocks, columns=dict(columns) if columns else None,
        template_kwargs=dict(template_kwargs) if template_kwargs else None,
    )  # fmt: skip
    counter = RowCounter(on_bad_row, str(source))
    found = local_files(source)
    # local files are read here unless datasets' processes, streaming or splits are asked for
    in_process = found is not None and (num_proc or 1) == 1 and not streaming
    in_process = in_process and subset is None and split == "train"
    root = _cache_root(cache_dir) if use_cache else None
    if not in_process:
        parts = sources.open_parts(
            source, split=split, subset=subset, streaming=streaming,
            cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None,
        )  # fmt: skip
        examples, cached = sources.tokenize_parts(
            parts, tok, options, counter, num_proc=num_proc, cache_root=root
        )
        stats = counter.finish(examples)
        if cached:
            stats["cached"] = str(root)
        return _reported(TokenizedData(examples, str(source), stats))
    cache_file = None
    if root is not None:
        key = _cache_key(found, Path(source).expanduser(), tok, options, on_bad_row)
        cache_file = root / f"{Path(source).stem}-{key}.pt"
        if cache_file.is_file():
            try:
                return _reported(_load_cache(cache_file, str(source)))
            except Exception as e:  # a damaged cache is rebuilt, never trusted
                warnings.warn(f"ignoring unreadable data cache {cache_file}: {e}", stacklevel=2)
    examples = []
    for path in found:
        for row in raw_rows(path):
            result = tokenize_row(tok, row.value, row.where, options)
            counter.count(result)
            examples += [
                Example(torch.tensor(t, dtype=torch.int32), torch.tensor(lab, dtype=torch.int32))
                for t, lab in result.examples
            ]
    data = TokenizedData(examples, str(source), counter.finish(examples))
    if cache_file is not None:
        _save_cache(cache_file, data)
    return _reported(data)


def _reported(data: TokenizedData) -> TokenizedData:
    skipped = data.stats.get("skipped", 0)
    if skipped:
        shown = "\n  ".join(data.stats.get("skipped_rows", []))
        warnings.warn(
            f"{data.source}: {skipped} bad row(s) skipped (on_bad_row='skip'); the first:\n  "
            f"{shown}",
            stacklevel=3,
        )
    return data


def _cache_root(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("FNLM_CACHE") or Path.home() / ".cache" / "fnlm"
    return Path(root).expanduser() / "tokenized"


def _cache_key(found: list[Path], path: Path, tok, options: RowOptions, on_bad_row: str) -> str:
    h = hashlib.sha256()
    for f in found:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    h.update(tokenizer_fingerprint(tok).encode())
    h.update(options.key().encode())
    h.update(json.dumps([on_bad_row, CACHE_VERSION]).encode())  # skipped rows are not stored
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
