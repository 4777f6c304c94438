"""The trainer keeps the host off the GPU's critical path without changing a result: the next
step's batches are collated while the current step runs (`Stream.prefetch`, train_step's
while_waiting), token counts come from the host, and a step reads the device once (loss and
gradient norm together). CPU, fp32, tiny models: what is checked is the order of the work and the
number of reads, which a GPU would only make faster."""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager

import pytest
import torch
from models import saved_checkpoint
from test_train import load_fp32, random_data, run_config, tiny_config

from fnlm import data as data_lib
from fnlm import train as train_lib
from fnlm.errors import ArgumentError
from fnlm.train import run as run_lib
from fnlm.train import setup as setup_lib
from fnlm.train.stream import Stream, real_tokens

# Every way Python code reads a tensor's value onto the host (on a GPU each is a sync).
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
# Reads that are not the loop's: the optimizer's (torch.optim reads its step counter, a host
# tensor unless the optimizer is fused, as it is on a GPU) and the model's checks of its token
# and label ids (the eager forward's; inside a CUDA graph they are skipped and
# fnlm.train.graphs checks the ids before each replay instead).
NOT_THE_LOOPS = ("torch.optim", "fnlm.models.decoder", "fnlm.kernels.cross_entropy")


@contextmanager
def counting_reads(events: list):
    """Record every tensor read as ("read", caller module) in `events`, except NOT_THE_LOOPS's
    and the stream's collation (host data, before the copy to the device)."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    collating = [0]

    def wrap(original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not collating[0] and not caller.startswith(NOT_THE_LOOPS):
                events.append(("read", caller))
            return original(self, *args, **kwargs)

        return read

    collate = Stream.collate_step

    def collate_step(self, position, count):
        collating[0] += 1
        try:
            return collate(self, position, count)
        finally:
            collating[0] -= 1

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(original))
        Stream.collate_step = collate_step
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        Stream.collate_step = collate


def reads_per_step(monkeypatch, config, params, data) -> list[int]:
    """train(config): the device reads of each step (inside `advance`: the step and its metrics)."""
    events: list = []
    advance = run_lib.advance

    def counted_advance(*args, **kwargs):
        events.append(("step",))
        return advance(*args, **kwargs)

    monkeypatch.setattr(run_lib, "advance", counted_advance)
    with counting_reads(events):
        result = train_lib.train(config, params=params, data=data)
    monkeypatch.setattr(run_lib, "advance", advance)
    assert result.status == "completed"
    per_step, seen = [], []
    for event in events:
        if event == ("step",):
            per_step.append(0)
            seen.append([])
        elif per_step:
            per_step[-1] += 1
            seen[-1].append(event[1])
    return per_step, seen


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_step_reads_the_device_once(tmp_path, monkeypatch, grad_accum):
    """Plain SFT: one read a step, train_step's loss + gradient norm (before: the trained and
    real token counts of each micro-batch, the loss, and the gradient norm: 4 or 6)."""
    data = random_data(n=24, seed=3)
    config = run_config(tmp_path / "run", max_steps=5, grad_accum=grad_accum, packing=True)
    with saved_checkpoint(tiny_config()) as (_, directory):
        per_step, callers = reads_per_step(monkeypatch, config, load_fp32(directory), data)
    assert per_step == [1] * 5, callers
    assert all(c == ["fnlm.train.step"] for c in callers)


class RecordingStream(Stream):
    """A Stream that records its collations (by position) in a shared event list."""

    events: list = []

    def collate_step(self, position, count):
        self.events.append(("collate", position["epoch"], position["index"]))
        return super().collate_step(position, count)


def test_the_next_steps_batches_are_built_before_this_steps_loss_is_read(tmp_path, monkeypatch):
    """grad_accum 2 over two epochs: each step's two forward+backward calls are launched, then the
    next step's batches collated, then the loss read; the last step collates nothing after it."""
    events: list = []
    monkeypatch.setattr(RecordingStream, "events", events)
    monkeypatch.setattr(setup_lib, "Stream", RecordingStream)
    loss = setup_lib.Run.loss

    def recorded_loss(self, batch, training=True):
        events.append(("loss",))
        return loss(self, batch, training)

    monkeypatch.setattr(setup_lib.Run, "loss", recorded_loss)
    data = random_data(n=12, seed=4)  # 6 micro-batches an epoch: 3 steps
    config = run_config(tmp_path / "run", max_steps=5, grad_accum=2, batch_size=2)
    with saved_checkpoint(tiny_config()) as (_, directory):
        with counting_reads(events):
            train_lib.train(config, params=load_fp32(directory), data=data)
    order = [e for e in events if e[0] != "read" or e[1] == "fnlm.train.step"]
    order = [e[0] if e[0] != "collate" else e for e in order]
    positions = [("collate", 0, 0), ("collate", 0, 2), ("collate", 0, 4), ("collate", 0, 6),
                 ("collate", 1, 2)]  # fmt: skip
    expected = [positions[0]]
    for step in range(5):
        expected += ["loss", "loss"]
        if step + 1 < 5:
            expected.append(positions[step + 1])
        expected.append("read")
    assert order == expected


def test_prefetching_changes_no_loss_and_no_adapter(tmp_path):
    """train() (prefetching, host counts) against the same run stepped by hand the way the loop did
    before: batches taken when each step starts, counts read from the device batches, no
    while_waiting. Two epochs, grad_accum 2, a checkpoint and an evaluation in between: the losses
    and the trained adapters are equal bit for bit."""
    data = random_data(n=14, seed=7)
    common = dict(max_steps=9, grad_accum=2, batch_size=2, packing=True, save_every=4,
                  eval_fraction=0.15, eval_every=3)  # fmt: skip
    with saved_checkpoint(tiny_config()) as (_, directory):
        params = load_fp32(directory)
        result = train_lib.train(run_config(tmp_path / "loop", **common), params=params, data=data)
        run = train_lib.start(run_config(tmp_path / "hand", **common), params=params, data=data)
        losses = []
        for _ in range(run.total_steps):
            batches, run.position = run.stream.take(run.position, run.config.grad_accum)
            step = train_lib.train_step(
                run.loss, batches, run.optimizer, run.scheduler, run.trainable.tensors,
                max_grad_norm=run.config.max_grad_norm, count=data_lib.trained_tokens,
                real=real_tokens,
            )  # fmt: skip
            losses.append(step["loss"])
    assert result.losses == losses
    ours, theirs = run_lib.lora_lib.parameters(result.lora), run_lib.lora_lib.parameters(run.lora)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_prefetched_step_equals_a_taken_one(world_size):
    """Stream.prefetch then step_at hands the same batches, counts and next position as a fresh
    take, for every rank, across epoch ends (5 micro-batches an epoch, 2 x world a step)."""
    data = random_data(n=10, seed=2)
    config = train_lib.TrainConfig(out="unused", batch_size=2, grad_accum=2, max_seq_length=64,
                                   packing=False, progress=False)  # fmt: skip
    for rank in range(world_size):
        ahead = Stream(data, config, 0, torch.device("cpu"), rank=rank, world_size=world_size)
        fresh = Stream(data, config, 0, torch.device("cpu"), rank=rank, world_size=world_size)
        position = {"epoch": 0, "index": 0}
        ahead.prefetch(position, 2)
        for _ in range(7):
            step = ahead.step_at(position, 2)
            ahead.prefetch(step.position, 2)
            batches, following = fresh.take(position, 2)
            assert step.position == following
            assert step.trained == [data_lib.trained_tokens(b) for b in batches]
            assert step.real == [real_tokens(b) for b in batches]
            for ours, theirs in zip(step.batches, batches, strict=True):
                assert ours.keys() == theirs.keys()
                assert all(torch.equal(ours[k], theirs[k]) for k in ours)
            position = following
        assert position["epoch"] >= 2  # the steps crossed two epoch ends


def test_a_prefetch_for_another_position_is_not_used():
    data = random_data(n=10, seed=2)
    config = train_lib.TrainConfig(out="unused", batch_size=2, grad_accum=1, max_seq_length=64,
                                   packing=False, progress=False)  # fmt: skip
    stream = Stream(data, config, 0, torch.device("cpu"))
    stream.prefetch({"epoch": 0, "index": 3}, 1)
    step = stream.step_at({"epoch": 0, "index": 1}, 1)
    assert step.position == {"epoch": 0, "index": 2} and stream.ready is None
    batches, _ = stream.take({"epoch": 0, "index": 1}, 1)
    assert torch.equal(step.batches[0]["tokens"], batches[0]["tokens"])


@pytest.mark.parametrize("packing", [True, False])
def test_the_stream_checks_ids_on_the_host_as_it_collates(packing):
    """What StepGraphs checked on the device before each replay: an id outside the vocabulary
    stops the run at collation, naming the data and the micro-batch's examples."""
    data = random_data(n=6, seed=4)
    data.examples[5].tokens[2] = 500  # outside the 96-token vocabulary
    config = train_lib.TrainConfig(out="unused", batch_size=2, grad_accum=1, max_seq_length=64,
                                   packing=packing, progress=False)  # fmt: skip
    stream = Stream(data, config, 0, torch.device("cpu"), vocab_size=96)
    positions = range(len(stream.plan(0)))
    failing = [i for i in positions if 5 in _examples(stream.plan(0)[i])]
    for index in positions:
        if index in failing:
            with pytest.raises(ArgumentError, match=r"random: the micro-batch of examples .*"
                               r"token ids must lie in \[0, 96\).* 500"):  # fmt: skip
                stream.take({"epoch": 0, "index": index}, 1)
        else:
            stream.take({"epoch": 0, "index": index}, 1)
    assert len(failing) == 1
    data.examples[5].labels[-1] = 96
    data.examples[5].tokens[2] = 1
    with pytest.raises(ArgumentError, match=r"labels must be -100 \(ignored\) or lie in \[0, 96\)"):
        stream.take({"epoch": 0, "index": failing[0]}, 1)


def _examples(entry) -> set[int]:
    """The example indices of a plan entry (nested lists of ints)."""
    if isinstance(entry, int):
        return {entry}
    return set().union(*map(_examples, entry))


def one_tensor_step(loss_fn, *, count=(1,)):
    """train_step on one tensor w = [1, 4] with SGD (lr 0.1); returns (result, w, reads)."""
    w = torch.tensor([1.0, 4.0], requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    events: list = []
    with counting_reads(events):
        result = train_lib.train_step(
            lambda b: loss_fn(w), [{}], optimizer, scheduler, [w], count=list(count),
            max_grad_norm=1.0,
        )  # fmt: skip
    return result, w.detach(), len(events)


def test_one_read_steps_update_only_when_loss_and_norm_are_finite():
    result, w, reads = one_tensor_step(lambda w: (w**2).sum())  # loss 17, gradient [2, 8]
    assert reads == 1 and result["loss"] == 17.0
    assert result["grad_norm"] == pytest.approx(68**0.5, rel=1e-6)
    assert torch.allclose(w, torch.tensor([1.0, 4.0]) - 0.1 * torch.tensor([2.0, 8.0]) / 68**0.5)
    result, w, reads = one_tensor_step(lambda w: w.sqrt().sum() * 0 + (w - 1).sqrt().sum())
    assert reads == 1  # loss sqrt(3), gradient inf at w = 1: no update, the loss says so
    assert result["grad_norm"] == float("inf") and result["loss"] != result["loss"]
    assert torch.equal(w, torch.tensor([1.0, 4.0]))
    result, w, reads = one_tensor_step(lambda w: (w * float("inf")).sum())
    assert reads == 1 and result["loss"] == float("inf") and result["grad_norm"] != 0
    assert result["grad_norm"] != result["grad_norm"]  # not reported for a non-finite loss
    assert torch.equal(w, torch.tensor([1.0, 4.0]))


def test_counts_given_per_micro_batch_must_match_the_batches():
    with pytest.raises(ArgumentError, match="count holds 2 counts for 1 micro-batches"):
        one_tensor_step(lambda w: w.sum(), count=(1, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_graphed_step_on_gpu_syncs_once(tmp_path, monkeypatch, grad_accum):
    """The CUDA step as a user runs it (CUDA graphs, packed rows of one shape), counted by CUDA's
    own sync debug mode: after the warm-up and capture (steps 1-3), each step synchronizes once,
    for its loss and gradient norm (the token / label ids are checked on the host as the Stream
    collates, not on the device before each replay). The prefetched batches' copies (pinned
    memory) never synchronize."""
    data = random_data(n=64, longest=60)
    per_step: list[int] = []
    advance = run_lib.advance

    def counted_advance(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            entry = advance(*args, **kwargs)
        per_step.append(sum("synchronizing CUDA operation" in str(w.message) for w in caught))
        return entry

    monkeypatch.setattr(run_lib, "advance", counted_advance)
    with saved_checkpoint(tiny_config()) as (_, directory):
        params = torch.utils._pytree.tree_map(
            lambda t: t.cuda() if isinstance(t, torch.Tensor) else t, load_fp32(directory)
        )
        config = run_config(tmp_path / "run", max_steps=8, grad_accum=grad_accum, packing=True,
                            cuda_graphs=True, compile=False)  # fmt: skip
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = train_lib.train(config, params=params, data=data)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert result.status == "completed" and len(per_step) == 8
    assert per_step[3:] == [1] * 5, per_step
