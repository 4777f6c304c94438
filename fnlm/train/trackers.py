"""Experiment trackers (`TrainConfig.report_to`): TensorBoard, Weights & Biases, MLflow. Each is an
optional package, imported only when a run asks for it; every metrics line a run writes to
metrics.jsonl also goes to them, under transformers' Trainer names (train/loss,
train/learning_rate, train/grad_norm, eval/loss, ...), at the run's optimizer step.

Where they write: TensorBoard event files under <out>/runs/; W&B and MLflow where their own
settings say (WANDB_PROJECT, WANDB_MODE=offline, WANDB_DIR; MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME), as transformers' integrations do.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

from fnlm.errors import ArgumentError

# The package each tracker imports and the extra that installs it.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# metrics.jsonl key -> the name transformers' Trainer logs it under ("step" is the x axis).
NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
         "epoch": "train/epoch", "eval_loss": "eval/loss"}  # fmt: skip


def metric_name(key: str) -> str:
    return NAMES.get(key, f"train/{key}")


def numeric(entry: dict) -> dict[str, float]:
    """The loggable values of a metrics line, by tracker name (step left out)."""
    return {
        metric_name(k): float(v)
        for k, v in entry.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def require(name: str):
    """Import the tracker's package, or raise ArgumentError with the install command."""
    try:
        return importlib.import_module(PACKAGES[name])
    except ImportError:
        raise ArgumentError(
            f"report_to={name!r} needs the {PACKAGES[name]} package: "
            f"pip install 'fnlm[{EXTRAS[name]}]' (or drop it from report_to)"
        ) from None


class TensorBoard:
    """Event files under <run>/runs/ (transformers writes <output_dir>/runs/ too)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "runs" / run_name))
        self.writer.add_text(
            "train_config", "\n".join(f"    {k} = {v!r}" for k, v in config.items())
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # readable while the run goes on, and after a crash

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run (project from WANDB_PROJECT, default "fnlm"; WANDB_MODE=offline works offline)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        wandb = require("wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fnlm"), name=run_name, config=config,
            dir=os.environ.get("WANDB_DIR", str(run_dir)), reinit="create_new",
        )  # fmt: skip

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run (tracking URI from MLFLOW_TRACKING_URI, else mlflow's default ./mlruns; the
    experiment from MLFLOW_EXPERIMENT_NAME), the config as its params."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        self.mlflow = require("mlflow")
        if "MLFLOW_EXPERIMENT_NAME" in os.environ:
            self.mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
        self.run = self.mlflow.start_run(
            run_name=run_name, nested=self.mlflow.active_run() is not None
        )
        # mlflow params are strings of at most 6000 characters
        self.mlflow.log_params({k: str(v)[:6000] for k, v in config.items()})

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step, run_id=self.run.info.run_id)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKER_CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}

# Trackers of the runs in progress, by their metrics file (fnlm.train.monitor.log publishes).
_open: dict[Path, list] = {}


def start(metrics_path: Path, config) -> list:
    """Open the trackers `config.report_to` names for the run whose metrics go to metrics_path.
    Raises ArgumentError (with the install command) when a tracker's package is missing."""
    finish(metrics_path)
    if not config.report_to:
        return []
    run_dir = Path(metrics_path).parent
    run_name = config.run_name or run_dir.resolve().name
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    opened = []
    try:
        for name in config.report_to:
            opened.append(TRACKER_CLASSES[name](run_dir, run_name, options))
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    _open[Path(metrics_path)] = opened
    return opened


def publish(metrics_path: Path, entry: dict) -> None:
    """Send one metrics line to the run's trackers (none open: nothing to do)."""
    trackers = _open.get(Path(metrics_path))
    if not trackers or "step" not in entry:
        return
    values = numeric(entry)
    for tracker in trackers:
        tracker.log(int(entry["step"]), values)


def finish(metrics_path: Path) -> None:
    """Close the run's trackers (flushes their files, ends W&B / MLflow runs)."""
    for tracker in _open.pop(Path(metrics_path), []):
        tracker.close()
