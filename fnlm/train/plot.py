"""The loss-curve PNG, drawn with matplotlib when it is installed (the `plot` extra)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path


def read_losses(metrics: str | os.PathLike) -> tuple[list, list]:
    """([(step, loss)], [(step, eval_loss)]) of a metrics.jsonl, finite values only."""
    train, evals = [], []
    for line in Path(metrics).read_text().splitlines():
        entry = json.loads(line)
        if "eval_loss" in entry and math.isfinite(entry["eval_loss"]):
            evals.append((entry["step"], entry["eval_loss"]))
        elif "loss" in entry and math.isfinite(entry["loss"]):
            train.append((entry["step"], entry["loss"]))
    return train, evals


def plot_losses(metrics: str | os.PathLike, png: str | os.PathLike) -> Path | None:
    """Draw the training loss (and eval loss) of a metrics.jsonl as a PNG.

    Returns the PNG path, or None when there is nothing to draw yet or matplotlib is not
    installed (`pip install 'fnlm[plot]'`; the numbers are in metrics.jsonl either way, and in
    the trackers of `report_to`).
    """
    train, evals = read_losses(metrics)
    if not (train or evals) or importlib.util.find_spec("matplotlib") is None:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    figure = Figure(figsize=(6.4, 4.0), dpi=100, layout="tight")
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange", linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    png = Path(png)
    work = png.with_name(f".{png.name}.tmp")
    figure.savefig(work, format="png")
    os.replace(work, png)  # a reader never sees half a file
    return png
