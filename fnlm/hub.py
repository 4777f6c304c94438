"""Resolve a model name to a local checkpoint directory: local dir, .gguf file, hub id, or default."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from fnlm.errors import CheckpointError, ModelNotFoundError, OfflineError
from fnlm.files import read_json

# Only what fnlm reads: weights, configs, tokenizer and chat template — never pytorch_model.bin etc.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "adapter_config.json",  # a LoRA adapter repository (its weights are *.safetensors)
]


def resolve(
    name_or_path: str | os.PathLike | None,
    *,
    revision: str | None = None,
    token: str | None = None,
    weights: bool = True,
) -> Path:
    """A local directory holding config.json + safetensors (+ tokenizer) for `name_or_path`.

    None or EMBEDDED_ID -> the embedded default model; an existing directory (a checkpoint, or a
    LoRA adapter: adapter_config.json without config.json) -> itself; a `.gguf` file -> its
    converted cache directory; anything else -> a Hugging Face hub id, downloaded (only the files in
    HUB_FILES) into the normal hub cache honouring `revision`, `token` and HF_HUB_OFFLINE;
    `weights=False` fetches a hub repo's configs and tokenizer only (what `fnlm info` reads).
    Raises ModelNotFoundError or OfflineError with what to do.
    """
    from fnlm.default import EMBEDDED_ID

    if name_or_path is None or name_or_path == EMBEDDED_ID:
        from fnlm.default import default_checkpoint

        return default_checkpoint()
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if path.is_file():
            return _gguf_checkpoint(path)
        if text.count("/") == 2 and not text.startswith((".", "/", "~")):  # "org/name/file.gguf"
            repo_id, filename = text.rsplit("/", 1)
            return _gguf_checkpoint(_download_file(repo_id, filename, revision, token))
        raise ModelNotFoundError(
            f"GGUF file not found: {path} (a hub GGUF is named 'org/name/file.gguf')"
        )
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a directory but holds no config.json; expected a transformers checkpoint"
            )
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"{path} is a file; expected a checkpoint directory, a .gguf file or a hub id"
        )
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", ""):
        raise ModelNotFoundError(f"path not found: {path}")
    try:
        return _download(text, revision=revision, token=token, weights=weights)
    except (ModelNotFoundError, OfflineError) as e:
        if "/" not in text:
            raise
        # "org/name" is also a relative path: say that no such directory exists before the hub
        raise type(e)(f"no directory {path.resolve()} exists, and as a hub id: {e}") from None


def _gguf_checkpoint(path: Path) -> Path:
    """The converted cache directory of a GGUF file; a damaged cache (a crash or a full disk
    left it half written, or it was edited) is converted again."""
    from fnlm.gguf import cached_checkpoint

    directory = cached_checkpoint(path)
    problem = _damaged(directory)
    if problem is None:
        return directory
    print(
        f"fnlm: the converted cache {directory} of {path} is damaged ({problem}); converting again"
    )
    shutil.rmtree(directory, ignore_errors=True)
    directory = cached_checkpoint(path)
    problem = _damaged(directory)
    if problem is not None:
        raise CheckpointError(
            f"the converted cache {directory} of {path} is damaged ({problem}) even after "
            "converting again; delete that directory and check the disk"
        )
    return directory


def _damaged(directory: Path) -> str | None:
    """What is wrong with a converted checkpoint directory, or None: config.json must parse and
    every safetensors file's header must cover the file (reads headers only)."""
    from safetensors import SafetensorError, safe_open

    try:
        json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"config.json: {e}"
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as e:
            return f"{file.name}: {e}"
    return None


def _download(repo_id: str, *, revision: str | None, token: str | None, weights: bool) -> Path:
    """The repo's configs and tokenizer first, then (with `weights`) only the weight files its
    safetensors index lists (repos such as Mistral's also hold consolidated.safetensors, the same
    weights again); without an index, every *.safetensors (one model file, or an adapter's)."""
    import huggingface_hub as hf

    small = [pattern for pattern in HUB_FILES if pattern != "*.safetensors"]
    with _hub_errors(repo_id, revision):
        local = Path(
            hf.snapshot_download(repo_id, revision=revision, token=token, allow_patterns=small)
        )
        if not weights:
            return local
        index = local / "model.safetensors.index.json"
        weights = ["*.safetensors"]
        if index.is_file():
            weight_map = read_json(index, error=CheckpointError).get("weight_map", {})
            weights = sorted(set(weight_map.values())) or weights
        return Path(
            hf.snapshot_download(
                repo_id, revision=revision, token=token, allow_patterns=small + weights
            )
        )


def _download_file(repo_id: str, filename: str, revision: str | None, token: str | None) -> Path:
    """One file of a hub repo (a GGUF), through the hub cache."""
    import huggingface_hub as hf

    with _hub_errors(repo_id, revision, filename):
        return Path(hf.hf_hub_download(repo_id, filename, revision=revision, token=token))


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, filename: str | None = None):
    """huggingface_hub's errors as fnlm's, each saying what to do."""
    from huggingface_hub import errors

    try:
        yield
    except errors.HFValidationError:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local path and not a valid hub id (expected 'org/name')"
        ) from None
    except errors.GatedRepoError as e:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its licence on the hub and pass token=... ({e})"
        ) from None
    except errors.RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}") from None
    except errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither a local path nor a hub repository (private repos need token=...)"
        ) from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise OfflineError(
            f"{repo_id}: {why} and it is not in the local hub cache; connect once, or pass a local directory ({e})"
        ) from None
    except errors.EntryNotFoundError:  # after LocalEntryNotFoundError, its subclass
        raise ModelNotFoundError(f"{repo_id} has no file {filename!r}") from None
    except (OSError, errors.HfHubHTTPError) as e:
        raise OfflineError(
            f"{repo_id}: the hub cannot be reached ({type(e).__name__}: {e})"
        ) from None
