"""Training checkpoints (atomic directories: trainable tensors, optimizer, scheduler, RNG, data
position, the adapter in PEFT format) and the fully fine-tuned model as a transformers checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fnlm import lora as lora_lib
from fnlm import models
from fnlm.errors import CheckpointError
from fnlm.params import Params, get_path
from fnlm.train.config import CHECKPOINT_PREFIX, TMP_PREFIX


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
    """Write checkpoints/step-NNNNNNNN/ atomically: everything goes into a temporary directory
    that is renamed into place, so a crash leaves either the whole checkpoint or none.

    Holds trainable.safetensors (the trained tensors by fnlm path name), optimizer.pt,
    scheduler.pt, rng.pt (CPU and CUDA generators), state.json (step, data position, `extra`)
    and, for LoRA runs, adapter/ in PEFT's format. keep > 0 removes all but the newest `keep`.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(TMP_PREFIX + "*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    work = Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}{final.name}-"))
    try:
        save_file(
            {name: t.detach().contiguous().cpu() for name, t in named},
            work / "trainable.safetensors",
        )
        torch.save(optimizer.state_dict(), work / "optimizer.pt")
        torch.save(scheduler.state_dict(), work / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, work / "rng.pt")
        state = {"step": step, "position": position, **(extra or {})}
        (work / "state.json").write_text(json.dumps(state, indent=2))
        if lora is not None:
            lora_lib.save(work / "adapter", lora, params=params)
        _fsync_tree(work)
        if final.exists():  # the same step saved again (e.g. interrupted right after a save)
            old = root / f"{TMP_PREFIX}old-{final.name}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


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
    optimizer.load_state_dict(
        torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())


def save_full_model(directory: str | os.PathLike, params: Params, tokenizer=None) -> Path:
    """A fully fine-tuned model as a transformers checkpoint (config.json + model.safetensors
    under the checkpoint's own tensor names, + the tokenizer), loadable by fnlm.load and
    transformers alike. Written to a temporary directory and renamed into place."""
    directory = Path(directory)
    names = models.family(params.config.model_type).weight_names(params.config)
    tensors = {
        hf: get_path(params, path).detach().contiguous().cpu() for hf, (path, _) in names.items()
    }
    config = params.config.hf_dict()
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f"{TMP_PREFIX}{directory.name}-"))
    try:
        save_file(tensors, work / "model.safetensors", metadata={"format": "pt"})
        (work / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save(work)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(work, directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return directory
