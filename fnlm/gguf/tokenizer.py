"""The tokenizer inside a GGUF's metadata, as a `tokenizers.Tokenizer` and a tokenizer_config.

Built as transformers' GGUF tokenizer builder does, except where llama.cpp (which owns the
format) gives the metadata another meaning: the pre-tokenizer (`tokenizer.ggml.pre`) is cut as
llama.cpp cuts it (pretokenizers.py), so fnlm tokenizes a GGUF's text as llama.cpp does.
"""

from __future__ import annotations

from pathlib import Path

from fnlm.errors import TokenizerError, UnsupportedModelError
from fnlm.gguf.pretokenizers import PRE_TOKENIZERS

# ggml token types (llama.cpp's llama_token_type)
CONTROL_TOKEN, USER_DEFINED_TOKEN = 3, 4

TOKENIZER_TYPES = ("gpt2", "llama")

# `tokenizer.ggml.pre` -> the regexes llama.cpp cuts text with under that name (pretokenizers.py).
# A name not listed reads as GPT-2's byte-level split, as transformers reads every name it lacks.
PRE_TOKENIZER_SPLITS = {name: pre.splits for name, pre in PRE_TOKENIZERS.items()}


def hf_tokenizer(metadata: dict, gguf_path: Path | str = "<gguf>"):
    """`(tokenizers.Tokenizer, tokenizer_config dict)` for the tokenizer in the GGUF metadata.

    Built as transformers' GGUF tokenizer builder does: byte-level BPE for `gpt2` vocabularies
    (with the split regex of `tokenizer.ggml.pre`), sentencepiece-style BPE with byte fallback
    for `llama` ones; control tokens become special added tokens, user-defined ones plain added
    tokens; BOS/EOS are added by the post-processor as `add_bos_token`/`add_eos_token` say.
    """
    from tokenizers import AddedToken

    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind not in TOKENIZER_TYPES or not tokens:
        raise UnsupportedModelError(
            f"{gguf_path}: tokenizer type {kind!r} is not supported (supported: "
            f"{', '.join(TOKENIZER_TYPES)})"
            + ("" if tokens else "; the file has no tokenizer.ggml.tokens")
        )
    token_types = metadata.get("tokenizer.ggml.token_type") or []
    try:
        if kind == "gpt2":
            tokenizer = _byte_level_bpe(metadata)
        else:
            tokenizer = _sentencepiece_bpe(metadata)
    except Exception as e:  # the tokenizers library rejects malformed vocabularies or merges
        raise TokenizerError(f"{gguf_path}: cannot build its tokenizer: {e}") from None

    if kind == "gpt2":
        # In a byte-level vocabulary every real token is spelled in the byte alphabet; a control
        # token spelled otherwise is a llama.cpp mislabel, and transformers skips it.
        alphabet = set(_bytes_to_unicode().values())
        is_spelled = lambda token: set(token) <= alphabet
    else:
        is_spelled = lambda token: True
    control = [
        t for t, kind_ in zip(tokens, token_types) if kind_ == CONTROL_TOKEN and is_spelled(t)
    ]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tokenizer.get_vocab()
    user_defined = [
        t for t, k in zip(tokens, token_types) if k == USER_DEFINED_TOKEN and t in vocab
    ]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])

    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        config[f"{name}_token"] = tokens[token_id] if token_id is not None else None
    # transformers adds the named special tokens that are not added tokens yet (an sp <unk>).
    added = {str(t.content) for t in tokenizer.get_added_tokens_decoder().values()}
    for name in ("bos", "eos", "unk", "pad"):
        token = config[f"{name}_token"]
        if token is not None and token not in added:
            tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)])
            added.add(token)

    # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
    config["add_bos_token"] = bool(add_bos and config["bos_token"] is not None)
    config["add_eos_token"] = bool(add_eos and config["eos_token"] is not None)
    tokenizer.post_processor = _post_processor(tokenizer, config)
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    config["clean_up_tokenization_spaces"] = False
    return tokenizer, config


def _byte_level_bpe(metadata: dict):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens outside the byte alphabet (rare, hand-added ones) are respelled from their UTF-8
    # bytes, as transformers does.
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(metadata["tokenizer.ggml.tokens"])
    }
    merges = _merges(metadata, vocab)
    # llama.cpp's meaning of the name, not transformers': "smollm" cuts digits one by one, as
    # SmolLM2's own tokenizer.json does, and "llama-bpe" takes a word that is a token whole.
    pre = PRE_TOKENIZERS.get(metadata.get("tokenizer.ggml.pre"))
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=bool(pre and pre.ignore_merges),
        )
    )
    if pre is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                *(pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(metadata: dict):
    """SentencePiece BPE with byte fallback, cut as llama.cpp cuts it: no pre-tokenizer, spaces
    as ▁ and, with `tokenizer.ggml.add_space_prefix` (default true), a ▁ before the text and
    after every special token — Llama 2's and Mistral's own tokenizer.json (a Prepend
    normalizer). transformers' GGUF reader prepends to the first word only and ignores the key."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(metadata["tokenizer.ggml.tokens"])}
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges(metadata, vocab),
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    spaces = [normalizers.Replace(" ", "\u2581")]
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), *spaces] if prefix else spaces
    )
    pieces = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(
        [*pieces, decoders.Strip(content=" ", left=1, right=0)] if prefix else pieces
    )
    return tokenizer


def _merges(metadata: dict, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The file's merges, or (sentencepiece files list none) the ones its vocabulary and scores
    imply: every split of a token into two tokens, best score first (transformers'
    `generate_merges`)."""
    if "tokenizer.ggml.merges" in metadata:
        return [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:
        scored, reverse = vocab, False
    else:
        scored, reverse = dict(zip(metadata["tokenizer.ggml.tokens"], scores)), True
    merges = []
    for token, score in scored.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=reverse)
    return [(left, right) for left, right, _ in merges]


def _post_processor(tokenizer, config: dict):
    """BOS/EOS around every sequence, as transformers' `update_post_processor` writes it."""
    from tokenizers import processors

    bos, eos = config["bos_token"], config["eos_token"]
    use_bos, use_eos = config["add_bos_token"], config["add_eos_token"]
    single = f"{bos + ':0 ' if use_bos else ''}$A:0{' ' + eos + ':0' if use_eos else ''}"
    pair = (
        f"{single}{' ' + bos + ':1' if use_bos else ''} $B:1{' ' + eos + ':1' if use_eos else ''}"
    )
    special = []
    if use_bos:
        special.append((bos, tokenizer.token_to_id(bos)))
    if use_eos:
        special.append((eos, tokenizer.token_to_id(eos)))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}
