"""The training step's forward + backward replayed as a CUDA graph.

A LoRA step launches thousands of small kernels (every adapted linear is a dequantize, a base
matmul and two thin adapter matmuls, three times per step with recomputation); from Python the
GPU waits on the host most of the step (measured on the H200: busy 15% of a Llama-3.2-1B QLoRA
step). Captured once per batch shape, the whole forward + backward is one graph launch.

How it stays equal to the eager step:
- the batch is copied into static input buffers before each replay, and the step's token count
  into a static divisor, so the graph computes `loss(batch) / tokens` and its backward as eager;
- gradients accumulate in place into `.grad` tensors that exist before the capture (the graph's
  backward adds into them), so the optimizer zeroes them in place (`set_to_none=False`);
- a batch shape is captured after `warmup` eager runs of it (torch.compile and autotuning happen
  there, never inside a capture); capture failures (a host sync in some model path) are reported
  once and the step stays eager.
- a loss function may return `(loss, stats)`, stats a dict of 0-d tensors (the preference and
  RL methods' logged values): they are captured as one static vector beside the loss, so a step
  reads them after the replay, with no host sync inside the loss.
Token and label ids must lie inside the vocabulary (the captured step cannot check them): the
trainer checks them on the host (SFT's `Stream` and DPO / ORPO's `PairStream` as they collate,
GRPO's prompts in `generate_tokens`) and makes StepGraphs with vocab_size=None; given a
vocab_size, StepGraphs checks each micro-batch before its replay, on one device read.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fnlm.errors import ArgumentError


@dataclass
class _Captured:
    inputs: dict[str, torch.Tensor]  # static batch buffers
    divisor: torch.Tensor  # static fp32 scalar: the step's trained tokens
    loss: torch.Tensor  # static output: the summed loss of the captured batch
    replay: Callable[[], None]
    stats: torch.Tensor | None = None  # static output: the loss function's stats, stacked
    keys: list[str] | None = None  # their names, in order (set when the step first runs)


def cuda_capture(fn: Callable[[], torch.Tensor], pool, stream):
    """Capture fn() into a CUDA graph: (replay, the output tensor, the graph's memory pool)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = fn()
    return graph.replay, out, graph.pool()


def signature(batch: dict) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))


class StepGraphs:
    """Forward + backward of micro-batches through CUDA graphs, one per batch signature.

    tensors: the trainable tensors (their gradients are the graph's outputs).
    vocab_size: token and label ids are checked against it before each replay (one device read);
    None: the caller checked them on the host (fnlm.train.Stream does, at collation).
    warmup: eager runs of a signature before it is captured; max_graphs: signatures captured
    (others run eagerly); capture: the capturing function (tests pass one that replays by
    calling `fn` again, to check the bookkeeping on a CPU).
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        vocab_size: int | None,
        warmup: int = 2,
        max_graphs: int = 4,
        capture=cuda_capture,
    ):
        self.tensors, self.vocab_size = list(tensors), vocab_size
        self.warmup, self.max_graphs, self.capture = warmup, max_graphs, capture
        self.captured: dict[tuple, _Captured] = {}
        self.seen: Counter = Counter()
        self.pool = None
        self.failed: str | None = None
        device = self.tensors[0].device if self.tensors else torch.device("cpu")
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def backward(self, loss_fn: Callable[[dict], torch.Tensor], batch: dict, divisor: int):
        """Run `(loss_fn(batch) / divisor).backward()` (gradients accumulate into `.grad`);
        returns the summed loss, detached, or (loss, stats) when loss_fn returns (loss, stats)."""
        key = signature(batch)
        captured = self.captured.get(key)
        if captured is None:
            self.seen[key] += 1
            if (
                self.failed is None
                and self.seen[key] > self.warmup
                and len(self.captured) < self.max_graphs
            ):
                captured = self._capture(loss_fn, batch, key)
            if captured is None:
                return self._on_stream(lambda: eager_backward(loss_fn, batch, divisor))
        if self.vocab_size is not None:
            check_ids(batch, self.vocab_size)
        for name, value in batch.items():
            captured.inputs[name].copy_(value, non_blocking=True)
        captured.divisor.fill_(float(divisor))
        self._on_stream(captured.replay)
        if captured.stats is None:
            return captured.loss.clone()
        return captured.loss.clone(), dict(zip(captured.keys, captured.stats.clone().unbind()))

    def _capture(self, loss_fn, batch: dict, key: tuple) -> _Captured | None:
        for t in self.tensors:  # the graph's backward accumulates into these, in place
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        inputs = {name: value.clone() for name, value in batch.items()}
        divisor = torch.ones((), dtype=torch.float32, device=self.tensors[0].device)
        keys: list[str] = []

        def step():
            loss, stats = _split(loss_fn(inputs))
            (loss / divisor).backward()
            if stats is None:
                return loss.detach()
            keys[:] = stats
            return loss.detach(), torch.stack([v.detach().float() for v in stats.values()])

        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        try:
            replay, out, self.pool = self.capture(step, self.pool, self.stream)
        except Exception as e:  # a host sync or an unsupported op inside the step
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(
                f"fnlm.train: the training step could not be captured as a CUDA graph "
                f"({self.failed}); it runs eagerly (slower). Set cuda_graphs=False to silence this.",
                stacklevel=3,
            )
            return None
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        loss, stats = out if isinstance(out, tuple) else (out, None)
        self.captured[key] = _Captured(inputs, divisor, loss, replay, stats, keys)
        return self.captured[key]

    def _on_stream(self, fn):
        """Run fn on the capture stream (eager warm-ups there too, as CUDA graphs want)."""
        if self.stream is None:
            return fn()
        current = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        return out


def check_ids(batch: dict, vocab_size: int) -> None:
    """Token ids in [0, vocab_size), labels -100 or in it: "labels" and any "<name>_labels"
    (ORPO's prompt labels). One read of the batch's extremes (none on host tensors)."""
    tokens = batch["tokens"]
    labels = [v for k, v in batch.items() if k == "labels" or k.endswith("_labels")]
    ends = [tokens.min(), tokens.max()]
    if labels:
        ends += [torch.stack([v.min() for v in labels]).min()]
        ends += [torch.stack([v.masked_fill(v < 0, 0).max() for v in labels]).max()]
    low, high, *label_ends = torch.stack(ends).tolist()
    if low < 0 or high >= vocab_size:
        raise ArgumentError(
            f"token ids must lie in [0, {vocab_size}) for this model; got ids from {low} to {high}"
        )
    if label_ends and (label_ends[1] >= vocab_size or label_ends[0] < -100):
        raise ArgumentError(
            f"labels must be -100 (ignored) or lie in [0, {vocab_size}); got labels "
            f"from {label_ends[0]} to {label_ends[1]}"
        )


def _split(out) -> tuple[torch.Tensor, dict | None]:
    """(loss, stats or None) of a loss function's result: a loss, or (loss, stats)."""
    return out if isinstance(out, tuple) else (out, None)


def eager_backward(loss_fn, batch: dict, divisor: int):
    """`(loss_fn(batch) / divisor).backward()`; the detached loss (or loss, stats) back."""
    loss, stats = _split(loss_fn(batch))
    (loss / divisor).backward()
    if stats is None:
        return loss.detach()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}
