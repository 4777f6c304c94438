"""Data on the `datasets` library (optional: `pip install fnlm[data]`): hub datasets with their
split and subset, saved datasets, and local files when read in several processes or streamed.

Rows are tokenized by `Dataset.map` (num_proc processes) into an Arrow file in fnlm's cache,
named by a fingerprint of the data (file contents, or the dataset's own fingerprint), the
tokenizer and chat template, and the options that change tokens — a changed tokenizer, template
or max_seq_length tokenizes again. Bad rows are recorded there, not raised in the workers, and
the bad-row policy is applied afterwards. Streaming reads rows as they arrive (nothing of the
raw dataset is stored) and tokenizes them in this process; it is not cached.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fnlm.data.rows import _read_json, local_files
from fnlm.data.tokenize import (
    Example,
    RowCounter,
    RowOptions,
    RowResult,
    tokenize_row,
    tokenizer_fingerprint,
)
from fnlm.errors import ArgumentError, DataError

# Bump when the tokenized layout or the rendering rules change, so old caches are not reused.
CACHE_VERSION = 2


def import_datasets(why: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{why} needs the optional `datasets` package: pip install 'fnlm[data]'"
        ) from None
    return datasets


@dataclass
class Part:
    """One dataset to tokenize: rows are JSON texts (`lines`) or records; `locate(i)` names row
    i in messages; `key` fingerprints its contents (None: streamed, not cached)."""

    dataset: object
    lines: bool
    locate: Callable[[int], str]
    key: str | None
    name: str


def open_parts(
    source, *, split: str, subset: str | None, streaming: bool, cache_dir: Path | None
) -> list[Part]:
    """The datasets that make up `source` (one per local file)."""
    datasets = import_datasets(f"data source {source!r}")
    files = local_files(source)
    hub_cache = str(cache_dir / "datasets") if cache_dir is not None else None
    path = Path(source).expanduser()
    if files is not None and path.is_dir() and (subset is not None or split != "train"):
        files = None  # a directory's splits as `datasets` finds them (train.jsonl, test.jsonl ...)
    if files is not None:
        if subset is not None or split != "train":
            raise ArgumentError(
                f"data_subset / data_split / eval_split choose among a `datasets` dataset's "
                f"configurations and splits; {source} is a single file"
            )
        return [_file_part(datasets, f, streaming, hub_cache) for f in files]
    try:
        if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(
                        f"saved dataset {path} has splits {sorted(dataset)}, not {split!r}"
                    )
                dataset = dataset[split]
            key = dataset._fingerprint
            if streaming:
                dataset, key = dataset.to_iterable_dataset(), None
            label = f"{path}[{split}]"
        else:
            dataset = datasets.load_dataset(
                str(source), subset, split=split, streaming=streaming, cache_dir=hub_cache
            )
            key = None if streaming else dataset._fingerprint
            label = f"{source}[{subset + '/' if subset else ''}{split}]"
    except (DataError, ArgumentError):
        raise
    except Exception as e:  # datasets raises many types; the message says what went wrong
        raise DataError(
            f"could not load dataset {str(source)!r} (subset {subset!r}, split {split!r}): "
            f"{type(e).__name__}: {e}"
        ) from None
    return [Part(dataset, False, _Locate(f"{label} row", 0), key, path.name or str(source))]


class _Locate:
    """row index -> "data/x.jsonl line 7" (picklable, for the map's worker processes)."""

    def __init__(self, prefix: str, offset: int):
        self.prefix, self.offset = prefix, offset

    def __call__(self, index: int) -> str:
        return f"{self.prefix} {index + self.offset}"


def _file_part(datasets, path: Path, streaming: bool, hub_cache) -> Part:
    try:
        return _load_file_part(datasets, path, streaming, hub_cache)
    except DataError:
        raise
    except Exception as e:  # datasets / pyarrow: a damaged file (ArrowInvalid names no file)
        raise DataError(f"data file {path} could not be read: {type(e).__name__}: {e}") from None


def _load_file_part(datasets, path: Path, streaming: bool, hub_cache) -> Part:
    key = None if streaming else _file_hash(path)
    if path.suffix == ".jsonl":  # one JSON text per row: a bad line is one bad row
        dataset = datasets.load_dataset(
            "text", data_files=str(path), split="train", streaming=streaming, cache_dir=hub_cache
        )
        return Part(dataset, True, _Locate(f"{path} line", 1), key, path.stem)
    if path.suffix == ".parquet":
        dataset = datasets.load_dataset(
            "parquet", data_files=str(path), split="train", streaming=streaming,
            cache_dir=hub_cache,
        )  # fmt: skip
        return Part(dataset, False, _Locate(f"{path} row", 0), key, path.stem)
    # a JSON list must be parsed whole; its rows go on as JSON texts (schemas may differ)
    texts = [json.dumps(row.value) for row in _read_json(path)]
    dataset = datasets.Dataset.from_dict({"text": texts})
    if streaming:
        dataset = dataset.to_iterable_dataset()
    return Part(dataset, True, _Locate(f"{path} row", 0), key, path.stem)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256(path.name.encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _map_rows(batch: dict, indices: list[int], *, tok, options: RowOptions, lines: bool, locate):
    out = {k: [] for k in ("tokens", "labels", "truncated", "tokens_cut", "blocks", "dropped",
                           "error", "blank")}  # fmt: skip
    columns = list(batch)
    for n, index in enumerate(indices):
        value = batch["text"][n] if lines else {c: batch[c][n] for c in columns}
        blank = lines and not value.strip()  # a blank line: no row, nothing to tokenize
        result = RowResult() if blank else tokenize_row(tok, value, locate(index), options)
        out["tokens"].append([t for t, _ in result.examples])
        out["labels"].append([lab for _, lab in result.examples])
        for name in ("truncated", "tokens_cut", "blocks", "dropped", "error"):
            out[name].append(getattr(result, name))
        out["blank"].append(blank)
    return out


def _features(datasets):
    ids = datasets.Sequence(datasets.Sequence(datasets.Value("int32")))
    counts = {n: datasets.Value("int64") for n in ("truncated", "tokens_cut", "blocks", "dropped")}
    return datasets.Features(
        tokens=ids, labels=ids, error=datasets.Value("string"), blank=datasets.Value("bool"),
        **counts,
    )  # fmt: skip


def tokenize_parts(
    parts: list[Part],
    tok,
    options: RowOptions,
    counter: RowCounter,
    *,
    num_proc: int | None,
    cache_root: Path | None,
) -> tuple[list[Example], bool]:
    """(examples, all read from the cache) of the parts, in order; counts go to `counter`."""
    datasets = import_datasets("tokenizing with num_proc or streaming")
    examples: list[Example] = []
    cached = True
    for part in parts:
        if part.key is None:  # streamed
            cached = False
            for index, row in enumerate(part.dataset):
                value = row["text"] if part.lines else row
                if part.lines and not value.strip():
                    continue
                result = tokenize_row(tok, value, part.locate(index), options)
                counter.count(result)
                examples += [_example(t, lab) for t, lab in result.examples]
            continue
        parts_of_key = [part.key, tokenizer_fingerprint(tok), options.key(), str(CACHE_VERSION)]
        fingerprint = hashlib.sha256("/".join([*parts_of_key, str(part.lines)]).encode())
        fingerprint = fingerprint.hexdigest()[:16]
        cache_file = None
        if cache_root is not None:
            cache_root.mkdir(parents=True, exist_ok=True)
            cache_file = cache_root / f"{part.name}-{fingerprint}.arrow"
            hit = cache_file.exists() or any(cache_root.glob(f"{cache_file.stem}_*_of_*.arrow"))
            cached = cached and hit
        else:
            cached = False
        mapped = part.dataset.map(
            _map_rows, batched=True, batch_size=64, with_indices=True, num_proc=num_proc,
            remove_columns=part.dataset.column_names, features=_features(datasets),
            fn_kwargs=dict(tok=tok, options=options, lines=part.lines, locate=part.locate),
            new_fingerprint=fingerprint, cache_file_name=str(cache_file) if cache_file else None,
            load_from_cache_file=cache_file is not None, keep_in_memory=cache_file is None,
            desc=f"tokenizing {part.name}",
        )  # fmt: skip
        examples += _collect(mapped, counter)
    return examples, cached


def _collect(mapped, counter: RowCounter) -> list[Example]:
    import pyarrow.compute as pc

    table = mapped.data.table if hasattr(mapped.data, "table") else mapped.data
    blank = table.column("blank")
    counter.add(
        rows=len(table) - int(pc.sum(blank).as_py() or 0),
        **{n: int(pc.sum(table.column(n)).as_py() or 0)
           for n in ("truncated", "tokens_cut", "dropped", "blocks")},
    )  # fmt: skip
    errors = table.column("error")
    bad = pc.indices_nonzero(pc.not_equal(errors, "")).to_pylist()
    for index in bad:
        counter.bad(errors[index].as_py())
    return list(_examples(table))


def _examples(table) -> Iterator[Example]:
    import pyarrow.compute as pc

    for batch in table.to_batches():  # the columns of a record batch are aligned
        tokens, labels = batch.column("tokens").flatten(), batch.column("labels").flatten()
        lengths = pc.list_value_length(tokens).to_pylist()  # tokens: one list per example
        flat_tokens = torch.from_numpy(tokens.flatten().to_numpy(zero_copy_only=False).copy())
        flat_labels = torch.from_numpy(labels.flatten().to_numpy(zero_copy_only=False).copy())
        yield from (
            Example(t, lab)
            for t, lab in zip(flat_tokens.split(lengths), flat_labels.split(lengths), strict=True)
        )


def _example(tokens: list[int], labels: list[int]) -> Example:
    return Example(torch.tensor(tokens, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32))
