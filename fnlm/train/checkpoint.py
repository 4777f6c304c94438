"""Training checkpoints (atomic directories: trainable tensors, optimizer, scheduler, RNG, data
position, the adapter in PEFT format) and the fully fine-tuned model as a transformers checkpoint."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fnlm import files
from fnlm import lora as lora_lib
from fnlm.errors import CheckpointError
from fnlm.params import Params
from fnlm.train.config import (
    CHECKPOINT_PREFIX,
    LEGACY_CHECKPOINT_DIR,
    LEGACY_CHECKPOINT_PREFIX,
    TMP_PREFIX,
)

# Checkpoints that may hold the update a run diverged on (see run.stop_diverged).
DIVERGED_PREFIX = "diverged-"


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    named: Sequence[tuple[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    position: dict,
    extra: dict | None = None,
    lora=None,
    params: Params | None = None,
    keep: int = 0,
) -> Path:
    """Write <run_dir>/checkpoint-<step>/ atomically: everything goes into a temporary directory
    that is renamed into place, so a crash leaves either the whole checkpoint or none.

    Holds trainable.safetensors (the trained tensors by fnlm path name), optimizer.pt,
    scheduler.pt, rng.pt (CPU and CUDA generators), state.json (step, data position, `extra`)
    and, for LoRA runs, the adapter in PEFT's format (adapter_config.json,
    adapter_model.safetensors: `PeftModel.from_pretrained(model, checkpoint)` loads it). keep > 0 removes all but the newest `keep`.
    A failed write (disk full, no permission) raises CheckpointError naming the checkpoint; the
    earlier checkpoints are left as they were.
    """
    root = Path(run_dir)
    final = checkpoint_path(run_dir, step)
    try:
        _write_checkpoint(
            root, final, step, named, optimizer, scheduler, position, extra, lora, params
        )
    except OSError as e:
        raise CheckpointError(
            f"could not write checkpoint {final}: {_why(e)}; the earlier checkpoints "
            f"{[p.name for p in list_checkpoints(run_dir)]} are intact"
        ) from e
    if keep > 0:
        prune_checkpoints(run_dir, keep)
    return final


def _why(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "the disk is full (no space left on device); free some space and resume"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (or a read-only file system)"
    return f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints of a run (keep <= 0: remove none)."""
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def set_aside_checkpoints(run_dir: str | os.PathLike, *, after: int) -> list[Path]:
    """Rename the checkpoints of steps > `after` to diverged-<name> (diverged-checkpoint-N): kept
    for a look, but no longer resumed from or pruned (`list_checkpoints` does not see them).
    Returns the new paths."""
    moved = []
    for path in list_checkpoints(run_dir):
        if checkpoint_step(path) > after:
            target = path.with_name(DIVERGED_PREFIX + path.name)
            if target.exists():  # from an earlier divergence at the same step
                shutil.rmtree(target)
            os.replace(path, target)
            moved.append(target)
    return moved


def _write_checkpoint(
    root, final, step, named, optimizer, scheduler, position, extra, lora, params
):
    root.mkdir(parents=True, exist_ok=True)
    stale_patterns = (f"{TMP_PREFIX}{CHECKPOINT_PREFIX}*", f"{TMP_PREFIX}old-*",
                      f".{CHECKPOINT_PREFIX}*.tmp")  # fmt: skip
    for pattern in stale_patterns:
        for stale in root.glob(pattern):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    # built beside `final`, fsynced and swapped in whole (replacing the same step saved again)
    with files.atomic_directory(final) as work:
        save_file(
            {name: t.detach().contiguous().cpu() for name, t in named},
            work / "trainable.safetensors",
        )
        torch.save(optimizer.state_dict(), work / "optimizer.pt")
        write_run_state(work, step, scheduler, position, extra)
        if lora is not None:
            lora_lib.save(work, lora, params=params)


def write_run_state(work: Path, step: int, scheduler, position: dict, extra: dict | None) -> None:
    """A checkpoint's scheduler.pt, rng.pt (CPU and CUDA generators) and state.json (step, data
    position, `extra`); `read_run_state` restores them."""
    torch.save(scheduler.state_dict(), work / "scheduler.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, work / "rng.pt")
    state = {"step": step, "position": position, **(extra or {})}
    (work / "state.json").write_text(json.dumps(state, indent=2))


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` goes: <run_dir>/checkpoint-<step> (transformers' name)."""
    return Path(run_dir) / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a checkpoint directory (checkpoint-N, or an earlier fnlm's step-NNNNNNNN)."""
    name = Path(path).name
    for prefix in (CHECKPOINT_PREFIX, LEGACY_CHECKPOINT_PREFIX):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return int(name[len(prefix) :])
    return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first: checkpoint-N/ and, from runs of earlier
    fnlm versions, checkpoints/step-NNNNNNNN/."""
    run_dir = Path(run_dir)
    found = list(run_dir.glob(CHECKPOINT_PREFIX + "*"))
    found += list((run_dir / LEGACY_CHECKPOINT_DIR).glob(LEGACY_CHECKPOINT_PREFIX + "*"))
    found = [p for p in found if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def load_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    named: Sequence[tuple[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
) -> dict:
    """Restore a `save_checkpoint` directory into live tensors, optimizer, scheduler and RNG.

    Returns its state.json. Raises CheckpointError naming the file when something is missing or
    does not match the run (different trainable tensors or shapes).
    """
    path = Path(checkpoint)
    if (path / "sharded").is_dir():
        raise CheckpointError(
            f"checkpoint {path} was written by a distributed='fsdp' run (its state is sharded); "
            "resume it with distributed='fsdp' (on any number of processes)"
        )
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        if not (path / name).is_file():
            raise CheckpointError(
                f"checkpoint {path} has no {name}; it is not an fnlm training checkpoint"
            )
    saved = load_file(path / "trainable.safetensors")
    names = [n for n, _ in named]
    if set(saved) != set(names):
        missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        raise CheckpointError(
            f"checkpoint {path} trains other tensors than this run (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); resume with the same mode, targets and model"
        )
    with torch.no_grad():
        for name, tensor in named:
            if tuple(saved[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, the run has "
                    f"{tuple(tensor.shape)}"
                )
            tensor.copy_(saved[name])
    device = named[0][1].device
    optimizer.load_state_dict(load_tensors_file(path / "optimizer.pt", map_location=device))
    return read_run_state(path, scheduler)


def read_run_state(path: Path, scheduler) -> dict:
    """Restore `write_run_state`'s scheduler and RNG states; returns its state.json."""
    for name in ("scheduler.pt", "rng.pt", "state.json"):
        if not (path / name).is_file():
            raise CheckpointError(
                f"checkpoint {path} has no {name}; it is not an fnlm training checkpoint"
            )
    state = files.read_json(path / "state.json", error=CheckpointError, expect=dict)
    scheduler.load_state_dict(load_tensors_file(path / "scheduler.pt"))
    rng = load_tensors_file(path / "rng.pt")
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
        raise CheckpointError(f"{path / 'rng.pt'} holds no CPU generator state ('cpu' tensor)")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def load_tensors_file(path: Path, map_location=None):
    """torch.load of a checkpoint's .pt file with weights_only=True: tensors, numbers, strings
    and containers only, never code. Anything else (a pickled object, a corrupt file) raises
    CheckpointError naming the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        detail = f"it refers to {found.group(1)}" if found else "unsupported content"
        raise CheckpointError(
            f"{path} holds more than tensors and plain values ({detail[:200]}); fnlm never "
            "unpickles objects from a checkpoint. Was the file written by fnlm? If not, remove "
            "that checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated: {e}") from None


def save_full_model(directory: str | os.PathLike, params: Params, tokenizer=None) -> Path:
    """A fully fine-tuned model written as `fnlm.save(format="merged")` writes it: config.json,
    model.safetensors (sharded past 5GB, with its index), generation_config.json, the tokenizer
    and chat template, loadable by fnlm.load and transformers alike. Files already in
    `directory` (a run's metrics, checkpoints) are kept; each written file is atomic."""
    from fnlm.export import save

    return save(directory, params, tokenizer, format="merged", overwrite=True)
