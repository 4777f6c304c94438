"""The `fnlm` command and what it stands on: --help of every subcommand, transformers / TRL / peft
option names (flags and config files), the example configs, adapters that load their base
(against peft's AutoPeftModel), `fnlm info` (against transformers' parameter count), the CPU
default of `fnlm.load`, and `import fnlm` without triton."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import fnlm
from fnlm.cli import main, parser
from fnlm.cli.train import config_from_args
from fnlm.errors import ArgumentError
from fnlm.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml")) + sorted((ROOT / "examples").glob("*.yaml"))
# fnlm and transformers compute the same fp32 forward in a different order of operations.
FP32_LOGITS_ATOL = 1e-4

CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random two-layer Llama with a byte-level BPE tokenizer, saved by transformers."""
    from tokenizer_fixtures import write_byte_level_bpe

    from fnlm.tokenizer import Tokenizer

    directory = tmp_path_factory.mktemp("tiny")
    write_byte_level_bpe(directory, chat_template=CHAT_TEMPLATE)
    config = transformers.LlamaConfig(
        vocab_size=Tokenizer.from_dir(directory).vocab_size, hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=256, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
        directory
    )
    return directory


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter of tiny_model with random B (so it changes the output), naming its base."""
    params, _ = fnlm.load(tiny_model, quant=None, device="cpu")
    lora = fnlm.lora.init(params, r=4, alpha=8, targets=("q", "v", "down"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for node in lora_nodes(lora):
            node["b"].copy_(torch.randn(node["b"].shape, generator=g) * 0.2)
    directory = tmp_path_factory.mktemp("adapter")
    fnlm.lora.save(directory, lora, base_model_name_or_path=str(tiny_model))
    return directory


def lora_nodes(lora):
    for layer in lora["layers"]:
        for part in layer.values():
            yield from part.values()


# ------------------------------------------------------------------------------------------
# --help


def help_text(*argv) -> None:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0


def test_every_subcommand_has_help(capsys):
    commands = parser()._subparsers._group_actions[0].choices
    assert {"train", "generate", "chat", "export", "info", "serve"} <= set(commands)
    for name in commands:
        help_text(name)
        text = capsys.readouterr().out
        assert f"fnlm {name}" in text and "--" in text


def test_train_help_describes_every_option_with_its_choices(capsys):
    help_text("train")
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help metadata"
        assert " ".join(f.metadata["help"].split()) in text, f.name
        if f.metadata.get("choices"):
            assert "{" + ",".join(f.metadata["choices"]) + "}" in text, f.name
    for alias in ("--learning_rate (--lr)", "--lora_r (--r)", "--optim (--optimizer)"):
        assert alias in text


# ------------------------------------------------------------------------------------------
# transformers / TRL / peft option names


TRANSFORMERS_STYLE = {
    "learning_rate": 1e-4, "output_dir": "runs/x", "gradient_accumulation_steps": 2,
    "per_device_train_batch_size": 3, "num_train_epochs": 2.0, "lora_r": 8, "lora_alpha": 32,
    "target_modules": ["q_proj", "v_proj"], "lr_scheduler_type": "cosine", "logging_steps": 5,
    "save_steps": 10, "optim": "adamw_8bit", "report_to": "none", "max_length": 512,
    "adam_beta2": 0.95, "warmup_ratio": 0.1, "weight_decay": 0.01,
}  # fmt: skip
FNLM_STYLE = dict(
    lr=1e-4, out="runs/x", grad_accum=2, batch_size=3, epochs=2.0, r=8, alpha=32,
    targets=("q_proj", "v_proj"), schedule="cosine", log_every=5, save_every=10,
    optimizer="adamw8bit", report_to=(), max_seq_length=512, betas=(0.9, 0.95), warmup_ratio=0.1,
    weight_decay=0.01,
)  # fmt: skip


def flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out.append(f"--{key}")
        out.extend(str(v) for v in value) if isinstance(value, list) else out.append(str(value))
    return out


def train_config(*argv) -> TrainConfig:
    return config_from_args(parser().parse_args(["train", *argv]))


def test_transformers_names_in_flags_and_files(tmp_path):
    expected = TrainConfig(**FNLM_STYLE)
    assert TrainConfig.from_dict(TRANSFORMERS_STYLE) == expected
    from fnlm.cli import normalize

    assert (
        config_from_args(parser().parse_args(normalize(["train", *flags(TRANSFORMERS_STYLE)])))
        == expected
    )
    lines = [f"{k} = {json.dumps(v)}" for k, v in TRANSFORMERS_STYLE.items()]
    (tmp_path / "run.toml").write_text("[train]\n" + "\n".join(lines) + "\n")
    assert TrainConfig.from_file(tmp_path / "run.toml") == expected
    # a flag wins over the file, whichever name either uses
    assert train_config("--config", str(tmp_path / "run.toml"), "--lr", "3e-4").lr == 3e-4


def test_value_spellings_of_transformers_and_unsloth():
    assert TrainConfig.from_dict({"gradient_checkpointing": True}).checkpointing == "layer"
    assert (
        TrainConfig.from_dict({"use_gradient_checkpointing": "unsloth"}).checkpointing == "offload"
    )
    assert (
        TrainConfig.from_dict({"lr_scheduler_type": "constant_with_warmup"}).schedule == "constant"
    )
    assert TrainConfig.from_dict({"optim": "paged_adamw_8bit"}).optimizer == "paged_adamw8bit"
    assert TrainConfig.from_dict({"target_modules": "all-linear"}).targets == "all-linear"
    assert TrainConfig.from_dict({"bf16": True}).dtype == "bfloat16"
    assert TrainConfig.from_dict({"report_to": ["tensorboard"]}).report_to == ("tensorboard",)
    assert train_config("--bf16").dtype == "bfloat16"
    assert train_config("--gradient-checkpointing", "false").checkpointing == "none"


def test_alias_errors_name_the_fnlm_option_and_the_key_given():
    with pytest.raises(ArgumentError, match=r"TrainConfig\.lr must be .*given as 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": -1})
    with pytest.raises(ArgumentError, match="'lr' given twice"):
        TrainConfig.from_dict({"lr": 1e-4, "learning_rate": 1e-4})
    with pytest.raises(ArgumentError, match="did you mean 'lora_r'"):
        TrainConfig.from_dict({"lora_rr": 8})
    with pytest.raises(ArgumentError, match="report_to: unknown tracker"):
        TrainConfig.from_dict({"report_to": "neptune"})


def test_cli_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    assert main(["train", "--learning_rate", "-1", "--data", "x.jsonl"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fnlm train: error: TrainConfig.lr must be") and "Traceback" not in err
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    assert main(["generate", "--adapter", str(tmp_path), "Hi"]) == 1
    assert "names no base model" in capsys.readouterr().err


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load_and_validate(path):
    config = TrainConfig.from_file(path)  # every key known, every value valid
    assert (ROOT / config.data).is_file() and config.model
    assert str(config.out).startswith("runs/")


def test_examples_cover_the_main_recipes():
    modes = {TrainConfig.from_file(p).mode for p in EXAMPLES}
    assert modes == {"qlora", "lora", "full"}
    families = {TrainConfig.from_file(p).model for p in EXAMPLES}
    for family in ("llama", "qwen", "mistral", "gemma"):
        assert any(m and family in m.lower() for m in families), family


# ------------------------------------------------------------------------------------------
# adapters know their base


def test_load_of_an_adapter_directory_matches_peft(tiny_model, tiny_adapter):
    peft = pytest.importorskip("peft")
    tokens = torch.tensor([[1, 5, 9, 200, 33, 7]])
    params, tok = fnlm.load(tiny_adapter, quant=None, device="cpu")
    assert tok is not None and params.adapter is not None
    ours = fnlm.forward(params, tokens)
    reference = peft.AutoPeftModelForCausalLM.from_pretrained(
        str(tiny_adapter), dtype=torch.float32
    )
    with torch.no_grad():
        theirs = reference(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=FP32_LOGITS_ATOL, rtol=0)
    base, _ = fnlm.load(tiny_model, quant=None, device="cpu")
    assert (fnlm.forward(base, tokens) - ours).abs().max() > 1e-2  # the adapter does something


def test_generate_and_export_with_only_the_adapter(tiny_model, tiny_adapter, tmp_path, capsys):
    params, tok = fnlm.load(tiny_model, quant=None, device="cpu")
    lora = fnlm.lora.load(tiny_adapter, params)
    prompt = [{"role": "user", "content": "Hi"}]
    expected = fnlm.generate(params, tok, prompt, lora=lora, max_new_tokens=5)
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(tiny_adapter),
                "--max-new-tokens",
                "5",
                "--device",
                "cpu",
                "Hi",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == expected.strip()

    assert main(["export", "--adapter", str(tiny_adapter), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = fnlm.load(tmp_path / "merged", quant=None, device="cpu")
    tokens = torch.tensor([[1, 5, 9, 200]])
    torch.testing.assert_close(
        fnlm.forward(merged, tokens), fnlm.forward(params, tokens, lora=lora),
        atol=FP32_LOGITS_ATOL, rtol=0,
    )  # fmt: skip


def test_chat_keeps_the_conversation(tiny_model, tiny_adapter, monkeypatch, capsys):
    import io

    params, tok = fnlm.load(tiny_model, quant=None, device="cpu")
    lora = fnlm.lora.load(tiny_adapter, params)
    first = fnlm.generate(
        params, tok, [{"role": "user", "content": "Hi"}], lora=lora, max_new_tokens=4
    )
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "Again"}]  # fmt: skip
    second = fnlm.generate(params, tok, history, lora=lora, max_new_tokens=4)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAgain\n\n"))
    assert (
        main(["chat", "--adapter", str(tiny_adapter), "--max-new-tokens", "4", "--device", "cpu"])
        == 0
    )
    assert capsys.readouterr().out == f"> Hi\n{first}\n> Again\n{second}\n"


def test_serve_refuses_an_adapter_without_a_name(capsys):
    assert main(["serve", "--adapter", "runs/demo"]) == 1
    assert "--adapter takes NAME=DIR" in capsys.readouterr().err


def test_runs_on_the_embedded_model_record_a_stable_base():
    from fnlm.default import EMBEDDED_ID
    from fnlm.hub import resolve
    from fnlm.load import model_id

    assert model_id(None) == EMBEDDED_ID
    assert resolve(EMBEDDED_ID) == resolve(None)
    assert model_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert Path(model_id(".")).is_absolute()


# ------------------------------------------------------------------------------------------
# fnlm info


def test_info_of_a_model_and_an_adapter(tiny_model, tiny_adapter, capsys):
    from fnlm.cli.info import checkpoint_info

    info = checkpoint_info(tiny_model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    assert info["parameters"] == reference.num_parameters()
    assert (info["family"], info["layers"], info["chat_template"]) == ("llama", 2, "Llama 3")
    assert info["quantization"].startswith("none")
    adapter = checkpoint_info(tiny_adapter)
    assert adapter["kind"] == "LoRA adapter" and adapter["r"] == 4
    assert adapter["base_model"]["parameters"] == info["parameters"]
    assert main(["info", str(tiny_adapter), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base"] == str(tiny_model)


# ------------------------------------------------------------------------------------------
# the CPU default and no triton


def test_cpu_loads_16_bit_unless_nf4_is_asked_for(tiny_model):
    from fnlm import quant

    params, _ = fnlm.load(tiny_model, device="cpu")
    assert not quant.is_quantized(params["layers"][0]["attn"]["q"])
    params, _ = fnlm.load(tiny_model, device="cpu", quant="nf4")
    assert quant.is_quantized(params["layers"][0]["attn"]["q"])


BLOCK_TRITON = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is blocked by the test")
sys.meta_path.insert(0, Block())
import torch, fnlm
from fnlm import kernels
assert "triton" not in sys.modules and not kernels.HAS_TRITON
params, tok = fnlm.load(sys.argv[1], device="cpu")
tokens = torch.tensor([[1, 5, 9]])
lora = fnlm.lora.init(params, r=2)
loss = fnlm.loss(params, {"tokens": tokens}, lora=lora)
loss.backward()
print(fnlm.generate(params, tok, "Hi", max_new_tokens=3) is not None)
try:
    with kernels.kernel_backend("triton"):
        pass
except fnlm.FnlmError as e:
    print("refused:", e)
"""


def test_import_and_cpu_path_without_triton(tiny_model):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TRITON, str(tiny_model)], capture_output=True, text=True,
        env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "True" in done.stdout and "refused: " in done.stdout and "triton" in done.stdout


# ------------------------------------------------------------------------------------------
# trackers and the loss plot


def tiny_run(tiny_model, tmp_path, **options):
    """Three LoRA steps on tiny_model with random data; returns the TrainResult."""
    from fnlm import data as data_lib

    g = torch.Generator().manual_seed(0)
    examples = [
        data_lib.Example(
            t := torch.randint(0, 200, (12,), generator=g, dtype=torch.int32), t.clone()
        )
        for _ in range(8)
    ]
    data = data_lib.TokenizedData(examples, "random")
    defaults = dict(
        out=str(tmp_path / "run"), mode="lora", max_steps=3, batch_size=2, grad_accum=1,
        max_seq_length=32, r=2, targets=("q", "v"), device="cpu", progress=False,
    )  # fmt: skip
    config = TrainConfig(**{**defaults, **options})
    params, tok = fnlm.load(tiny_model, quant=None, device="cpu")
    return fnlm.train.train(config, params=params, tokenizer=tok, data=data)


def test_tensorboard_event_files_hold_the_losses(tiny_model, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = tiny_run(tiny_model, tmp_path, report_to="tensorboard", run_name="tb")
    events = EventAccumulator(str(result.run_dir / "runs" / "tb"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [
        (i + 1, pytest.approx(loss, rel=1e-6)) for i, loss in enumerate(result.losses)
    ]
    assert {"train/learning_rate", "train/grad_norm"} <= set(events.Tags()["scalars"])


def test_mlflow_file_store_holds_the_losses(tiny_model, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3.x: file stores opt-in
    result = tiny_run(tiny_model, tmp_path, report_to=["mlflow"], run_name="ml")
    client = mlflow.tracking.MlflowClient()
    run = client.search_runs(experiment_ids=["0"], filter_string="tags.`mlflow.runName` = 'ml'")[0]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [
        (i + 1, pytest.approx(loss, rel=1e-6)) for i, loss in enumerate(result.losses)
    ]
    assert run.data.params["lr"] == str(TrainConfig().lr) and run.info.status == "FINISHED"


def test_wandb_offline_run_holds_the_losses(tiny_model, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = tiny_run(tiny_model, tmp_path, report_to="wandb", run_name="wb")
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")  # what `wandb sync` uploads
    records = list(wandb_records(log))
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [(h["_step"], h["train/loss"]) for h in history] == [
        (i + 1, pytest.approx(loss, rel=1e-6)) for i, loss in enumerate(result.losses)
    ]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "wb"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["lr"] == TrainConfig().lr
    assert wandb.run is None  # finished


def wandb_records(path):
    """The records of a W&B offline run's transaction log: a 7-byte header (":W&B", magic,
    version), then LevelDB's log format — 32 KiB blocks of chunks (crc32, length, type: 1 full,
    2 first, 3 middle, 4 last) — each record a wandb_internal `Record` protobuf. wandb 0.31 ships
    no Python reader for it (wandb-core, in Go, reads it for `wandb sync`)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if pos % 32768 + 7 > 32768:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        pending = (b"" if kind in (1, 2) else pending) + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_a_missing_tracker_package_says_how_to_install_it(monkeypatch):
    import importlib

    from fnlm.train import trackers

    real = importlib.import_module
    monkeypatch.setattr(
        importlib, "import_module",
        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "wandb" else real(name, *a),
    )  # fmt: skip
    with pytest.raises(ArgumentError, match=r"pip install 'fnlm\[wandb\]'"):
        trackers.require("wandb")


def test_loss_plot_is_drawn_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    from fnlm.train.plot import plot_losses

    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5}]
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    png = plot_losses(metrics, tmp_path / "loss.png")
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (640, 400)
    metrics.write_text("")
    assert plot_losses(metrics, tmp_path / "empty.png") is None


# ------------------------------------------------------------------------------------------
# the run directory in transformers' Trainer shape


def test_lora_run_directory_is_what_peft_users_load(tiny_model, tmp_path):
    peft = pytest.importorskip("peft")
    result = tiny_run(tiny_model, tmp_path, save_every=2, save_total_limit=3)
    out = result.run_dir
    assert (out / "train_config.json").is_file() and not (out / "config.json").exists()
    assert [c.name for c in fnlm.train.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model.resolve()
    )
    tokens = torch.tensor([[1, 5, 9, 200, 33]])
    params, _ = fnlm.load(tiny_model, device="cpu")
    ours = fnlm.forward(params, tokens, lora=result.lora)
    for directory in (out, out / "checkpoint-3"):  # the final adapter and the last checkpoint
        model = peft.AutoPeftModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, ours, atol=FP32_LOGITS_ATOL, rtol=0)
    # and fnlm's own command line takes the run directory as the adapter
    assert main(["info", str(out), "--json"]) == 0


def test_full_run_ends_with_a_transformers_checkpoint(tiny_model, tmp_path):
    result = tiny_run(tiny_model, tmp_path, mode="full", lr=1e-4)
    out = result.run_dir
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = torch.tensor([[1, 5, 9, 200, 33]])
    with torch.no_grad():
        theirs = reference(tokens).logits
    torch.testing.assert_close(
        fnlm.forward(result.params, tokens), theirs, atol=FP32_LOGITS_ATOL, rtol=0
    )


def test_a_run_of_the_earlier_layout_resumes(tiny_model, tmp_path):
    constant = dict(schedule="constant")  # the same lr at each step whatever max_steps is
    straight = tiny_run(tiny_model, tmp_path / "straight", max_steps=4, **constant)
    first = tiny_run(tiny_model, tmp_path / "old", max_steps=2, **constant)
    out = first.run_dir
    # the layout of fnlm before this change: checkpoints/step-NNNNNNNN/ with adapter/, config.json
    legacy = out / "checkpoints" / "step-00000002"
    legacy.parent.mkdir()
    (out / "checkpoint-2").rename(legacy)
    (legacy / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (legacy / name).rename(legacy / "adapter" / name)
        (out / name).unlink()
    (out / "train_config.json").rename(out / "config.json")
    resumed = tiny_run(tiny_model, tmp_path / "old", max_steps=4, resume=True, **constant)
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-5)
    assert [c.name for c in fnlm.train.list_checkpoints(out)] == ["step-00000002", "checkpoint-4"]
