"""`tokenizer.ggml.pre`: llama.cpp's meaning of each name, read and written (fnlm.gguf.pretokenizers):
the name the exporter gives each family's split, and the converter's reading of every name.
Split from tests/test_gguf.py."""

from __future__ import annotations

import json

import pytest

from fnlm.gguf.pretokenizers import PRE_TOKENIZERS, pre_tokenizer_name
from fnlm.gguf.tokenizer import hf_tokenizer
from tests.test_gguf import byte_level_vocab


def pre_tokenizer_json(*parts) -> dict:
    """A tokenizer.json `pre_tokenizer`, serialized by the tokenizers library itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = parts[0] if len(parts) == 1 else pre_tokenizers.Sequence(list(parts))
    return json.loads(backend.to_str())["pre_tokenizer"]


def family_pre_tokenizers():
    """(checkpoint, its tokenizer.json pre_tokenizer, BPE ignore_merges,
    clean_up_tokenization_spaces, the name llama.cpp's convert_hf_to_gguf.py gives it)."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    from fnlm.gguf import pretokenizers as p

    def split(regex):
        return pt.Split(Regex(regex), behavior="isolated")

    bytes_only = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    digits = pt.Digits(individual_digits=True)
    return [
        ("Llama 3.x", pre_tokenizer_json(split(p.LLAMA3_SPLIT), bytes_only), True, True, "llama-bpe"),
        ("Qwen2 / 2.5 / 3", pre_tokenizer_json(split(p.QWEN2_SPLIT), bytes_only), False, False, "qwen2"),
        ("Qwen3.5", pre_tokenizer_json(split(p.QWEN35_SPLIT), bytes_only), False, False, "qwen35"),
        ("SmolLM / SmolLM2", pre_tokenizer_json(digits, pt.ByteLevel(add_prefix_space=False)), False, False, "smollm"),
        ("StarCoder2", pre_tokenizer_json(digits, pt.ByteLevel(add_prefix_space=False)), False, True, "starcoder"),
        ("GPT-2", pre_tokenizer_json(pt.ByteLevel(add_prefix_space=False)), False, True, "gpt-2"),
        ("Mistral Nemo", pre_tokenizer_json(split(p.TEKKEN_SPLIT), bytes_only), True, False, "tekken"),
        ("GPT-4o style (Phi-4-mini)", pre_tokenizer_json(split(p.GPT4O_SPLIT), bytes_only), False, False, "gpt-4o"),
        # tests/tokenizer_fixtures.py's byte-level BPE: Llama 3's split, merges never skipped
        ("DBRX", pre_tokenizer_json(split(p.LLAMA3_SPLIT), bytes_only), False, True, "dbrx"),
        ("BERT-style whitespace", pre_tokenizer_json(pt.Whitespace()), False, True, None),
        ("prefix space", pre_tokenizer_json(pt.ByteLevel(add_prefix_space=True)), False, True, None),
    ]  # fmt: skip


def test_pre_tokenizer_name_per_family():
    for checkpoint, spec, ignore_merges, clean, expected in family_pre_tokenizers():
        name = pre_tokenizer_name(spec, ignore_merges=ignore_merges, clean_spaces=clean)
        assert name == expected, checkpoint


@pytest.mark.parametrize("name", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_name_is_read_and_written_with_its_meaning(name):
    vocab = byte_level_vocab()
    metadata = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": name,
        "tokenizer.ggml.tokens": vocab["tokens"], "tokenizer.ggml.token_type": vocab["types"],
        "tokenizer.ggml.merges": vocab["merges"], "tokenizer.ggml.eos_token_id": 0,
    }  # fmt: skip
    tokenizer, config = hf_tokenizer(metadata)
    spec = json.loads(tokenizer.to_str())
    meaning = PRE_TOKENIZERS[name]
    assert spec["model"]["ignore_merges"] == meaning.ignore_merges
    written = pre_tokenizer_name(
        spec["pre_tokenizer"],
        ignore_merges=meaning.ignore_merges,
        clean_spaces=meaning.clean_spaces,
    )
    assert PRE_TOKENIZERS[written] == meaning
    first_of_its_meaning = next(n for n, m in PRE_TOKENIZERS.items() if m == meaning)
    assert written == first_of_its_meaning
    # fnlm's reader writes clean_up_tokenization_spaces False: a name of that meaning comes back
    back = pre_tokenizer_name(
        spec["pre_tokenizer"], ignore_merges=meaning.ignore_merges, clean_spaces=False
    )
    assert PRE_TOKENIZERS[back].splits == meaning.splits


def test_llama_cpp_default_is_not_gpt2_split():
    """The name the exporter used to write: llama.cpp cuts punctuation runs and digits apart
    under it, which is what broke ` (` and `Earth's` in llama.cpp (issue 21)."""
    vocab = byte_level_vocab()
    metadata = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": vocab["tokens"],
        "tokenizer.ggml.token_type": vocab["types"], "tokenizer.ggml.merges": vocab["merges"],
    }  # fmt: skip
    pieces = {}
    for name in ("default", "gpt-2"):
        tokenizer, _ = hf_tokenizer({**metadata, "tokenizer.ggml.pre": name})
        pieces[name] = [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str("Earth's (x) 1234")]
    assert pieces["gpt-2"] == ["Earth", "'s", "Ġ(", "x", ")", "Ġ1234"]
    assert pieces["default"] == ["Earth", "'", "s", "Ġ", "(", "x", ")", "Ġ", "123", "4"]
