"""Files written whole or not at all, and JSON read with errors that name the file.

Every file fnlm writes (adapters, tokenizers, exports, GGUF conversions, checkpoints, data caches)
goes through here, so a crash or a full disk leaves either the old content or the new one under
the name, never half of it:

    files.write_text(path, text)                   # write beside, fsync, rename over path
    files.write_json(path, {"a": 1})               # the same, as indented JSON
    files.write_atomic(path, lambda tmp: save_file(tensors, tmp))   # any writer of a path
    with files.atomic_directory(out_dir) as work:  # a whole directory, swapped in at the end
        files.write_json(work / "config.json", config)
    config = files.read_json(path, error=ConfigError, expect=dict)

The temporary names start with "." and the target's name, in the target's directory (a rename
is only atomic within one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fnlm.errors import FnlmError

__all__ = ["atomic_directory", "read_json", "write_atomic", "write_json", "write_text"]


def write_atomic(
    path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = True
) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, fsync it, then rename it over `path`.

    `write` creates the file at the path it is given (torch.save, safetensors' save_file ...).
    On any exception the temporary file is removed and `path` is left as it was; the exception
    propagates unchanged. fsync=False skips the flushes (files inside `atomic_directory`, which
    flushes the whole tree once). Returns `path` as a Path.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_directory(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def write_json(
    path: str | os.PathLike,
    value: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    fsync: bool = True,
) -> Path:
    """Write `value` as JSON (UTF-8, non-ASCII kept, a final newline) to `path` atomically."""
    text = json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    return write_text(path, text, fsync=fsync)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name beside `path`; on leaving the block, fsync every
    file in it and swap it in for `path` (an existing `path` is moved aside, then removed).

    On an exception inside the block the temporary directory is removed, `path` is untouched and
    the exception propagates. Parents of `path` are created. Yields the temporary directory.

    >>> with atomic_directory(run_dir / "checkpoint-3") as work:
    ...     torch.save(state, work / "state.pt")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield work
        for file in work.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        _swap_directory(work, path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _fsync_directory(path.parent)


def _swap_directory(work: Path, path: Path) -> None:
    """Rename `work` to `path`. A rename cannot replace a non-empty directory: an existing `path`
    is first renamed aside (into a fresh temporary directory, removed afterwards). If another
    process puts something at `path` between the two renames, the swap is tried again: the last
    writer wins, as with files."""
    for attempt in range(3):
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another process
                os.replace(path, old / path.name)
        try:
            os.replace(work, path)
            return
        except OSError:
            if attempt == 2 or not path.exists():
                raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_directory(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX; directories cannot be opened on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(
    path: str | os.PathLike,
    *,
    error: type[FnlmError] = FnlmError,
    expect: type | None = None,
) -> Any:
    """The parsed JSON of `path`; any failure raises `error` (an FnlmError class) naming the file.

    Messages: "<path> does not exist", "<path> could not be read: ..." (permissions, not UTF-8),
    "<path> is not valid JSON: <what> at line L column C" (with a hint when the file is a Git LFS
    pointer), and with `expect` (e.g. dict) "<path> must hold a JSON object, got list".
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path} could not be read: {e}") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        hint = (
            " (it looks like a Git LFS pointer: fetch the real file)"
            if text.startswith("version https://git-lfs")
            else ""
        )
        raise error(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{hint}"
        ) from e
    if expect is not None and not isinstance(value, expect):
        what = _JSON_NAMES.get(expect, f"a {expect.__name__}")
        raise error(f"{path} must hold {what}, got {type(value).__name__}")
    return value


_JSON_NAMES = {dict: "a JSON object", list: "a JSON array", str: "a JSON string"}
