"""Hub resolution without a network: huggingface_hub's download functions stood in by fakes that
serve a repository from a dict, so what fnlm asks the hub for is what the tests check."""

from __future__ import annotations

import json
from fnmatch import fnmatch

import huggingface_hub as hf
import pytest
from huggingface_hub import errors

from fnlm import hub
from fnlm.errors import ModelNotFoundError

MISTRAL_LIKE = {
    "config.json": "{}",
    "tokenizer.json": "{}",
    "model.safetensors.index.json": json.dumps(
        {
            "weight_map": {
                "a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors",
            }
        }  # fmt: skip
    ),
    "model-00001-of-00002.safetensors": "shard",
    "model-00002-of-00002.safetensors": "shard",
    "consolidated.safetensors": "the same weights again",
    "pytorch_model.bin": "never read",
}


def fake_hub(monkeypatch, tmp_path, repo: dict):
    asked = []

    def snapshot_download(repo_id, revision=None, token=None, allow_patterns=None):
        asked.append(list(allow_patterns))
        out = tmp_path / "cache" / repo_id
        out.mkdir(parents=True, exist_ok=True)
        for name, text in repo.items():
            if any(fnmatch(name, pattern) for pattern in allow_patterns):
                (out / name).write_text(text)
        return str(out)

    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    return asked


def test_only_the_weights_the_index_lists_are_downloaded(monkeypatch, tmp_path):
    asked = fake_hub(monkeypatch, tmp_path, MISTRAL_LIKE)
    local = hub.resolve("org/mistral-like", revision="main")
    assert sorted(p.name for p in local.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json",
    ]  # fmt: skip
    assert not any(fnmatch("consolidated.safetensors", p) for p in asked[0] + asked[1])


def test_without_an_index_every_safetensors_file_is_downloaded(monkeypatch, tmp_path):
    repo = {"config.json": "{}", "model.safetensors": "weights", "pytorch_model.bin": "no"}
    fake_hub(monkeypatch, tmp_path, repo)
    local = hub.resolve("org/small")
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]


def test_a_hub_gguf_is_named_repo_and_file(monkeypatch, tmp_path):
    gguf_file = tmp_path / "model-q4_k_m.gguf"
    gguf_file.write_bytes(b"GGUF")
    asked = []

    def hf_hub_download(repo_id, filename, revision=None, token=None):
        asked.append((repo_id, filename, revision))
        if filename != gguf_file.name:
            raise errors.EntryNotFoundError(f"404: {filename}")
        return str(gguf_file)

    monkeypatch.setattr(hf, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(hub, "_gguf_checkpoint", lambda path: path)  # conversion: test_gguf
    assert hub.resolve("org/name-GGUF/model-q4_k_m.gguf", revision="v1") == gguf_file
    assert asked == [("org/name-GGUF", "model-q4_k_m.gguf", "v1")]
    with pytest.raises(ModelNotFoundError, match=r"org/name-GGUF has no file 'other.gguf'"):
        hub.resolve("org/name-GGUF/other.gguf")
    with pytest.raises(ModelNotFoundError, match=r"GGUF file not found: .*org/name/file.gguf"):
        hub.resolve("./org/name/file.gguf")


def test_info_on_a_hub_id_downloads_no_weights(monkeypatch, tmp_path):
    from transformers import LlamaConfig

    from fnlm.cli.info import checkpoint_info

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    ).to_json_string()  # fmt: skip
    index = json.loads(MISTRAL_LIKE["model.safetensors.index.json"])
    index["metadata"] = {"total_size": 3 * 2**30}
    repo = {
        **MISTRAL_LIKE,
        "config.json": config,
        "model.safetensors.index.json": json.dumps(index),
    }
    repo.pop("tokenizer.json")
    asked = fake_hub(monkeypatch, tmp_path, repo)
    info = checkpoint_info("org/mistral-like")
    assert asked == [[p for p in hub.HUB_FILES if p != "*.safetensors"]]
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    assert info["family"] == "llama" and info["layers"] == 2
    assert info["weights"] == "not downloaded (2 safetensors shards, 3.0 GB)"
    assert "files" not in info and "size_on_disk" not in info
