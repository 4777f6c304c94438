"""What a run tells its user: the metrics file, peak memory, out-of-memory errors that say what to
change, the data report, and the Ctrl-C flag that turns an interrupt into a checkpoint."""

from __future__ import annotations

import json
import resource
import signal
import sys
import threading
from pathlib import Path

import torch

from fnlm.errors import DeviceMemoryError
from fnlm.train import distributed, trackers


class StopFlag:
    """Ctrl-C during training asks for a checkpoint at the end of the current step; a second
    Ctrl-C interrupts at once. Only installed from the main thread."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nfnlm.train: Ctrl-C: finishing this step, then saving a checkpoint; "
            "Ctrl-C again aborts without saving",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory (CUDA) or the process's peak resident memory (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def out_of_memory(e: Exception, what: str, device: torch.device) -> DeviceMemoryError:
    """The DeviceMemoryError for an OOM during `what`, with the peak and what to change."""
    detail = str(e).split("\n")[0]
    total = (
        torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cuda"
        else 0
    )
    peak = peak_memory_gib(device)
    return DeviceMemoryError(
        f"out of memory {what} (peak {peak:.2f} GiB allocated of {total:.1f} GiB): {detail}. "
        "Lower batch_size or max_seq_length, use mode='qlora', checkpointing='offload' or mlp_chunk"
    )


def log(path: Path, entry: dict) -> None:
    """Append one JSON line to the metrics file, and send it to the run's trackers (report_to)."""
    if not distributed.is_main():  # several processes: rank 0 logs the global step's metrics
        return
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    trackers.publish(path, entry)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop what an interrupted run logged after its checkpoint, and a line torn by a
    crash while it was written (it is not valid JSON)."""
    if not path.exists():
        return
    kept, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            entry, torn = None, torn + 1
        if isinstance(entry, dict) and isinstance(entry.get("step"), int | float):
            if entry["step"] <= step:
                kept.append(line)
    if torn:
        print(f"fnlm.train: {path}: dropped {torn} torn line(s) (not valid JSON)")
    path.write_text("".join(line + "\n" for line in kept))


def report_data(data, eval_data) -> None:
    """One line on the training data: examples, tokens, truncations, drops, held-out examples."""
    s = data.stats
    text = (
        f"fnlm.train: {len(data)} training examples, {sum(len(e) for e in data.examples):,} tokens"
    )
    if s.get("truncated"):
        text += f"; {s['truncated']} example(s) truncated ({s['tokens_cut']:,} tokens cut)"
    if s.get("dropped"):
        text += f"; {s['dropped']} row(s) without a token to learn dropped"
    if s.get("blocks"):
        text += f"; long texts split into {s['blocks']} blocks"
    if s.get("skipped"):
        text += f"; {s['skipped']} bad row(s) skipped (on_bad_row='skip')"
    if eval_data is not None:
        text += f"; {len(eval_data)} held-out examples"
    print(text)
