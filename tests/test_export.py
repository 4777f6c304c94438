"""fnlm.save against the readers people use: transformers (merged checkpoints and GGUF files), peft
(adapters), and fnlm.load itself; plus the bad targets (existing, unwritable, disk full).

Every tiny model is a random transformers model saved with save_pretrained (tests/models.py),
loaded into fnlm in fp32, given a LoRA whose B is perturbed (so the merge changes the logits),
exported, and read back by the reference, whose logits must equal `fnlm.forward(params, lora=...)`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import gguf
import numpy as np
import peft
import pytest
import torch
import torch.utils._pytree as pytree
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
import fnlm.export
import fnlm.lora
from fnlm import default
from fnlm.errors import ArgumentError, ExportError
from fnlm.params import leaf_paths
from tests.models import FP32_REL_TOL, HF_CONFIGS, hf_configs, max_rel_error, saved_checkpoint
from tests.tokenizer_fixtures import write_byte_level_bpe, write_metaspace_bpe

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no tokenizer.json"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

# Each architecture gets this many drawn configs (1 under the "ci" profile, 16 under "more").
EXAMPLES_PER_TYPE = max(1, settings.default.max_examples // 6)

# A GGUF f16 file holds each weight rounded to the nearest half (relative error <= 2^-11), and a
# Q8_0 file each block of 32 as int8 times an f16 scale absmax/127 (error <= absmax/254). What
# transformers reads from our file must equal fnlm's forward over exactly those weights (fnlm's
# reader dequantizes the same bytes): FP32_REL_TOL. Against the unrounded model the logits move by
# that rounding carried through the layers: about 2^-11 per layer for f16 (measured 3e-4 on the
# 2-layer models, 1.6e-3 on SmolLM2's 30 layers), about 1/254 per layer for Q8_0 (measured 3.7e-2
# on SmolLM2). The bounds below are those per-layer rates times (layers + 1) times 4.
F16_REL_TOL_PER_LAYER = 4 * 2.0**-11
Q8_0_REL_TOL_PER_LAYER = 4 / 254


def rounding_tol(per_layer: float, layers: int) -> float:
    return per_layer * (layers + 1)


def load_fp32(directory):
    return fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu")


def tokens_for(vocab: int, batch: int = 2, seq: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def perturbed(lora: fnlm.lora.Lora, seed: int = 1) -> fnlm.lora.Lora:
    """Every adapter tensor moved (B starts at zero), so the merge changes the model."""
    g = torch.Generator().manual_seed(seed)
    return pytree.tree_map(lambda t: t.detach() + 0.3 * torch.randn(t.shape, generator=g), lora)


def hf_load(directory, **kwargs):
    """transformers' from_pretrained in fp32, asserting it reported no missing, unexpected or
    mismatched weights and logged no warning."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, output_loading_info=True, **kwargs
        )
    finally:
        logger.removeHandler(handler)
    assert not any(info.values()), info
    assert not records, [r.getMessage() for r in records]
    return model.eval()


def file_names(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir())


def assert_no_temporary_files(directory: Path) -> None:
    assert not [n for n in file_names(directory) if n.endswith(".tmp")], file_names(directory)


# ---------------------------------------------------------------------------------------------
# the embedded model: SmolLM2-135M-Instruct, merged and as GGUF (first: the slowest tests, so
# pytest-xdist starts them while the other worker runs the rest)


@pytest.fixture(scope="module")
def smol():
    params, tok = load_fp32(None)
    return params, tok


SMOL_TEXT = "The capital of France is Paris. <|im_start|>user\nName a colour 123!<|im_end|>"


def test_smollm2_merged_with_tokenizer(smol, tmp_path):
    params, tok = smol
    lora = perturbed(fnlm.lora.init(params, r=2, targets=("q", "v", "down")), seed=2)
    lora = pytree.tree_map(lambda t: t * 0.1, lora)  # a nudge, not a different model
    fnlm.save(tmp_path, params, tok, lora=lora, format="merged")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(
        file_names(tmp_path)
    )
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eos_token_id == 2 and generation["bos_token_id"] == 1

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok(SMOL_TEXT).input_ids == tok.encode(SMOL_TEXT)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert hf_tok.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(
        chat, tokenize=False
    )
    tokens = torch.tensor([tok.encode(SMOL_TEXT)])
    with torch.no_grad():
        ours = fnlm.forward(params, tokens, lora=lora)
        assert max_rel_error(hf_load(tmp_path)(tokens).logits, ours) <= FP32_REL_TOL
        assert max_rel_error(ours, fnlm.forward(params, tokens)) > 10 * FP32_REL_TOL


def test_smollm2_gguf_f16_in_transformers_and_fnlm(smol, tmp_path):
    params, tok = smol
    path = fnlm.save(tmp_path, params, tok, format="gguf", gguf_type="f16")
    assert path == tmp_path / "model-f16.gguf" and file_names(tmp_path) == ["Modelfile", path.name]
    tokens = torch.tensor([tok.encode(SMOL_TEXT)])
    read_back, tok_back = load_fp32(path)
    assert tok_back.encode(SMOL_TEXT) == tok.encode(SMOL_TEXT)
    assert tok_back.chat_template == tok.chat_template
    for (_, ours), (_, back) in zip(leaf_paths(dict(params)), leaf_paths(dict(read_back))):
        assert torch.equal(back, ours.half().float() if ours.dim() == 2 else ours)
    with torch.no_grad():
        exact = fnlm.forward(params, tokens)
        rounded = fnlm.forward(read_back, tokens)
        ref = hf_load(tmp_path, gguf_file=path.name)(tokens).logits
    assert max_rel_error(ref, rounded) <= FP32_REL_TOL
    assert max_rel_error(rounded, exact) <= rounding_tol(F16_REL_TOL_PER_LAYER, 30)

    # read from a GGUF, written to one: the tokenizer metadata is the source file's, key for key
    # (add_eos_token is written where the source left llama.cpp's default, false, implied)
    source = tokenizer_metadata(Path(default.default_gguf()))
    written = tokenizer_metadata(path)
    assert written.pop("tokenizer.ggml.add_eos_token") is False
    assert written == source and source["tokenizer.ggml.pre"] == "smollm"


def tokenizer_metadata(path: Path) -> dict:
    fields = gguf.GGUFReader(path).fields
    return {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}


# ---------------------------------------------------------------------------------------------
# merged: transformers loads the directory, logits equal fnlm's with the adapters unmerged


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
@settings(max_examples=EXAMPLES_PER_TYPE)
@given(data=st.data())
def test_merged_loads_in_transformers_with_adapter_logits(model_type, data):
    config = data.draw(hf_configs(model_type))
    with saved_checkpoint(config) as (_, directory), tempfile.TemporaryDirectory() as out:
        params, _ = load_fp32(directory)
        targets = fnlm.lora.target_names(params.config)
        lora = perturbed(fnlm.lora.init(params, r=2, targets=tuple(targets)))
        fnlm.save(out, params, lora=lora, format="merged")
        assert file_names(out) == ["config.json", "generation_config.json", "model.safetensors"]

        tokens = tokens_for(params.config.vocab_size)
        with torch.no_grad():
            ours = fnlm.forward(params, tokens, lora=lora)
            ref = hf_load(out)(tokens).logits
            again = fnlm.forward(load_fp32(out)[0], tokens)
        assert max_rel_error(ref, ours) <= FP32_REL_TOL
        assert max_rel_error(again, ours) <= FP32_REL_TOL
        assert max_rel_error(ours, fnlm.forward(params, tokens)) > 10 * FP32_REL_TOL


def test_merged_shards_index_and_overwrite():
    """A small shard size gives several shards and an index that transformers and fnlm read; an
    overwrite with one shard removes the old shards and index."""
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.2,
    )  # fmt: skip
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params, _ = load_fp32(directory)
        fnlm.save(out, params, format="merged", shard_size="20KB")
        index = json.loads((Path(out) / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and shards[-1].endswith(f"of-{len(shards):05d}.safetensors")
        assert sorted(index["weight_map"]) == sorted(model.state_dict())
        assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
        for shard in shards:
            assert (Path(out) / shard).stat().st_size <= 20_000 + 1024  # + the shard's header
        tokens = tokens_for(96)
        with torch.no_grad():
            ours = fnlm.forward(params, tokens)
            assert max_rel_error(hf_load(out)(tokens).logits, ours) <= FP32_REL_TOL
            assert max_rel_error(fnlm.forward(load_fp32(out)[0], tokens), ours) <= FP32_REL_TOL

        fnlm.save(out, params, format="merged", dtype="bfloat16", overwrite=True)
        assert file_names(out) == ["config.json", "generation_config.json", "model.safetensors"]
        assert json.loads((Path(out) / "config.json").read_text())["dtype"] == "bfloat16"
        reloaded, _ = fnlm.load(out, quant=None, dtype=torch.bfloat16, device="cpu")
        assert torch.equal(reloaded["embed"], params["embed"].bfloat16())


def test_merged_nf4_base_uses_the_16bit_checkpoint_or_dequantizes(capsys):
    """An NF4 base + LoRA: merged into the checkpoint it was loaded from (exact: equals the fp32
    model with the same LoRA), or, with no checkpoint, into the dequantized weights (equals the
    NF4 model with the LoRA). A checkpoint of another model is refused."""
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.2,
    )  # fmt: skip
    with saved_checkpoint(config) as (_, directory), tempfile.TemporaryDirectory() as out:
        qparams, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
        dense, _ = load_fp32(directory)
        lora = perturbed(fnlm.lora.init(qparams, r=4, targets=fnlm.lora.ALL_LINEAR))
        tokens = tokens_for(96)

        fnlm.save(Path(out, "exact"), qparams, lora=lora)
        assert f"merging into the 16-bit weights of {directory}" in capsys.readouterr().out
        with torch.no_grad():
            ref = fnlm.forward(dense, tokens, lora=lora)
            assert max_rel_error(hf_load(Path(out, "exact"))(tokens).logits, ref) <= FP32_REL_TOL

        del qparams.source  # as after a tree map: no record of the checkpoint
        fnlm.save(Path(out, "dequantized"), qparams, lora=lora)
        assert "merging into the dequantized nf4 weights" in capsys.readouterr().out
        with torch.no_grad():
            ref = fnlm.forward(qparams, tokens, lora=lora)
            model = hf_load(Path(out, "dequantized"))
            assert max_rel_error(model(tokens).logits, ref) <= FP32_REL_TOL

        with saved_checkpoint(config, seed=1) as (_, other):
            with pytest.raises(ExportError, match=r"does not hold the weights of this model"):
                fnlm.save(Path(out, "wrong"), qparams, lora=lora, base=other)


# ---------------------------------------------------------------------------------------------
# gguf: tiny llama / mistral / qwen2 / qwen3 with real tokenizers, f16 and q8_0


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A byte-level BPE (Llama-3 style, 700 ids) and a SentencePiece-style BPE (Llama-2 style)."""
    byte_level = write_byte_level_bpe(tmp_path_factory.mktemp("byte_level"))
    metaspace = write_metaspace_bpe(tmp_path_factory.mktemp("metaspace"))
    from fnlm.tokenizer import Tokenizer

    return {
        "byte_level": Tokenizer.from_dir(byte_level),
        "metaspace": Tokenizer.from_dir(metaspace),
    }


GGUF_CASES = [
    ("llama", "byte_level", "f16"),
    ("llama", "byte_level", "q8_0"),
    ("mistral", "metaspace", "bf16"),
    ("qwen2", "byte_level", "f16"),
    ("qwen3", "byte_level", "q4_0"),
    ("llama", "byte_level", "q4_1"),
    ("mistral", "metaspace", "q5_0"),
    ("qwen2", "byte_level", "q5_1"),
]
GGUF_TEXT = "Hello world! The quick brown fox, 1234 cafés. <|eot_id|> 日本語 😀"


def tiny_config(model_type: str, vocab: int, seed: int):
    """A 2-layer model of `model_type` without a sliding window (GGUF llama has none). Qwen3 gets
    head_dim 128: transformers' GGUF loader ignores attention.key_length and keeps Qwen3Config's
    default (every real Qwen3 has 128)."""
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[model_type]
    return cls(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
        head_dim=128 if model_type == "qwen3" else 16,
        tie_word_embeddings=seed % 2 == 0, sliding_window=None, rope_theta=10000.0 * (seed + 1),
    )  # fmt: skip


@pytest.mark.parametrize("model_type,tokenizer,gguf_type", GGUF_CASES)
def test_gguf_in_transformers_and_fnlm(model_type, tokenizer, gguf_type, tokenizers, tmp_path):
    tok = tokenizers[tokenizer]
    config = tiny_config(model_type, tok.vocab_size + 4, seed=len(model_type))
    with saved_checkpoint(config) as (_, directory):
        params, _ = load_fp32(directory)
    # scale 1: the merged weights stay near the model's own, so the rounding bounds hold
    lora = perturbed(fnlm.lora.init(params, r=2, alpha=2, targets=("q", "k", "o", "up")))
    path = fnlm.save(
        tmp_path / "m.gguf", params, tok, lora=lora, format="gguf", gguf_type=gguf_type
    )

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    read_back, tok_back = load_fp32(path)
    ids = tok.encode(GGUF_TEXT)
    assert hf_tok(GGUF_TEXT).input_ids == ids and tok_back.encode(GGUF_TEXT) == ids
    assert tok_back.bos_token_id == tok.bos_token_id and tok_back.eos_token_id == tok.eos_token_id

    tokens = tokens_for(config.vocab_size)
    with torch.no_grad():
        exact = fnlm.forward(params, tokens, lora=lora)
        rounded = fnlm.forward(read_back, tokens)
        ref = hf_load(tmp_path, gguf_file=path.name)(tokens).logits
    assert max_rel_error(ref, rounded) <= FP32_REL_TOL
    per_layer = F16_REL_TOL_PER_LAYER if gguf_type == "f16" else Q8_0_REL_TOL_PER_LAYER
    if gguf_type in ("f16", "q8_0"):
        assert max_rel_error(rounded, exact) <= rounding_tol(per_layer, 2)
    assert max_rel_error(exact, fnlm.forward(params, tokens)) > 10 * FP32_REL_TOL
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_up.weight"] == gguf_type.upper()


def test_gguf_tokenizer_llama_cpp_would_read_otherwise(tmp_path, tokenizers):
    """A SentencePiece Metaspace that prepends to the first word only is written with a warning
    (llama.cpp prefixes a space after every special token); a byte-level pre-tokenizer llama.cpp
    has no name for is refused."""
    from tokenizers import pre_tokenizers

    from fnlm.tokenizer import Tokenizer

    vocab = max(tok.vocab_size for tok in tokenizers.values())
    config = tiny_config("llama", vocab + 4, seed=1)
    with saved_checkpoint(config) as (_, directory):
        params, _ = load_fp32(directory)
    with pytest.warns(UserWarning, match="after every special token"):
        fnlm.save(tmp_path / "sp.gguf", params, tokenizers["metaspace"], format="gguf")
    whitespace = Tokenizer.from_dir(write_byte_level_bpe(tmp_path / "ws"))
    whitespace.backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ExportError, match="llama.cpp has no pre-tokenizer that splits text as"):
        fnlm.save(tmp_path / "ws.gguf", params, whitespace, format="gguf")
    assert not (tmp_path / "ws.gguf").exists()


def test_gguf_refuses_what_it_cannot_hold(tmp_path, tokenizers):
    tok = tokenizers["byte_level"]
    ministral = transformers.MinistralConfig(  # llama.cpp has no (non-3) Ministral architecture
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=None,
        layer_types=["full_attention"],
    )  # fmt: skip
    with saved_checkpoint(ministral) as (_, directory):
        params, _ = load_fp32(directory)
    with pytest.raises(ExportError, match=r"GGUF export supports .*gemma.*; ministral is not one"):
        fnlm.save(tmp_path, params, tok, format="gguf")
    with pytest.raises(ArgumentError, match="needs tok="):
        fnlm.save(tmp_path, params, format="gguf")
    with pytest.raises(ArgumentError, match="gguf_type must be one of"):
        fnlm.save(tmp_path, params, tok, format="gguf", gguf_type="q5_k")
    assert file_names(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# adapter: from a training run to peft


def test_adapter_from_training_loads_in_peft(tmp_path, tokenizers):
    from tests.test_train import random_data, run_config
    from tests.test_train import tiny_config as train_config

    tok = tokenizers["byte_level"]
    with saved_checkpoint(train_config()) as (model, directory):
        params, _ = load_fp32(directory)
        config = run_config(tmp_path / "run", max_steps=3)
        result = fnlm.train.train(config, params=params, tokenizer=tok, data=random_data(n=8))
        out = fnlm.save(
            tmp_path / "adapter", result.params, tok, lora=result.lora, format="adapter"
        )
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(
            file_names(out)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = peft.PeftModel.from_pretrained(model, out).eval()
        tokens = tokens_for(96)
        with torch.no_grad():
            ours = fnlm.forward(result.params, tokens, lora=result.lora)
            assert max_rel_error(peft_model(tokens).logits, ours) <= FP32_REL_TOL
            assert max_rel_error(ours, fnlm.forward(params, tokens)) > 10 * FP32_REL_TOL
    assert transformers.AutoTokenizer.from_pretrained(out)(GGUF_TEXT).input_ids == tok.encode(
        GGUF_TEXT
    )


# ---------------------------------------------------------------------------------------------
# bad targets: clear errors, nothing partial under a final name


@pytest.fixture(scope="module")
def tiny(tokenizers):
    config = tiny_config("llama", tokenizers["byte_level"].vocab_size, seed=0)
    with saved_checkpoint(config) as (_, directory):
        params, _ = load_fp32(directory)
    return params, tokenizers["byte_level"]


def test_existing_directory_is_refused_without_overwrite(tiny, tmp_path):
    params, tok = tiny
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"exists and is not empty; pass overwrite=True"):
        fnlm.save(tmp_path, params, tok)
    assert file_names(tmp_path) == ["notes.txt"]
    (tmp_path / "model-f16.gguf").write_text("old")
    with pytest.raises(ExportError, match=r"model-f16.gguf exists"):
        fnlm.save(tmp_path / "model-f16.gguf", params, tok, format="gguf")
    with pytest.raises(ExportError, match="it is a file"):
        fnlm.save(tmp_path / "notes.txt", params, tok)
    fnlm.save(tmp_path, params, tok, overwrite=True)
    assert "model.safetensors" in file_names(tmp_path) and "notes.txt" in file_names(tmp_path)
    with pytest.raises(ArgumentError, match="format='adapter' needs lora"):
        fnlm.save(tmp_path / "a", params, tok, format="adapter")
    with pytest.raises(ArgumentError, match="shard_size must be"):
        fnlm.save(tmp_path / "b", params, tok, shard_size="lots")


def test_read_only_directory(tiny, tmp_path, monkeypatch):
    """A directory the user may not write into (as os.access reports it: CI runs as root, for whom
    chmod 0o500 would change nothing)."""
    params, tok = tiny
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(locked)))
    with pytest.raises(ExportError, match=r"locked: permission denied"):
        fnlm.save(locked, params, tok)
    with pytest.raises(ExportError, match=r"permission denied"):
        fnlm.save(locked / "sub", params, tok)
    assert file_names(locked) == ["sub"]  # only the directory asked for; nothing written in it
    assert file_names(locked / "sub") == []


def test_permission_error_while_writing(tiny, tmp_path, monkeypatch):
    """A temporary file that cannot be created (what a read-only directory gives a non-root user)."""
    params, tok = tiny

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ExportError, match=r"model.safetensors: permission denied"):
        fnlm.save(tmp_path, params, tok)
    assert file_names(tmp_path) == []


@pytest.mark.parametrize("format", ["merged", "gguf"])
def test_disk_full_mid_write_leaves_nothing(tiny, tmp_path, monkeypatch, format):
    """ENOSPC after some tensors were written: ExportError naming the file; no file under its final
    name, no temporary file left."""
    params, tok = tiny
    calls = {"n": 0}

    def full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    if format == "merged":
        original = fnlm.export.MergedWeights.__call__
        monkeypatch.setattr(fnlm.export.MergedWeights, "__call__", full)
        name = "model.safetensors"
    else:
        original = gguf.GGUFWriter.write_tensor_data
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
        name = "model-f16.gguf"
    with pytest.raises(ExportError, match=rf"{name}: the disk is full"):
        fnlm.save(tmp_path, params, tok, format=format)
    assert calls["n"] == 3
    assert name not in file_names(tmp_path)
    assert_no_temporary_files(tmp_path)
    assert not [n for n in file_names(tmp_path) if n.endswith((".safetensors", ".gguf"))]


def test_parse_size_and_plan_shards():
    assert fnlm.export.parse_size("5GB") == 5 * 10**9
    assert fnlm.export.parse_size("1.5MiB") == 3 * 2**19
    assert fnlm.export.parse_size(123) == 123
    sizes = {"a": 6, "b": 6, "c": 20, "d": 1}
    assert fnlm.export.plan_shards(sizes, 12) == [["a", "b"], ["c"], ["d"]]
    assert np.sum([len(s) for s in fnlm.export.plan_shards(sizes, 1)]) == 4


def test_export_script_merges_an_adapter(tmp_path, capsys):
    """scripts/export.py: base + PEFT adapter directory -> merged checkpoint with the adapter's logits."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "export_script", Path(__file__).resolve().parent.parent / "scripts" / "export.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = transformers.Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
    )  # fmt: skip
    with saved_checkpoint(config) as (_, directory):
        params, _ = load_fp32(directory)
        lora = perturbed(fnlm.lora.init(params, r=2, targets=("q", "v", "gate")))
        fnlm.lora.save(tmp_path / "adapter", lora)
        out = tmp_path / "merged"
        argv = [
            "--model",
            str(directory),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(out),
        ]
        assert script.main(argv) == 0
        assert f"wrote {out}" in capsys.readouterr().out
        assert script.main(["--model", str(directory), "--out", str(out)]) == 1
        assert "exists and is not empty" in capsys.readouterr().err
    tokens = tokens_for(96)
    with torch.no_grad():
        ours = fnlm.forward(params, tokens, lora=lora)
        assert max_rel_error(hf_load(out)(tokens).logits, ours) <= FP32_REL_TOL


def test_gguf_llama3_rope_scaling_round_trips(tokenizers, tmp_path):
    """Llama 3.x rope scaling goes into rope_freqs as llama.cpp writes it; fnlm's reader recovers
    the same scaling (transformers' GGUF loader ignores rope_freqs, so it is not the reference)."""
    tok = tokenizers["byte_level"]
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 2048}  # fmt: skip
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, initializer_range=0.2,
        max_position_embeddings=16384, rope_scaling=dict(rope), rope_theta=10000.0,
    )  # fmt: skip
    with saved_checkpoint(config) as (_, directory):
        params, _ = load_fp32(directory)
    assert params.config.rope["rope_type"] == "llama3"
    path = fnlm.save(tmp_path, params, tok, format="gguf", gguf_type="f16")
    read_back, _ = load_fp32(path)
    for key, value in rope.items():
        expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-4)
        assert read_back.config.rope[key] == expected, key
    tokens = tokens_for(tok.vocab_size)
    with torch.no_grad():
        error = max_rel_error(fnlm.forward(read_back, tokens), fnlm.forward(params, tokens))
    assert error <= rounding_tol(F16_REL_TOL_PER_LAYER, 2)


# ---------------------------------------------------------------------------------------------
# K-quants: handed to llama.cpp's llama-quantize (the real tool: tests/test_llamacpp.py)

STAND_IN_QUANTIZE = """#!{python}
import sys, pathlib
f16, out, kind = sys.argv[1:4]
assert pathlib.Path(f16).read_bytes()[:4] == b"GGUF"
if kind == "Q6_K":
    print("llama_model_quantize: failed to quantize: no space left", file=sys.stderr)
    sys.exit(1)
pathlib.Path(out).write_text(f"{{f16}}\\n{{kind}}")
"""


def test_k_quant_gguf_is_made_by_llama_quantize(tiny, tmp_path, monkeypatch):
    import sys

    params, tok = tiny
    tool = tmp_path / "llama-quantize"
    tool.write_text(STAND_IN_QUANTIZE.format(python=sys.executable))
    tool.chmod(0o755)
    monkeypatch.setenv("FNLM_LLAMA_QUANTIZE", str(tool))
    out = tmp_path / "out"
    path = fnlm.save(out, params, tok, format="gguf", gguf_type="q5_k_m")
    f16, kind = path.read_text().split("\n")
    assert path == out / "model-q5_k_m.gguf" and kind == "Q5_K_M"
    assert not Path(f16).exists()  # the f16 hand-off file is removed
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model-q5_k_m.gguf"]
    with pytest.raises(ExportError, match=r"(?s)failed to make q6_k .*no space left"):
        fnlm.save(out, params, tok, format="gguf", gguf_type="q6_k", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "Modelfile",
        "model-q5_k_m.gguf",
    ]  # nothing partial


def test_k_quant_without_llama_quantize_says_what_to_do(tiny, tmp_path, monkeypatch):
    params, tok = tiny
    monkeypatch.setenv("FNLM_LLAMA_QUANTIZE", str(tmp_path / "missing"))
    monkeypatch.setenv("FNLM_LLAMACPP_DIR", str(tmp_path / "no-build"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ExportError, match=r"llama-quantize, which was not found.*build_llamacpp"):
        fnlm.save(tmp_path / "out", params, tok, format="gguf", gguf_type="q4_k_m")
    assert not (tmp_path / "out").exists()
