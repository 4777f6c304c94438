"""GGUF export of every family llama.cpp runs: each tiny model (tests/gguf_families.py) written as
f16 and read back by transformers' GGUF loader where it knows the architecture, with the model's
logits; the metadata and tensor layout checked against llama.cpp's names; the refusals.
llama.cpp itself runs these files in tests/test_llamacpp.py."""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers

import fnlm
from fnlm.errors import ExportError
from fnlm.gguf import GGUF_ARCHITECTURES
from tests.gguf_families import FAMILIES, family_config, family_tokenizer, save_rounded
from tests.models import FP32_REL_TOL, max_rel_error

# transformers' GGUF loader (integrations/ggml.py) knows gemma2, gemma3, phi3, qwen2_moe,
# qwen3_moe and starcoder2, but reads only some of their keys (it keeps its config defaults for
# Gemma's soft-caps and query_pre_attn_scalar, Gemma3's layer pattern and local rope base, Phi-3's
# partial rotary, the MoE expert widths): of these tiny models it reads StarCoder2 whole. llama.cpp
# runs every family in tests/test_llamacpp.py.
TRANSFORMERS_READS = {"starcoder2"}
TEXT = "Hello world! The quick brown fox, 1234. def f(x):\n    return x"


def load_fp32(path):
    return fnlm.load(path, quant=None, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return family_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """family -> (fnlm params of the rounded checkpoint, the f16 export)."""
    built = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        directory = save_rounded(family_config(family, tok.vocab_size), root / "hf")
        params, _ = load_fp32(directory)
        built[family] = params, fnlm.save(root / f"{family}.gguf", params, tok, format="gguf")
    return built


@pytest.mark.parametrize("family", FAMILIES)
def test_family_metadata_and_tensors(exported, family):
    params, path = exported[family]
    config = params.config
    reader = gguf.GGUFReader(path)
    arch = GGUF_ARCHITECTURES[config.model_type]
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == arch
    # every tensor is one llama.cpp's architecture has (gguf's own list of its tensors)
    kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    allowed = {
        gguf.TENSOR_NAMES[t].format(bid=i)
        for t in gguf.MODEL_TENSORS[kind]
        for i in range(config.num_layers)
    }
    assert {t.name.rsplit(".", 1)[0] for t in reader.tensors} <= allowed
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert all(kind == gguf.GGMLQuantizationType.F32 for n, kind in types.items() if "norm" in n)
    if config.num_experts:
        assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
        stacked = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_exps.weight")
        assert int(stacked.shape[-1]) == config.num_experts


@pytest.mark.parametrize("family", sorted(TRANSFORMERS_READS))
def test_family_in_transformers_gguf_loader(exported, tok, family):
    params, path = exported[family]
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokens = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        ours = fnlm.forward(params, tokens)
        theirs = ref(tokens).logits
    assert max_rel_error(theirs, ours) <= FP32_REL_TOL


def test_a_family_llama_cpp_lacks_is_refused_with_the_list(tok, tmp_path):
    config = transformers.FalconConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        new_decoder_architecture=True, num_kv_heads=1,
    )  # fmt: skip
    params, _ = load_fp32(save_rounded(config, tmp_path / "falcon"))
    with pytest.raises(ExportError, match=r"GGUF export supports .*gemma2.*; falcon is not"):
        fnlm.save(tmp_path / "f.gguf", params, tok, format="gguf")
    assert not (tmp_path / "f.gguf").exists()


@pytest.mark.parametrize(
    "family,change,message",
    [
        ("gemma2", {"query_pre_attn_scalar": 32}, r"attention_scale=0\.17.*computes 0\.25"),
        ("gemma2", {"tie_word_embeddings": False}, r"an lm_head of its own"),
        ("qwen2_moe", {"norm_topk_prob": True}, r"router weights renormalized"),
        ("qwen3_moe", {"mlp_only_layers": [1]}, r"dense MLP layers between the MoE layers"),
        ("smollm3", {"no_rope_layers": [1, 0, 1, 0]}, r"nope_layers=\(1, 3\).*computes \(3,\)"),
    ],
)
def test_what_llama_cpp_would_compute_differently_is_refused(tok, tmp_path, family, change,
                                                             message):  # fmt: skip
    config = family_config(family, tok.vocab_size)
    for key, value in change.items():
        setattr(config, key, value)
    params, _ = load_fp32(save_rounded(config, tmp_path / family))
    with pytest.raises(ExportError, match=message):
        fnlm.save(tmp_path / "f.gguf", params, tok, format="gguf")
