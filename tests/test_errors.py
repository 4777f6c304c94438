"""Every bad input to loading gets an fnlm error naming the thing at fault.

Faults found by auditing fnlm as a user (lost work, silent wrong results, code run from a file,
raw tracebacks, misleading messages) are provoked in tests/test_faults.py, one section per point
of the audit (issue 20)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import fnlm
from fnlm.errors import (
    ArgumentError,
    CheckpointError,
    ConfigError,
    FnlmError,
    ModelNotFoundError,
    OfflineError,
    QuantError,
    UnsupportedModelError,
)
from tests.models import saved_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    with saved_checkpoint(transformers.LlamaConfig(**TINY)) as (_, saved):
        shutil.copytree(saved, directory, dirs_exist_ok=True)
    return directory


@pytest.fixture
def copy(checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def load(path, **kw):
    return fnlm.load(path, quant=None, dtype=torch.float32, device="cpu", **kw)


def test_all_errors_are_fnlm_errors():
    for cls in (
        CheckpointError,
        ConfigError,
        ModelNotFoundError,
        OfflineError,
        UnsupportedModelError,
    ):
        assert issubclass(cls, FnlmError)


def test_path_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="path not found"):
        load(tmp_path / "nope" / "model")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load(tmp_path)


def test_hub_unreachable_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError, match="fnlm-test/never-downloaded.*HF_HUB_OFFLINE"):
        load("fnlm-test/never-downloaded")


def test_invalid_hub_id():
    with pytest.raises(ModelNotFoundError, match="not a valid hub id"):
        load("not a/valid id")


def test_config_without_model_type(copy):
    cfg = json.loads((copy / "config.json").read_text())
    del cfg["model_type"]
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config.json has no 'model_type'"):
        load(copy)


def test_unsupported_model_type_lists_supported(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UnsupportedModelError, match="'mamba' is not supported; supported: .*llama.*qwen3"
    ):
        load(copy)


def test_config_not_json(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load(copy)


def test_missing_tensor_is_named(copy):
    weights = load_file(copy / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*\(48, 32\)"):
        load(copy)


def test_wrong_shape_names_both_shapes(copy):
    weights = load_file(copy / "model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*\(8, 32\).*expected \(16, 32\)"):
        load(copy)


def test_truncated_safetensors_names_file(copy):
    f = copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        load(copy)


def test_garbage_safetensors_names_file(copy):
    (copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        load(copy)


def test_unknown_quant_mode(copy):
    with pytest.raises(QuantError, match="'nf3'"):
        fnlm.load(copy, quant="nf3")


def test_unknown_dtype(copy):
    with pytest.raises(ConfigError, match="dtype must be one of"):
        fnlm.load(copy, quant=None, dtype="float8")


def test_tokens_out_of_vocabulary(checkpoint):
    params, _ = load(checkpoint)
    with pytest.raises(ArgumentError, match=r"\[0, 64\)"):
        fnlm.forward(params, torch.tensor([[1, 64]]))
    with pytest.raises(ArgumentError, match="integer tensor"):
        fnlm.forward(params, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("depth", [1, 3])
def test_read_ahead_keeps_order_and_names_a_truncated_file(copy, depth):
    """The GPU loader's read-ahead (worker threads copying into pinned memory; a CPU clone here)
    yields every tensor of the stream, in order and equal, and still names a truncated file."""
    from fnlm.load import pinned_ahead, stream_tensors, weight_files

    files = weight_files(copy)
    plain = [(n, t.clone()) for n, t, _ in stream_tensors(files)]
    ahead = [(n, t) for n, t, _ in pinned_ahead(stream_tensors(files), depth, torch.Tensor.clone)]
    assert [n for n, _ in ahead] == [n for n, _ in plain]
    assert all(torch.equal(t, u) for (_, t), (_, u) in zip(ahead, plain))
    shard = files[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=shard.name):
        list(pinned_ahead(stream_tensors(files), depth, torch.Tensor.clone))
