"""Several processes (CPU, gloo, 2 ranks through torch.multiprocessing.spawn): a 2-process LoRA run
equals a 1-process run with the same global batch, runs resume across world sizes, the data plan
is sharded without loss or repeat, and a rank failing in a step stops the other with its error."""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fnlm.train import distributed, train
from fnlm.train import fsdp as fsdp_lib
from fnlm.train import setup as setup_lib
from fnlm.train.stream import Stream

# 2 ranks vs 1 process on the same micro-batches: each rank's gradient is a partial sum and the
# all-reduce adds the two partial sums, where one process accumulates the micro-batches in turn:
# the same terms summed in another order (~1e-7 relative in fp32), fed through 4 AdamW steps.
# Measured: 1.1e-7 relative on the losses (also of both resumed runs) and 1.9e-7 absolute on
# the adapters (largest entry 0.18); the bounds leave a 10x margin for other BLAS builds.
LOSS_REL_TOL = 1e-6
ADAPTER_ABS_TOL = 2e-6

COMMON = dict(max_steps=4, batch_size=2, lora_dropout=0.0, packing=False, save_every=2,
              save_total_limit=0, pad_to_multiple=1, seed=3)  # fmt: skip
DATA = dict(n=24, seed=7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip


def failing_loss(rank: int, after: int):
    """fnlm.loss.loss that raises from its call `after` + 1 on (a step's first micro-batch)."""
    calls, original = [0], setup_lib.model_loss

    def loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise ValueError(f"boom on rank {rank}")
        return original(*args, **kwargs)

    return loss


def worker(rank, world, ports, params, data, jobs, report) -> None:
    """Run each (TrainConfig, failing rank) of `jobs` as one rank of `world`; on the failing rank
    the loss raises in step 2. Writes each job's losses, or its error, to `report`.<rank>.
    The spawned processes import this module only (not test_train: peft and transformers cost
    tens of seconds of import on a busy machine); params and data come pickled through spawn."""
    torch.set_num_threads(1)
    results, path = [], Path(f"{report}.{rank}")
    for port, (config, fail_rank) in zip(ports, jobs, strict=True):
        join_group(rank, world, port)
        if fail_rank == rank:
            # the loss of a replicated run (setup) or of the sharded model (fsdp)
            setup_lib.model_loss = fsdp_lib.model_loss = failing_loss(rank, after=config.grad_accum)
        try:
            # a copy: spawn hands every rank the same shared-memory tensors, which full
            # fine-tuning updates in place
            mine = copy.deepcopy(params)
            results.append({"losses": train(config, params=mine, data=data).losses})
        except Exception as e:
            results.append({"error": f"{type(e).__name__}: {e}"})
            path.write_text(json.dumps(results))
            if isinstance(e, distributed.RankFailedError):
                return
            # spawn ends the other ranks once this one exits: let them write their report first
            waited = time.perf_counter()
            while not all(Path(f"{report}.{r}").exists() for r in range(world)):
                if time.perf_counter() - waited > 30:
                    break
                time.sleep(0.05)
            raise
    path.write_text(json.dumps(results))


def adapters(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def assert_losses_close(ours: list[float], ref: list[float]) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert abs(a - b) <= LOSS_REL_TOL * abs(b), (ours, ref)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawn of 2 ranks (process start-up dominates) running three jobs: a 2-rank run, a
    1-process checkpoint continued on 2 ranks, and a run whose rank 1 fails in step 2; and the
    1-process runs they are compared with."""
    from models import saved_checkpoint
    from test_train import load_fp32, random_data, run_config, tiny_config

    tmp = tmp_path_factory.mktemp("distributed")
    with saved_checkpoint(tiny_config()) as (_, directory):
        params = load_fp32(directory)

        def one_process(out, **changes):
            config = run_config(tmp / out, **{**COMMON, "grad_accum": 4, **changes})
            return train(config, params=load_fp32(directory), data=random_data(**DATA))

        one = one_process("one")
        one_process("one-half", max_steps=2)
        one_full = one_process("one-full", mode="full", max_steps=3)
        jobs = [
            (run_config(tmp / "two", **COMMON, grad_accum=2), None),
            (run_config(tmp / "two-resumed", **COMMON, grad_accum=2,
                        resume=str(tmp / "one-half" / "checkpoint-2")), None),
            (run_config(tmp / "two-full", **{**COMMON, "max_steps": 3}, mode="full",
                        grad_accum=2), None),
            (run_config(tmp / "failing", **COMMON, grad_accum=2), 1),
        ]  # fmt: skip
        ports = [free_port() for _ in jobs]
        started, raised = time.perf_counter(), None
        try:
            mp.spawn(worker, args=(2, ports, params, random_data(**DATA), jobs, str(tmp / "report")),
                     nprocs=2)  # fmt: skip
        except mp.ProcessRaisedException as e:
            raised = e
        seconds = time.perf_counter() - started
        back = one_process("one-resumed", resume=str(tmp / "two" / "checkpoint-2"))
    reports = [json.loads((tmp / f"report.{r}").read_text()) for r in range(2)]
    return dict(
        tmp=tmp,
        one=one,
        one_full=one_full,
        back=back,
        reports=reports,
        raised=raised,
        seconds=seconds,
    )


def test_two_ranks_equal_one_process_and_resume_across_world_sizes(runs):
    """2 ranks x grad_accum 2 == 1 process x grad_accum 4 (the global batch is batch_size x
    grad_accum x N); a 2-rank checkpoint resumes on 1 process and a 1-process one on 2 ranks,
    each continuing the uninterrupted loss."""
    tmp, one, (rank0, rank1) = runs["tmp"], runs["one"], runs["reports"]
    assert rank0[0]["losses"] == rank1[0]["losses"]  # every rank reports the global loss
    assert_losses_close(rank0[0]["losses"], one.losses)
    ref = adapters(tmp / "one")
    for name, tensor in adapters(tmp / "two").items():
        assert torch.allclose(tensor, ref[name], rtol=0, atol=ADAPTER_ABS_TOL), name
    assert_losses_close(rank0[1]["losses"], one.losses[2:])
    assert_losses_close(runs["back"].losses, one.losses[2:])
    # rank 0 alone writes: one metrics line per step, with the global batch's token counts
    logged = [json.loads(x) for x in (tmp / "two" / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(x) for x in (tmp / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged] == [1, 2, 3, 4]
    assert [e["tokens"] for e in logged] == [e["tokens"] for e in single]
    assert [e["trained_tokens"] for e in logged] == [e["trained_tokens"] for e in single]


def test_full_finetuning_replicated_on_two_ranks_equals_one_process(runs):
    """mode="full" without FSDP: every rank holds the whole model and all its gradients are
    all-reduced; the trained model equals one process's."""
    tmp, (rank0, _) = runs["tmp"], runs["reports"]
    assert_losses_close(rank0[2]["losses"], runs["one_full"].losses)
    ref = load_file(tmp / "one-full" / "model.safetensors")
    for name, tensor in load_file(tmp / "two-full" / "model.safetensors").items():
        assert torch.allclose(tensor, ref[name], rtol=0, atol=ADAPTER_ABS_TOL), name


def test_a_failing_rank_stops_the_other_with_its_error(runs):
    """Rank 1 raises in step 2: it ends with its own error, rank 0 with RankFailedError naming
    rank 1 and its message, at once (not after the group's 15-minute timeout)."""
    assert "boom on rank 1" in str(runs["raised"])
    rank0, rank1 = runs["reports"]
    assert rank1[3] == {"error": "ValueError: boom on rank 1"}
    assert rank0[3]["error"].startswith("RankFailedError: training stopped on rank 0")
    assert "rank 1: ValueError: boom on rank 1" in rank0[3]["error"]
    assert runs["seconds"] < 300


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_plan_is_sharded_without_loss_or_repeat(world):
    """Over one epoch the ranks together take every plan entry once, whatever the world size, and
    the positions equal one process's with the global batch."""
    from test_train import random_data, run_config

    data = random_data(n=24, seed=1)
    config = run_config("unused", batch_size=2, grad_accum=2, packing=False)
    device = torch.device("cpu")
    streams = [Stream(data, config, 0, device, rank=r, world_size=world) for r in range(world)]
    single = Stream(data, config, 0, device)
    position, seen, single_position = {"epoch": 0, "index": 0}, [], {"epoch": 0, "index": 0}
    while position["epoch"] == 0 and position["index"] < len(single.plan(0)):
        nexts = set()
        for stream in streams:
            batches, following = stream.take(position, 2)
            nexts.add(json.dumps(following))
            seen += [tuple(row.tolist()) for b in batches for row in b["tokens"]]
        _, single_position = single.take(single_position, 2 * world)
        assert nexts == {json.dumps(single_position)}
        position = json.loads(nexts.pop())
    expected = [tuple(row.tolist()) for b in single.take({"epoch": 0, "index": 0}, len(single.plan(0)))[0]
                for row in b["tokens"]]  # fmt: skip
    assert sorted(seen[: len(expected)]) == sorted(expected)


def test_one_process_needs_no_group():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.sum_over_ranks([1.5, 2.0]) == [1.5, 2.0]


def model_and_chats(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny model directory with a tokenizer and chat template, and a JSONL file of 12 chats."""
    from models import saved_checkpoint
    from test_train import CHAT_TEMPLATE, tiny_config
    from tokenizer_fixtures import write_byte_level_bpe

    from fnlm.tokenizer import Tokenizer

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_byte_level_bpe(model_dir, chat_template=CHAT_TEMPLATE)
    config = tiny_config()
    config.vocab_size = Tokenizer.from_dir(model_dir).vocab_size
    with saved_checkpoint(config) as (model, _):
        model.save_pretrained(model_dir)
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"The answer is {2 * i}."}]}
        for i in range(12)
    ]  # fmt: skip
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def torchrun(nproc: int) -> list[str]:
    """torchrun on one machine: --standalone binds the rendezvous store to a port the OS picks
    and names the job uniquely, so two tests running it at once (pytest -n) cannot meet in one
    store, as two could through a port free_port() handed to both."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc)]  # fmt: skip


def ranks_errors(stderr: str) -> str:
    """torchrun's stderr without the warnings (each a line and its source line): what a rank
    printed before it died comes before torchrun's own traceback, which alone would be the tail."""
    lines, skip = [], False
    for line in stderr.splitlines():
        if skip and line.startswith(" "):
            skip = False
            continue
        skip = "Warning:" in line
        if not skip:
            lines.append(line)
    return "\n".join(lines)[-8000:]


def test_torchrun_runs_the_train_script_unchanged(tmp_path):
    """`torchrun --nproc_per_node 2 scripts/train.py` with --grad-accum 1 logs the losses of one
    process with --grad-accum 2 (the global batch is batch_size x grad_accum x N)."""
    import subprocess
    import sys

    from test_train import ROOT

    model_dir, data = model_and_chats(tmp_path)
    common = ["--model", str(model_dir), "--data", str(data), "--mode", "lora", "--max-steps",
              "3", "--batch-size", "2", "--max-seq-length", "64", "--no-progress", "--cache-dir",
              str(tmp_path / "cache")]  # fmt: skip
    script = str(ROOT / "scripts" / "train.py")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    runs = {
        "two": [*torchrun(2), script, *common, "--grad-accum", "1", "--out", str(tmp_path / "two")],
        "one": [sys.executable, script, *common, "--grad-accum", "2", "--out", str(tmp_path / "one")],
    }  # fmt: skip
    losses = {}
    for name, command in runs.items():
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, ranks_errors(done.stderr)
        assert done.stdout.count("done: 3 steps") == 1, done.stdout  # rank 0's line only
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines]
    assert_losses_close(losses["two"], losses["one"])
    assert (tmp_path / "two" / "adapter_model.safetensors").is_file()
