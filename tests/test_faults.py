"""Faults a user meets (issue 20's audit): each provokes one and checks that no work is lost, no
wrong result is given silently, no code runs from a file, and the error is an fnlm error naming
what is at fault. Sections follow the audit's headings, so the next audit sees what is covered."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fnlm import lora as lora_lib
from fnlm import train as train_lib
from fnlm.errors import ArgumentError, CheckpointError, DataError
from fnlm.train.checkpoint import load_tensors_file
from tests.models import saved_checkpoint
from tests.test_train import load_fp32, random_data, run_config, tiny_config


@pytest.fixture(scope="module")
def tiny():
    """(checkpoint directory, fp32 params) of a tiny random Llama (vocabulary 96)."""
    with saved_checkpoint(tiny_config()) as (_, directory):
        yield directory, load_fp32(directory)


def steps_of(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if "loss" in line]


# =============================================================================================
# Data loss and silent wrong results


# --- 2. training into a directory that is not a run -------------------------------------------


def test_a_fresh_run_refuses_a_non_empty_directory_that_is_not_a_run(tiny, tmp_path):
    _, params = tiny
    export = tmp_path / "merged"
    export.mkdir()
    (export / "config.json").write_text('{"model_type": "llama"}')
    (export / "model.safetensors").write_bytes(b"weights")
    config = run_config(export, max_steps=1)
    with pytest.raises(ArgumentError, match=r"merged is not empty .*not an fnlm run"):
        train_lib.train(config, params=params, data=random_data(n=4))
    assert (export / "config.json").read_text() == '{"model_type": "llama"}'
    with pytest.raises(ArgumentError, match="not an fnlm run"):  # resume with nothing to resume
        train_lib.train(run_config(export, max_steps=1, resume=True), params=params,
                        data=random_data(n=4))  # fmt: skip
    # a run stopped before its first checkpoint is a run: starting it again there is fine
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(train_lib.TrainConfig().to_dict(), default=str))
    (run / "metrics.jsonl").write_text("")
    train_lib.train(run_config(run, max_steps=1), params=params, data=random_data(n=4))


# --- 3. overwrite deletes the old run only once the new one has a checkpoint ------------------


def test_overwrite_keeps_the_old_run_until_the_new_run_has_a_checkpoint(tiny, tmp_path):
    _, params = tiny
    out = tmp_path / "run"
    train_lib.train(run_config(out, max_steps=2), params=params, data=random_data(n=4))
    before = load_file(out / "checkpoints" / "step-00000002" / "trainable.safetensors")
    bad = run_config(out, max_steps=2, overwrite=True, data=str(tmp_path / "typo.jsonl"))
    with pytest.raises(DataError, match="typo.jsonl"):
        train_lib.train(bad)  # a typo in data: nothing may be removed
    after = load_file(out / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    # the same with the data given (loaded fine) but a failing first step
    def fail(*args, **kwargs):
        raise RuntimeError("the first step fails")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_lib.run, "train_step", fail)
        with pytest.raises(RuntimeError, match="first step fails"):
            train_lib.train(run_config(out, max_steps=2, overwrite=True), params=params,
                            data=random_data(n=4))  # fmt: skip
    (aside,) = out.glob(".tmp-replaced-*")
    assert (aside / "checkpoints" / "step-00000002" / "trainable.safetensors").is_file()
    # a new run that writes its first checkpoint removes the old contents
    train_lib.train(run_config(out, max_steps=1, overwrite=True), params=params,
                    data=random_data(n=4, seed=1))  # fmt: skip
    assert not list(out.glob(".tmp-replaced-*"))
    assert [c.name for c in train_lib.list_checkpoints(out)] == ["step-00000001"]
    assert steps_of(out / "metrics.jsonl") == [1]


# --- 4. no code runs from a checkpoint's .pt files ----------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fnlm-faults-pwned",))


def test_a_pickled_payload_in_rng_pt_is_refused_not_run(tiny, tmp_path):
    _, params = tiny
    out = tmp_path / "run"
    train_lib.train(run_config(out, max_steps=2), params=params, data=random_data(n=4))
    rng = out / "checkpoints" / "step-00000002" / "rng.pt"
    torch.save({"cpu": torch.get_rng_state(), "x": _Payload()}, rng)
    marker = Path("/tmp/fnlm-faults-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(
        CheckpointError, match=r"rng\.pt holds more than tensors .*refers to (posix|os)\.system"
    ):
        train_lib.train(run_config(out, max_steps=3, resume=True), params=params,
                        data=random_data(n=4))  # fmt: skip
    assert not marker.exists()
    optimizer = out / "checkpoints" / "step-00000002" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is corrupt or truncated"):
        load_tensors_file(optimizer)


def test_every_torch_load_in_fnlm_is_weights_only():
    root = Path(__file__).resolve().parent.parent / "fnlm"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text, path
        assert "pickle.load" not in text, path


# --- 5. divergence without NaN: collapse to a uniform output ---------------------------------


def test_a_collapse_to_a_uniform_output_stops_the_run(tiny, tmp_path):
    # lr 1e6: after one update the model outputs a uniform distribution (loss = ln 96, gradient
    # norm 0); before the fix the run said "completed" and wrote the dead adapter.
    _, params = tiny
    out = tmp_path / "run"
    config = run_config(out, max_steps=8, lr=1e6, warmup_steps=0, schedule="constant",
                        save_every=1, save_total_limit=1)  # fmt: skip
    with pytest.raises(
        train_lib.NonFiniteLossError, match=r"collapsed to a uniform output.*ln \|V\|"
    ):
        train_lib.train(config, params=params, data=random_data(n=16, seed=6))
    assert not (out / "adapter").exists()
    # the loss of step 2 was computed with the weights of step-1: that checkpoint holds the bad
    # update and is set aside; none from before it exists
    assert train_lib.list_checkpoints(out) == []
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["diverged-step-00000001"]


def test_a_loss_spike_far_above_its_level_stops_the_run(tiny, tmp_path):
    directory, _ = tiny
    params = load_fp32(directory)  # changed below: not the shared copy
    out = tmp_path / "run"
    seen = {}

    def blow_up(entry):  # after step 6, the logits x100: confidently wrong, loss far above ln |V|
        seen[entry["step"]] = entry["loss"]
        if entry["step"] == 6:
            with torch.no_grad():
                params["norm"].mul_(100.0)

    config = run_config(out, max_steps=12, save_every=1, save_total_limit=1)
    with pytest.raises(train_lib.NonFiniteLossError, match=r"spiked to .*for steps 7-8"):
        train_lib.train(config, params=params, data=random_data(n=16, seed=6), callback=blow_up)
    assert seen[7] > 2 * math.log(96) > max(seen[k] for k in range(1, 7))
    # step 7's loss used the weights of step-6: the last good checkpoint is step-5, kept although
    # save_total_limit is 1
    assert [c.name for c in train_lib.list_checkpoints(out)] == ["step-00000005"]
    assert not (out / "adapter").exists()
    # one odd step alone does not stop a run
    params = load_fp32(directory)

    def one_step(entry):
        if entry["step"] in (6, 7):
            with torch.no_grad():
                params["norm"].mul_(100.0 if entry["step"] == 6 else 0.01)

    config = run_config(tmp_path / "once", max_steps=10)
    result = train_lib.train(config, params=params, data=random_data(n=16, seed=6),
                             callback=one_step)  # fmt: skip
    assert result.status == "completed" and result.losses[6] > 2 * math.log(96)


# --- 6. numeric options of the wrong sign or range ---------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        {"max_grad_norm": -1.0}, {"max_grad_norm": float("nan")}, {"warmup_ratio": -1},
        {"warmup_ratio": 1.5}, {"save_total_limit": -1}, {"save_every": -2}, {"warmup_steps": -1},
        {"weight_decay": -0.1}, {"eps": 0}, {"betas": (0.9, 1.2)}, {"min_lr_ratio": 2},
        {"lora_dropout": 1.0}, {"alpha": -16}, {"lr": float("inf")}, {"batch_size": True},
        {"pad_to_multiple": 0}, {"mlp_chunk": -64}, {"eval_every": -1}, {"epochs": float("nan")},
        {"seed": 1.5},
    ],
)  # fmt: skip
def test_numeric_options_out_of_range_are_refused(option):
    (name,) = option
    with pytest.raises(ArgumentError, match=rf"TrainConfig\.{name} must be"):
        train_lib.TrainConfig(**option)


def test_valid_edge_values_are_accepted():
    for option in ({"max_grad_norm": None}, {"max_grad_norm": 0}, {"warmup_ratio": 1.0},
                   {"save_total_limit": 0}, {"weight_decay": 0.0}):  # fmt: skip
        train_lib.TrainConfig(**option)


# --- 7. the checkpoint kept on NaN is from before the bad update; resume honours new options ---


def test_nan_keeps_the_checkpoint_from_before_the_bad_update(tiny, tmp_path):
    _, params = tiny
    out = tmp_path / "run"
    config = run_config(out, max_steps=10, save_every=2, save_total_limit=1)
    holder = {"lora": lora_lib.init(params, r=config.r, alpha=config.alpha)}

    def explode(entry):  # the update of step 4 "explodes": the loss of step 5 is NaN
        if entry["step"] == 4:
            with torch.no_grad():
                lora_lib.parameters(holder["lora"])[0].fill_(float("nan"))

    with pytest.raises(train_lib.NonFiniteLossError, match=r"step 5 .*step-00000002"):
        train_lib.train(config, params=params, lora=holder["lora"], data=random_data(n=16),
                        callback=explode)  # fmt: skip
    assert [c.name for c in train_lib.list_checkpoints(out)] == ["step-00000002"]
    assert (out / "checkpoints" / "diverged-step-00000004").is_dir()
    # resume continues from the good checkpoint, with the lower lr it is given
    result = train_lib.train(
        run_config(out, max_steps=4, save_every=2, save_total_limit=1, lr=1e-4, resume=True),
        params=params, data=random_data(n=16),
    )  # fmt: skip
    assert result.status == "completed" and result.step == 4
    assert steps_of(out / "metrics.jsonl") == [1, 2, 3, 4]


def test_resume_honours_and_reports_a_changed_lr(tiny, tmp_path, capsys):
    _, params = tiny
    out = tmp_path / "run"
    common = dict(max_steps=4, warmup_steps=0, schedule="linear", weight_decay=0.0)
    data = random_data(n=16)
    train_lib.train(run_config(out, **common), params=params, data=data,
                    callback=lambda e: e["step"] == 2 and os.kill(os.getpid(), signal.SIGINT))  # fmt: skip
    capsys.readouterr()
    lrs = []
    train_lib.train(run_config(out, resume=True, lr=1e-5, betas=(0.8, 0.99), **common),
                    params=params, data=data, callback=lambda e: lrs.append(e["lr"]))  # fmt: skip
    printed = capsys.readouterr().out
    assert "lr 0.003 -> 1e-05" in printed and "betas [0.9, 0.999] -> [0.8, 0.99]" in printed
    # the linear schedule over 4 steps at steps 2 and 3: factors 0.5 and 0.25 of the new lr
    assert lrs == pytest.approx([0.5e-5, 0.25e-5], rel=1e-12)
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 1e-5


# =============================================================================================
# Crashes from deep inside: every one an FnlmError naming the file


def test_disk_full_while_writing_a_checkpoint(tiny, tmp_path, monkeypatch):
    _, params = tiny
    out = tmp_path / "run"
    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        if "step-00000004" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"step-00000004: the disk is full.*'step-00000002'"):
        train_lib.train(run_config(out, max_steps=4, save_every=2), params=params,
                        data=random_data(n=8))  # fmt: skip
    assert [c.name for c in train_lib.list_checkpoints(out)] == ["step-00000002"]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_resume_with_a_torn_metrics_line_or_without_metrics(tiny, tmp_path):
    _, params = tiny
    out = tmp_path / "run"
    data = random_data(n=8)
    train_lib.train(run_config(out, max_steps=2), params=params, data=data)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1, "gra')  # a crash in the middle of a line
    train_lib.train(run_config(out, max_steps=3, resume=True), params=params, data=data)
    assert steps_of(out / "metrics.jsonl") == [1, 2, 3]
    (out / "metrics.jsonl").unlink()
    result = train_lib.train(run_config(out, max_steps=4, resume=True), params=params, data=data)
    assert result.step == 4 and steps_of(out / "metrics.jsonl") == [4]


# =============================================================================================
# Messages that mislead


def test_the_first_ctrl_c_says_what_happens_next(tiny, tmp_path, capsys):
    _, params = tiny

    def press(entry):
        if entry["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    result = train_lib.train(run_config(tmp_path / "run", max_steps=3), params=params,
                             data=random_data(n=8), callback=press)  # fmt: skip
    assert result.status == "interrupted"
    assert "finishing this step, then saving a checkpoint; Ctrl-C again aborts" in (
        capsys.readouterr().err
    )
