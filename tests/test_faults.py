"""Faults a user meets (issue 20's audit): each provokes one and checks that no work is lost, no
wrong result is given silently, no code runs from a file, and the error is an fnlm error naming
what is at fault. Sections follow the audit's headings, so the next audit sees what is covered."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import fnlm
import fnlm.export
from fnlm import lora as lora_lib
from fnlm import train as train_lib
from fnlm.errors import (
    ArgumentError,
    CheckpointError,
    DataError,
    ExportError,
    LoraError,
    ModelNotFoundError,
    OfflineError,
)
from fnlm.params import tree_map
from tests.models import saved_checkpoint
from tests.test_train import load_fp32, random_data, run_config, tiny_config


@pytest.fixture(scope="module")
def tiny():
    """(checkpoint directory, fp32 params) of a tiny random Llama (vocabulary 96)."""
    with saved_checkpoint(tiny_config()) as (_, directory):
        yield directory, load_fp32(directory)


def steps_of(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if "loss" in line]


@pytest.fixture
def adapter(tiny, tmp_path):
    """A PEFT adapter for the tiny model, as peft's save_pretrained writes it; with the
    raw `model.state_dict()` lora keys of the same model (adapter name ".default")."""
    directory, _ = tiny
    model = transformers.LlamaForCausalLM.from_pretrained(directory)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)  # fmt: skip
    wrapped = peft.get_peft_model(model, config)
    out = tmp_path / "adapter"
    wrapped.save_pretrained(out)
    raw = {k: v.clone() for k, v in wrapped.state_dict().items() if ".lora_" in k}
    return out, raw


# =============================================================================================
# Data loss and silent wrong results


# --- 1. a failed overwrite of a merged export leaves the earlier export whole ---------------------


def test_a_failed_merged_overwrite_leaves_the_earlier_export(tiny, tmp_path, monkeypatch):
    _, params = tiny
    out = tmp_path / "merged"
    fnlm.save(out, params, format="merged", shard_size="20KB")
    (out / "README.md").write_text("my notes")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len([n for n in before if n.endswith(".safetensors")]) > 2
    changed = tree_map(lambda t: t + 1.0, params)
    changed.source = None
    calls = {"n": 0}
    original = fnlm.export.MergedWeights.__call__

    def disk_full_later(self, name):  # the second shard fails: the first was written whole
        calls["n"] += 1
        if calls["n"] == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name)

    monkeypatch.setattr(fnlm.export.MergedWeights, "__call__", disk_full_later)
    with pytest.raises(
        ExportError, match=r"merged/model-\d+-of-\d+\.safetensors: the disk is full"
    ):
        fnlm.save(out, changed, format="merged", shard_size="20KB", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary directory
    monkeypatch.undo()
    fnlm.save(out, changed, format="merged", overwrite=True)  # one shard now
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    reloaded, _ = fnlm.load(out, quant=None, dtype=torch.float32, device="cpu")
    assert torch.equal(reloaded["embed"], changed["embed"])


# --- 2. training into a directory that is not a run -----------------------------------------------


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


# --- 3. overwrite removes the old run only once the new one has a checkpoint ----------------------


def test_overwrite_keeps_the_old_run_until_the_new_run_has_a_checkpoint(tiny, tmp_path):
    _, params = tiny
    out = tmp_path / "run"
    train_lib.train(run_config(out, max_steps=2), params=params, data=random_data(n=4))
    before = load_file(out / "checkpoint-2" / "trainable.safetensors")
    bad = run_config(out, max_steps=2, overwrite=True, data=str(tmp_path / "typo.jsonl"))
    with pytest.raises(DataError, match="typo.jsonl"):
        train_lib.train(bad)  # a typo in data: nothing may be removed
    after = load_file(out / "checkpoint-2" / "trainable.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (out / "adapter_model.safetensors").is_file()

    # the same with the data given (loaded fine) but a failing first step
    def fail(*args, **kwargs):
        raise RuntimeError("the first step fails")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_lib.run, "train_step", fail)
        with pytest.raises(RuntimeError, match="first step fails"):
            train_lib.train(run_config(out, max_steps=2, overwrite=True), params=params,
                            data=random_data(n=4))  # fmt: skip
    (aside,) = out.glob(".tmp-replaced-*")
    assert (aside / "checkpoint-2" / "trainable.safetensors").is_file()
    # a new run that writes its first checkpoint removes the old contents
    train_lib.train(run_config(out, max_steps=1, overwrite=True), params=params,
                    data=random_data(n=4, seed=1))  # fmt: skip
    assert not list(out.glob(".tmp-replaced-*"))
    assert [c.name for c in train_lib.list_checkpoints(out)] == ["checkpoint-1"]
    assert steps_of(out / "metrics.jsonl") == [1]


# --- 4. no code runs from a checkpoint's .pt files ------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fnlm-faults-pwned",))


def test_a_pickled_payload_in_rng_pt_is_refused_not_run(tiny, tmp_path):
    _, params = tiny
    out = tmp_path / "run"
    train_lib.train(run_config(out, max_steps=2), params=params, data=random_data(n=4))
    rng = out / "checkpoint-2" / "rng.pt"
    torch.save({"cpu": torch.get_rng_state(), "x": _Payload()}, rng)
    marker = Path("/tmp/fnlm-faults-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(
        CheckpointError, match=r"rng\.pt holds more than tensors .*refers to (posix|os)\.system"
    ):
        train_lib.train(run_config(out, max_steps=3, resume=True), params=params,
                        data=random_data(n=4))  # fmt: skip
    assert not marker.exists()
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is corrupt or truncated"):
        train_lib.checkpoint.load_tensors_file(optimizer)


def test_every_torch_load_in_fnlm_is_weights_only():
    root = Path(__file__).resolve().parent.parent / "fnlm"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text, path
        assert "pickle.load" not in text, path


# --- 5. divergence without NaN: a collapse, a loss spike ------------------------------------------


def test_a_collapse_to_a_uniform_output_stops_the_run(tiny, tmp_path):
    # After step 1 the model outputs a uniform distribution (its final norm zeroed: logits 0, loss
    # = ln 96, gradient norm exactly 0); before the fix the run said "completed" and wrote the dead
    # adapter. (A learning rate of 1e6 once made this collapse; on other CPUs the same run ends in
    # NaN instead, where fp32 overflows first, so the collapse is made directly.)
    directory, _ = tiny
    params = load_fp32(directory)  # changed below: not the shared copy
    out = tmp_path / "run"

    def collapse(entry):
        if entry["step"] == 1:
            with torch.no_grad():
                params["norm"].zero_()

    config = run_config(out, max_steps=8, save_every=1, save_total_limit=1)
    with pytest.raises(
        train_lib.NonFiniteLossError, match=r"collapsed to a uniform output.*ln \|V\|"
    ):
        train_lib.train(config, params=params, data=random_data(n=16, seed=6), callback=collapse)
    assert not (out / "adapter_config.json").exists()
    # the loss of step 2 was computed with the weights of step-1: that checkpoint holds the bad
    # update and is set aside; none from before it exists
    assert train_lib.list_checkpoints(out) == []
    assert [p.name for p in out.glob("diverged-*")] == ["diverged-checkpoint-1"]


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
    assert [c.name for c in train_lib.list_checkpoints(out)] == ["checkpoint-5"]
    assert not (out / "adapter_config.json").exists()
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


# --- 6. numeric options of the wrong sign or range ------------------------------------------------


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


# --- 7. the checkpoint kept on NaN is from before the bad update; resume honours new options ------


def test_nan_keeps_the_checkpoint_from_before_the_bad_update(tiny, tmp_path):
    _, params = tiny
    out = tmp_path / "run"
    config = run_config(out, max_steps=10, save_every=2, save_total_limit=1)
    holder = {"lora": lora_lib.init(params, r=config.r, alpha=config.alpha)}

    def explode(entry):  # the update of step 4 "explodes": the loss of step 5 is NaN
        if entry["step"] == 4:
            with torch.no_grad():
                lora_lib.parameters(holder["lora"])[0].fill_(float("nan"))

    with pytest.raises(train_lib.NonFiniteLossError, match=r"step 5 .*checkpoint-2"):
        train_lib.train(config, params=params, lora=holder["lora"], data=random_data(n=16),
                        callback=explode)  # fmt: skip
    assert [c.name for c in train_lib.list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "diverged-checkpoint-4").is_dir()
    # resume continues from the good checkpoint, with the lower lr it is given
    result = train_lib.train(
        run_config(out, max_steps=4, save_every=2, save_total_limit=1, lr=1e-4, resume=True),
        params=params, data=random_data(n=16),
    )  # fmt: skip
    assert result.status == "completed" and result.step == 4
    assert steps_of(out / "metrics.jsonl") == [1, 2, 3, 4]


def test_a_nan_before_any_update_is_not_blamed_on_the_learning_rate(tiny, tmp_path):
    """A model whose forward is already non-finite fails at step 1: the error says no update was
    made (so not the learning rate) and points at the weights; a NaN after updates still advises
    a lower learning rate (test above)."""
    directory, _ = tiny
    params = load_fp32(directory)  # a copy of its own: the fixture's params stay finite
    with torch.no_grad():
        params["norm"].fill_(float("nan"))
    with pytest.raises(train_lib.NonFiniteLossError) as caught:
        train_lib.train(run_config(tmp_path / "run", max_steps=3), params=params,
                        data=random_data(n=8))  # fmt: skip
    message = str(caught.value)
    assert "at step 1 " in message and "No update was made before this step" in message
    assert "Lower the learning rate" not in message


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
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == 1e-5


# --- 8. the same tensor in two weight files -------------------------------------------------------


def test_a_tensor_in_two_files_is_refused_naming_both(tiny, tmp_path):
    directory, _ = tiny
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(directory, checkpoint)
    tensors = load_file(checkpoint / "model.safetensors")
    save_file(
        {"model.norm.weight": tensors["model.norm.weight"] * 2}, checkpoint / "stray.safetensors"
    )
    with pytest.raises(
        CheckpointError,
        match=r"'model.norm.weight' is in both .*model.safetensors and .*stray.safetensors",
    ):
        fnlm.load(checkpoint, quant=None, dtype=torch.float32, device="cpu")


# --- 9. an adapter file that adapts nothing -------------------------------------------------------


def test_an_adapter_file_without_tensors_is_refused(tiny, adapter):
    _, params = tiny
    directory, _ = adapter
    save_file({}, directory / "adapter_model.safetensors")
    with pytest.raises(
        LoraError, match=r"adapter_model.safetensors holds no LoRA tensors .*targets"
    ):
        lora_lib.load(directory, params)


# =============================================================================================
# Crashes from deep inside: each an FnlmError naming the file or argument


def test_a_truncated_adapter_file_is_an_error_naming_it(tiny, adapter):
    _, params = tiny
    directory, _ = adapter
    file = directory / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-64])
    with pytest.raises(LoraError, match=r"adapter_model.safetensors is corrupt or truncated"):
        lora_lib.load(directory, params)


def test_disk_full_while_writing_a_checkpoint(tiny, tmp_path, monkeypatch):
    _, params = tiny
    out = tmp_path / "run"
    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"checkpoint-4: the disk is full.*'checkpoint-2'"):
        train_lib.train(run_config(out, max_steps=4, save_every=2), params=params,
                        data=random_data(n=8))  # fmt: skip
    assert [c.name for c in train_lib.list_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(".tmp-checkpoint-*"))


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


@pytest.mark.parametrize("value", ["4096", -5, 0, 2.5, True])
def test_load_checks_max_seq_length(tiny, value):
    directory, _ = tiny
    with pytest.raises(
        ArgumentError, match=rf"max_seq_length must be a positive integer or None, got {value!r}"
    ):
        fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu", max_seq_length=value)


def test_generate_script_prints_an_error_not_a_traceback(tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "generate.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "nope"), "hi"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "nope" in done.stderr and "Traceback" not in done.stderr


# =============================================================================================
# Messages that mislead


def test_a_mistyped_relative_path_says_no_such_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "exports").mkdir()
    with pytest.raises(
        (ModelNotFoundError, OfflineError),
        match=r"no directory \S*/exports/merged exists, and as a hub id",
    ):
        fnlm.load("exports/merged", quant=None, device="cpu")


def test_raw_state_dict_keys_with_the_adapter_name_load(tiny, adapter):
    _, params = tiny
    directory, raw = adapter
    assert all(".default." in k for k in raw)
    expected = lora_lib.load(directory, params)
    save_file(raw, directory / "adapter_model.safetensors")
    loaded = lora_lib.load(directory, params)
    assert all(torch.equal(a, b) for a, b in zip(lora_lib.parameters(loaded),
                                                 lora_lib.parameters(expected), strict=True))  # fmt: skip
    two = {**raw, **{k.replace(".default.", ".other."): v.clone() for k, v in raw.items()}}
    save_file(two, directory / "adapter_model.safetensors")
    with pytest.raises(LoraError, match=r"several adapters \(\['default', 'other'\]\)"):
        lora_lib.load(directory, params)


def test_a_damaged_converted_gguf_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    from tests.test_gguf import sentencepiece_vocab, tiny_model, write_tiny_gguf

    monkeypatch.setenv("FNLM_CACHE", str(tmp_path / "cache"))
    vocab = sentencepiece_vocab()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model(len(vocab["tokens"]), seed=3), vocab)
    params, _ = fnlm.load(path, quant=None, dtype=torch.float32, device="cpu")
    (weights,) = (tmp_path / "cache").rglob("model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])  # a crash or a full disk cut it short
    again, _ = fnlm.load(path, quant=None, dtype=torch.float32, device="cpu")
    printed = capsys.readouterr().out
    assert "is damaged" in printed and "converting again" in printed
    assert torch.equal(again["embed"], params["embed"])


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


def test_json_errors_name_line_and_column(tmp_path, adapter, tiny):
    from fnlm import data as data_lib

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n{"text": "b",, }\n')
    with pytest.raises(DataError, match=r"rows\.jsonl line 2 is not valid JSON: .* at column 14"):
        data_lib.read_rows(str(rows))
    doc = tmp_path / "rows.json"
    doc.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"rows\.json is not valid JSON: .* at line 2 column 11"):
        data_lib.read_rows(str(doc))
    directory, _ = adapter
    (directory / "adapter_config.json").write_text('{"r": 4,\n "lora_alpha": }')
    with pytest.raises(
        LoraError, match=r"adapter_config\.json is not valid JSON: .* line 2 column 16"
    ):
        lora_lib.load(directory, tiny[1])
