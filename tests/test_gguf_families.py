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


def _field(reader, key):
    return reader.fields[key].contents()


def test_falcon_qkv_in_llama_cpps_layout(exported):
    """Falcon-40B's qkv rows, grouped per kv head, written q heads, then k, then v; its two norms
    as attn_norm (ln_mlp, both branches' in llama.cpp) and attn_norm_2 (ln_attn)."""
    params, path = exported["falcon"]
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert _field(reader, "falcon.attention.head_count_kv") == 2
    assert {"blk.0.attn_norm.weight", "blk.0.attn_norm_2.bias"} <= set(tensors)
    qkv = torch.from_numpy(tensors["blk.1.attn_qkv.weight"].data.astype("float32"))
    hf = params["layers"][1]["attn"]["qkv"].float()  # [q q k v] per kv group of 2 heads
    groups = hf.reshape(2, 4, 16, 64)
    want = torch.cat([groups[:, :2].reshape(-1, 64), groups[:, 2].reshape(-1, 64),
                      groups[:, 3].reshape(-1, 64)])  # fmt: skip
    assert torch.equal(qkv, want)
    norm = torch.from_numpy(tensors["blk.1.attn_norm.weight"].data)
    assert torch.equal(norm, params["layers"][1]["norm_mlp"].float())


def test_gpt_oss_experts_sinks_and_yarn(exported):
    """gpt-oss's 16-bit experts as convert_hf_to_gguf writes them: gate_up split into gate and up
    stacks [E, I, H] (ggml shape [H, I, E]), per-expert biases F32, sinks, the window pattern and
    yarn keys."""
    params, path = exported["gpt_oss"]
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {n: [int(d) for d in t.shape] for n, t in tensors.items()}
    assert shapes["blk.0.ffn_gate_exps.weight"] == [64, 32, 4]
    assert shapes["blk.0.ffn_up_exps.weight"] == [64, 32, 4]
    assert shapes["blk.0.ffn_down_exps.weight"] == [32, 64, 4]
    assert shapes["blk.0.ffn_gate_exps.bias"] == [32, 4]
    assert shapes["blk.0.attn_sinks.weight"] == [4]
    assert tensors["blk.0.ffn_up_exps.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    mlp = params["layers"][2]["mlp"]
    up = torch.from_numpy(tensors["blk.2.ffn_up_exps.weight"].data.astype("float32"))
    assert torch.equal(up, mlp["experts"]["gate_up"][:, 32:].float())  # fnlm: gate rows, then up
    down = torch.from_numpy(tensors["blk.2.ffn_down_exps.weight"].data.astype("float32"))
    assert torch.equal(down, mlp["experts"]["down"].float())
    gate_bias = torch.from_numpy(tensors["blk.2.ffn_gate_exps.bias"].data)
    assert torch.equal(gate_bias, mlp["experts_gate_up_bias"][:, :32].float())
    assert _field(reader, "gpt-oss.attention.sliding_window_pattern") == [True, False] * 2
    assert _field(reader, "gpt-oss.rope.scaling.type") == "yarn"
    assert _field(reader, "gpt-oss.rope.scaling.original_context_length") == 256


def test_gpt_oss_unrounded_yarn_is_written_with_a_warning(tok, tmp_path):
    """OpenAI's gpt-oss configs say truncate: false; llama.cpp rounds the ramp ends regardless."""
    config = family_config("gpt_oss", tok.vocab_size)
    config.rope_parameters["truncate"] = False
    params, _ = load_fp32(save_rounded(config, tmp_path / "gpt_oss"))
    with pytest.warns(UserWarning, match=r"rounds yarn's ramp ends.*truncate: false"):
        fnlm.save(tmp_path / "f.gguf", params, tok, format="gguf")
    assert (tmp_path / "f.gguf").exists()


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
    # llama.cpp's converter has no MinistralForCausalLM (only Ministral3ForCausalLM, Mistral 3)
    config = transformers.MinistralConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=None,
        layer_types=["full_attention"] * 2,
    )  # fmt: skip
    params, _ = load_fp32(save_rounded(config, tmp_path / "ministral"))
    with pytest.raises(ExportError, match=r"GGUF export supports .*gemma2.*; ministral is not"):
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
        ("falcon", {"bias": True}, r"attention_bias=True \(llama.cpp's falcon computes False"),
        ("falcon_7b", {"parallel_attn": False}, r"parallel_block=False"),
        ("gpt_oss", {"tie_word_embeddings": True}, r"a tied lm head"),
        ("gpt_oss", {"swiglu_limit": 5.0}, r"glu_limit=5\.0 \(llama.cpp's gpt-oss computes 7\.0"),
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
