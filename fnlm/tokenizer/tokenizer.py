"""The tokenizer: a checkpoint's `tokenizer.json` and its config files, read without transformers.

`Tokenizer.from_dir` reads the files a Hugging Face checkpoint ships (tokenizer.json,
tokenizer_config.json, special_tokens_map.json, chat_template.jinja, generation_config.json) and
interprets them the way transformers' `PreTrainedTokenizerFast` (v5: `TokenizersBackend`) does:
the same special tokens added to the `tokenizers` backend, the same ids from `encode`, the same
text from `decode`, and the same chat-template rendering (same Jinja environment, filters and
globals). transformers is the reference in the tests, never a dependency here.

    tok = Tokenizer.from_dir("path/to/checkpoint")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                  add_generation_prompt=True, tokenize=True)
    batch = tok(["a", "longer text"])           # left-padded int64 input_ids + attention_mask
"""

from __future__ import annotations

import json
import operator
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from fnlm.errors import ArgumentError, TokenizerError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# The named special tokens of transformers' PreTrainedTokenizerBase, in its order.
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# Pad tokens people expect when a checkpoint names none, best first: Llama-3.1's reserved pad,
# the usual pad spellings, GPT-style end-of-text (an eos only in base models, so it is skipped
# where it is the eos), SentencePiece's unk (the common choice for Llama-2 / Mistral) and
# Llama-3.0's first reserved token. A candidate must be in the vocabulary and not an eos id.
PAD_TOKEN_CANDIDATES = (
    "<|finetune_right_pad_id|>",
    "<|pad|>",
    "<pad>",
    "[PAD]",
    "<|PAD_TOKEN|>",
    "<|endoftext|>",
    "<unk>",
    "<|reserved_special_token_0|>",
)

# transformers writes model_max_length = int(1e30) for "no limit" and treats anything above
# int(1e20) as unset.
UNLIMITED_MODEL_MAX_LENGTH = int(1e30)
_UNSET_MAX_LENGTH_THRESHOLD = int(1e20)

# Chat templates come from the Hub and are untrusted code; older jinja2 has sandbox escapes, which
# is why transformers refuses to render with anything below 3.1.6. So do we.
_MIN_JINJA_VERSION = (3, 1, 6)


class Tokenizer:
    """A checkpoint's tokenizer: `tokenizers` backend + special tokens + chat template.

    Build it with `Tokenizer.from_dir(path)`. Attributes: `bos_token`/`bos_token_id`,
    `eos_token`/`eos_token_id`, `eos_token_ids` (tokenizer eos plus generation_config eos ids),
    `pad_token`/`pad_token_id` (chosen when the checkpoint has none, see `from_dir`),
    `unk_token`/`unk_token_id`, `special_tokens_map`, `extra_special_tokens`, `all_special_ids`,
    `chat_template`, `model_max_length` (None when unset), `vocab_size` (ids run 0..vocab_size-1,
    added tokens included), `add_bos_token`/`add_eos_token` (what `encode` adds), `backend`.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str | AddedToken] | None = None,
        extra_special_tokens: Sequence[str | AddedToken] = (),
        chat_template: str | Mapping[str, str] | None = None,
        model_max_length: int | None = None,
        generation_eos_token_ids: Sequence[int] = (),
        generation_pad_token_id: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        truncation_side: str = "right",
        name_or_path: str = "",
    ):
        """Wrap a ready `tokenizers.Tokenizer`; most callers want `Tokenizer.from_dir`.

        `special_tokens` maps names (bos_token, eos_token, ..., and model-specific ones like
        image_token) to tokens that must already be in `backend`'s vocabulary. Raises
        TokenizerError when one is not.
        """
        self.backend = backend
        self.name_or_path = str(name_or_path)
        self._special_tokens = dict(special_tokens or {})
        self._extra_special_tokens = list(extra_special_tokens)
        self.chat_template = (
            dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        )
        self.model_max_length = (
            model_max_length
            if model_max_length is not None and model_max_length <= _UNSET_MAX_LENGTH_THRESHOLD
            else None
        )
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        if truncation_side not in ("left", "right"):
            raise TokenizerError(
                f"{self._where()}: truncation_side must be 'left' or 'right', got {truncation_side!r}"
            )
        self.truncation_side = truncation_side
        for name, token in self.special_tokens_map.items():
            if backend.token_to_id(token) is None:
                raise TokenizerError(
                    f"{self._where()}: {name} {token!r} is not in the vocabulary of the tokenizer"
                )

        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        eos_ids = [self.eos_token_id] + [int(i) for i in generation_eos_token_ids]
        self.eos_token_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))

        self._checkpoint_pad_token = self._special_tokens.get("pad_token")
        self.pad_token, self.pad_token_id = self._choose_pad_token(generation_pad_token_id)

        # What `encode(..., add_special_tokens=True)` adds, read off the post-processor.
        plain = backend.encode("a", add_special_tokens=False).ids
        full = backend.encode("a", add_special_tokens=True).ids
        self.add_bos_token = (
            self.bos_token_id is not None
            and len(full) > len(plain)
            and full[0] == self.bos_token_id
        )
        self.add_eos_token = (
            self.eos_token_id is not None
            and len(full) > len(plain)
            and full[-1] == self.eos_token_id
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a checkpoint directory's tokenizer the way transformers' AutoTokenizer does.

        Reads tokenizer.json (required) and, when present, tokenizer_config.json,
        special_tokens_map.json (legacy; only used when tokenizer_config.json has no
        added_tokens_decoder), added_tokens.json (legacy), chat_template.jinja and
        additional_chat_templates/*.jinja (which take priority over tokenizer_config.json's chat_template),
        chat_template.json (a last resort, as processors save it) and generation_config.json
        (extra eos ids; its pad_token_id is a pad fallback).

        As in transformers v5, add_bos_token / add_eos_token in tokenizer_config.json do not
        change encoding when tokenizer.json exists: its post-processor decides.

        If the checkpoint names no pad token, one is chosen (generation_config's pad_token_id,
        else the first of PAD_TOKEN_CANDIDATES in the vocabulary that is not an eos, else the
        eos) and a warning says which.

        Raises TokenizerError naming the file when a file is missing or malformed.
        """
        directory = Path(path)
        if not directory.is_dir():
            what = "is a file, not a directory" if directory.exists() else "does not exist"
            raise TokenizerError(
                f"tokenizer directory {str(directory)!r} {what}; pass the checkpoint directory "
                f"that holds {TOKENIZER_FILE}"
            )
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise TokenizerError(
                f"{tokenizer_file} is missing: fnlm needs the fast-tokenizer file {TOKENIZER_FILE} "
                "(re-save the tokenizer with transformers' save_pretrained to produce it)"
            )
        tokenizer_json = _read_json(tokenizer_file)
        if not isinstance(tokenizer_json, dict) or "model" not in tokenizer_json:
            raise TokenizerError(
                f"{tokenizer_file} is not a tokenizers file: it has no 'model' entry"
            )
        try:
            backend = BackendTokenizer.from_str(json.dumps(tokenizer_json))
        except Exception as error:
            raise TokenizerError(
                f"{tokenizer_file} could not be read by the tokenizers library: {error}"
            ) from error

        config = _read_json_object(directory / TOKENIZER_CONFIG_FILE, default={})
        init = dict(config)
        for key in ("tokenizer_class", "init_inputs", "add_bos_token", "add_eos_token"):
            init.pop(key, None)

        templates = _read_chat_templates(directory)
        if templates:
            init["chat_template"] = (
                templates["default"] if list(templates) == ["default"] else templates
            )
        elif init.get("chat_template") is None:
            template_json = _read_json_object(directory / CHAT_TEMPLATE_JSON_FILE, default={})
            if template_json.get("chat_template") is not None:
                init["chat_template"] = template_json["chat_template"]

        if "additional_special_tokens" in init and not init.get("extra_special_tokens"):
            init["extra_special_tokens"] = init.pop("additional_special_tokens")
        model_specific = {
            key: init.pop(key)
            for key in list(init)
            if key not in NAMED_SPECIAL_TOKENS
            and key.endswith("_token")
            and isinstance(init[key], str)
        }
        if isinstance(init.get("extra_special_tokens"), dict):
            model_specific.update(init.pop("extra_special_tokens"))

        # Tokens that transformers re-adds to the backend, and the map used to keep a named
        # token's flags (lstrip, normalized...) when the config names it by its string.
        added_tokens_decoder: dict[int, AddedToken] = {}
        if "added_tokens_decoder" in init:
            for index, token in init.pop("added_tokens_decoder").items():
                added_tokens_decoder[int(index)] = _as_added_token(
                    token, directory / TOKENIZER_CONFIG_FILE
                )
        else:
            special_map_file = directory / SPECIAL_TOKENS_MAP_FILE
            for key, value in _read_json_object(special_map_file, default={}).items():
                if isinstance(value, dict) and key != "extra_special_tokens":
                    value = {k: v for k, v in value.items() if k != "special"}
                    value = _as_added_token({**value, "special": True}, special_map_file)
                elif key == "extra_special_tokens" and isinstance(value, list):
                    merged = list(init.get("extra_special_tokens") or [])
                    for token in value:
                        token = (
                            _as_added_token({**token, "special": True}, special_map_file)
                            if isinstance(token, dict)
                            else token
                        )
                        if token not in merged:
                            merged.append(token)
                    value = merged
                init[key] = value
            if isinstance(init.get("extra_special_tokens"), dict):
                model_specific.update(init.pop("extra_special_tokens"))
            legacy_added = _read_json_object(directory / ADDED_TOKENS_FILE, default={})
            if legacy_added:
                named = {str(_token_content(init[k])) for k in NAMED_SPECIAL_TOKENS if init.get(k)}
                named |= {str(_token_content(t)) for t in init.get("extra_special_tokens") or []}
                for content, index in legacy_added.items():
                    special = content in named
                    added_tokens_decoder[int(index)] = AddedToken(
                        content, normalized=not special, special=special
                    )
            for token in tokenizer_json.get("added_tokens") or []:
                fields = {k: v for k, v in token.items() if k != "id"}
                added_tokens_decoder[int(token["id"])] = AddedToken(**fields)

        init = _convert_typed_added_tokens(init, directory / TOKENIZER_CONFIG_FILE)
        if "additional_special_tokens" in init and "extra_special_tokens" not in init:
            init["extra_special_tokens"] = init.pop("additional_special_tokens")
        for key in list(init):
            if (
                key not in NAMED_SPECIAL_TOKENS
                and key.endswith("_token")
                and isinstance(init[key], AddedToken)
            ):
                model_specific[key] = init.pop(key)
        padding = backend.padding
        if padding is not None and "pad_token" not in init and padding.get("pad_token"):
            # transformers takes the pad token of a tokenizer.json padding block as a default.
            init["pad_token"] = padding["pad_token"]
        added_by_content = {str(t): t for t in added_tokens_decoder.values()}
        special: dict[str, str | AddedToken] = {}
        for key in NAMED_SPECIAL_TOKENS:
            value = init.get(key)
            if value is not None:
                special[key] = added_by_content.get(str(_token_content(value)), value)
        for key, value in model_specific.items():
            if value is not None:
                special[key] = _convert_typed_added_tokens(value, directory / TOKENIZER_CONFIG_FILE)
        for key, value in list(special.items()):
            if not isinstance(value, (str, AddedToken)):
                raise TokenizerError(
                    f"{directory / TOKENIZER_CONFIG_FILE}: {key} must be a string or an AddedToken "
                    f"object, got {value!r}"
                )
        extra = init.get("extra_special_tokens") or []
        if not isinstance(extra, list):
            raise TokenizerError(
                f"{directory / TOKENIZER_CONFIG_FILE}: extra_special_tokens must be a list or a "
                f"dict, got {type(extra).__name__}"
            )
        extra = [_convert_typed_added_tokens(t, directory / TOKENIZER_CONFIG_FILE) for t in extra]

        _add_special_tokens_to_backend(backend, added_tokens_decoder, special, extra)
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(init.get("split_special_tokens", False))
        if backend.post_processor is None:
            # transformers installs an identity template here; do the same so that a saved
            # tokenizer.json is byte-for-byte what transformers would write.
            backend.post_processor = processors.TemplateProcessing(
                single="$A:0", pair="$A:0 $B:1", special_tokens=[]
            )

        generation = _read_json_object(directory / GENERATION_CONFIG_FILE, default={})
        generation_eos = generation.get("eos_token_id")
        generation_eos = (
            []
            if generation_eos is None
            else list(generation_eos)
            if isinstance(generation_eos, list)
            else [generation_eos]
        )
        if not all(isinstance(i, int) for i in generation_eos):
            raise TokenizerError(
                f"{directory / GENERATION_CONFIG_FILE}: eos_token_id must be an int or a list of "
                f"ints, got {generation.get('eos_token_id')!r}"
            )
        generation_pad = generation.get("pad_token_id")
        if isinstance(generation_pad, list):
            generation_pad = generation_pad[0] if generation_pad else None

        chat_template = init.get("chat_template")
        if isinstance(chat_template, list):
            chat_template = {item["name"]: item["template"] for item in chat_template}
        if chat_template is not None and not isinstance(chat_template, (str, dict)):
            raise TokenizerError(
                f"{directory / TOKENIZER_CONFIG_FILE}: chat_template must be a string or a list of "
                f"{{'name', 'template'}} objects, got {type(chat_template).__name__}"
            )
        model_max_length = init.get("model_max_length", init.get("max_len"))
        return cls(
            backend,
            special_tokens=special,
            extra_special_tokens=extra,
            chat_template=chat_template,
            model_max_length=int(model_max_length) if model_max_length is not None else None,
            generation_eos_token_ids=generation_eos,
            generation_pad_token_id=generation_pad if isinstance(generation_pad, int) else None,
            clean_up_tokenization_spaces=init.get("clean_up_tokenization_spaces", False),
            truncation_side=init.get("truncation_side", "right"),
            name_or_path=str(directory),
        )

    # ------------------------------------------------------------------ special tokens

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The checkpoint's named special tokens as strings (what chat templates receive).

        A pad token chosen by fnlm is not in it; see `pad_token`.
        """
        return {name: str(_token_content(token)) for name, token in self._special_tokens.items()}

    @property
    def extra_special_tokens(self) -> list[str]:
        """The additional special tokens (additional_special_tokens / extra_special_tokens)."""
        return [str(_token_content(t)) for t in self._extra_special_tokens]

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every named and extra special token, the chosen pad included, without repeats."""
        tokens = [*self.special_tokens_map.values(), *self.extra_special_tokens]
        if self.pad_token is not None:
            tokens.append(self.pad_token)
        ids = (self.token_to_id(t) for t in tokens)
        return list(dict.fromkeys(i for i in ids if i is not None))

    def _named(self, name: str) -> str | None:
        token = self._special_tokens.get(name)
        return None if token is None else str(_token_content(token))

    def _named_id(self, name: str) -> int | None:
        token = self._named(name)
        return None if token is None else self.token_to_id(token)

    bos_token = property(lambda self: self._named("bos_token"), doc="Beginning-of-text token.")
    eos_token = property(lambda self: self._named("eos_token"), doc="End-of-text token.")
    unk_token = property(lambda self: self._named("unk_token"), doc="Unknown-text token.")
    bos_token_id = property(lambda self: self._named_id("bos_token"), doc="Id of bos_token.")
    eos_token_id = property(lambda self: self._named_id("eos_token"), doc="Id of eos_token.")
    unk_token_id = property(lambda self: self._named_id("unk_token"), doc="Id of unk_token.")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`, not its
        `vocab_size`, which leaves added tokens out): every id is below it."""
        return self._vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """The id of `token` in the vocabulary (added tokens included), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        """The token string of id `index`, or None when out of range."""
        return self.backend.id_to_token(int(index))

    def _choose_pad_token(
        self, generation_pad_token_id: int | None
    ) -> tuple[str | None, int | None]:
        if self._checkpoint_pad_token is not None:
            token = str(_token_content(self._checkpoint_pad_token))
            return token, self.token_to_id(token)
        choice = None
        if (
            generation_pad_token_id is not None
            and generation_pad_token_id not in self.eos_token_ids
        ):
            token = self.id_to_token(generation_pad_token_id)
            if token is not None:
                choice = (
                    token,
                    generation_pad_token_id,
                    f"{GENERATION_CONFIG_FILE}'s pad_token_id",
                )
        for token in PAD_TOKEN_CANDIDATES if choice is None else ():
            index = self.token_to_id(token)
            if index is not None and index not in self.eos_token_ids:
                choice = (token, index, "a pad-like token of the vocabulary")
                break
        if choice is None and self.eos_token is not None:
            choice = (self.eos_token, self.eos_token_id, "the eos token (no pad-like token found)")
        if choice is None:
            return None, None
        token, index, reason = choice
        warnings.warn(
            f"{self._where()}: the tokenizer has no pad token; padding with {token!r} (id {index}), "
            f"{reason}. Set pad_token in {TOKENIZER_CONFIG_FILE} to choose another.",
            stacklevel=3,
        )
        return token, index

    def _where(self) -> str:
        return f"tokenizer at {self.name_or_path}" if self.name_or_path else "tokenizer"

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens` the post-processor's bos/eos are added.

        Same ids as transformers' `tokenizer.encode(text, add_special_tokens=...)`.
        """
        if not isinstance(text, str):
            raise ArgumentError(f"encode takes one string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str | list[str]:
        """Text of token ids (a list, tuple, int or 1-D tensor); a 2-D input gives a list of texts.

        With `skip_special_tokens`, special added tokens (bos, eos, pad, chat markers) are dropped.
        Same text as transformers' `tokenizer.decode`.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        ids = list(ids)
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError as error:
            raise ArgumentError(f"decode takes integer token ids: {error}") from error
        if any(i < 0 for i in ids):
            raise ArgumentError(
                f"decode takes non-negative token ids, got {min(ids)} "
                "(mask label ids such as -100 out before decoding)"
            )
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            # transformers skips this clean-up for BPE models (it would delete real spaces).
            text = _clean_up_tokenization(text)
        return text

    def __call__(
        self,
        texts: str | list[str],
        *,
        padding: bool = True,
        padding_side: str = "left",
        add_special_tokens: bool = True,
        max_length: int | None = None,
        truncation: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Encode a batch into `{"input_ids": [b, s], "attention_mask": [b, s]}` int64 tensors.

        `padding` pads to the longest text with `pad_token_id`, on `padding_side` ("left" suits
        generation). `truncation` cuts each text to `max_length` tokens (special tokens counted;
        `model_max_length` when `max_length` is None) on the config's truncation side.
        Same ids as transformers' `tokenizer(texts, padding=True, ...)`.

        Raises ArgumentError for texts of unequal length without padding, or padding without a
        pad token.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch or not all(isinstance(t, str) for t in batch):
            raise ArgumentError("the tokenizer takes a string or a non-empty list of strings")
        if padding_side not in ("left", "right"):
            raise ArgumentError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        limit = (
            (max_length if max_length is not None else self.model_max_length)
            if truncation
            else None
        )
        if limit is None:
            encodings = self.backend.encode_batch(batch, add_special_tokens=add_special_tokens)
        else:
            encodings = self._encode_truncated(batch, add_special_tokens, limit)
        rows = [encoding.ids for encoding in encodings]
        longest = max(len(row) for row in rows)
        if any(len(row) != longest for row in rows):
            if not padding:
                raise ArgumentError(
                    "texts encode to different lengths; pass padding=True to batch them"
                )
            if self.pad_token_id is None:
                raise ArgumentError(f"{self._where()} has no pad token, so it cannot pad a batch")
        input_ids = torch.full((len(rows), longest), self.pad_token_id or 0, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.int64)
        for i, row in enumerate(rows):
            start = longest - len(row) if padding_side == "left" else 0
            input_ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.int64)
            attention_mask[i, start : start + len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _encode_truncated(self, batch: list[str], add_special_tokens: bool, limit: int):
        # Same result as the backend's own truncation (transformers enables it per call): cut the
        # text's tokens so that they and the post-processor's special tokens fit, then post-process.
        reserved = self.backend.num_special_tokens_to_add(False) if add_special_tokens else 0
        if limit < reserved:
            raise ArgumentError(
                f"max_length={limit} leaves no room for the {reserved} special token(s) this "
                "tokenizer adds"
            )
        encodings = self.backend.encode_batch(batch, add_special_tokens=False)
        result = []
        for encoding in encodings:
            if len(encoding.ids) + reserved > limit:
                encoding.truncate(limit - reserved, stride=0, direction=self.truncation_side)
            result.append(self.backend.post_process(encoding, None, add_special_tokens))
        return result

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        continue_final_message: bool | str = False,
        chat_template: str | None = None,
        **template_kwargs,
    ) -> str | list[int]:
        """Render a conversation with the model's Jinja chat template, exactly as transformers does.

        `messages` is a list of {"role": ..., "content": ...} dicts (keys whose value is None are
        dropped first). The template sees `messages`, `tools` (JSON schemas), `documents`,
        `add_generation_prompt`, the checkpoint's special tokens (bos_token, eos_token, ...) and
        `template_kwargs` (e.g. enable_thinking=False), which override the special tokens.
        `continue_final_message` leaves the last message open for the model to continue.
        `chat_template` picks a named template of a checkpoint with several, or is a template.
        With `tokenize`, returns ids encoded with add_special_tokens=False (the template writes
        its own bos).

        Raises TokenizerError when there is no template, it does not compile, or it raises.

            tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        """
        template = self._select_chat_template(chat_template, tools)
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ArgumentError("apply_chat_template takes a non-empty list of message dicts")
        if any(not isinstance(m, Mapping) for m in messages):
            bad = next(m for m in messages if not isinstance(m, Mapping))
            raise ArgumentError(
                f"chat messages must be dicts with 'role' and 'content', got {bad!r}"
            )
        if continue_final_message and add_generation_prompt:
            raise ArgumentError(
                "continue_final_message and add_generation_prompt cannot both be set: the first "
                "continues the last message, the second opens a new assistant message"
            )
        if tools is not None:
            for tool in tools:
                if not isinstance(tool, Mapping):
                    raise ArgumentError(
                        f"tools must be JSON-schema dicts ({{'type': 'function', 'function': "
                        f"{{...}}}}), got {type(tool).__name__}"
                    )
        chat = _plain_template_data(
            [{k: v for k, v in m.items() if v is not None} for m in messages]
        )
        chat = _alias_reasoning_fields(chat)
        variables = _plain_template_data({**self.special_tokens_map, **template_kwargs})
        try:
            compiled = _compile_chat_template(template)
        except TokenizerError as error:
            raise TokenizerError(f"{self._where()}: {error}") from error

        final_text = None
        if continue_final_message:
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final_text = chat[-1].get(field)
            if final_text is None:
                raise ArgumentError(
                    f'continue_final_message is set but the final message has no "{field}" to continue'
                )
            fields = [field]
            if field in _REASONING_FIELDS:
                fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_text]
            if not any(f in template for f in fields):
                raise ArgumentError(
                    f'continue_final_message is set to "{field}" but the chat template never reads it'
                )
            if isinstance(final_text, (list, tuple)):
                for block in reversed(final_text):
                    if "text" in block:
                        final_text = block["text"]
                        block["text"] = block["text"] + _CONTINUE_TAG
                        break
                else:
                    raise ArgumentError(
                        "continue_final_message is set but the final message has no text to continue"
                    )
            else:
                for f in fields:
                    chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
        try:
            rendered = compiled.render(
                messages=chat,
                tools=_plain_template_data(tools),
                documents=_plain_template_data(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except Exception as error:
            raise TokenizerError(
                f"the chat template of {self._where()} failed to render: "
                f"{type(error).__name__}: {error}"
            ) from error
        if final_text is not None:
            if final_text.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
                raise TokenizerError(
                    "continue_final_message is set but the chat template dropped part of the final "
                    "message, so it cannot be left open"
                )
            at = rendered.rindex(_CONTINUE_TAG.strip())
            if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
                rendered = rendered[:at]
            else:
                rendered = rendered[:at].rstrip()
        if tokenize:
            return self.encode(rendered, add_special_tokens=False)
        return rendered

    def _select_chat_template(self, name_or_template: str | None, tools) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if name_or_template is not None and name_or_template in templates:
                return templates[name_or_template]
            if name_or_template is not None:
                return name_or_template
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise TokenizerError(
                f"{self._where()} has several chat templates ({', '.join(sorted(templates))}) and "
                "none named 'default'; pass chat_template=<name>"
            )
        if name_or_template is not None:
            return name_or_template
        if templates is None:
            raise TokenizerError(
                f"{self._where()} has no chat template (no {CHAT_TEMPLATE_FILE} and no "
                f"chat_template in {TOKENIZER_CONFIG_FILE}); pass chat_template=<jinja string>, or "
                "use a chat/instruct checkpoint"
            )
        return templates

    # ------------------------------------------------------------------ saving

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `directory`.

        Both `Tokenizer.from_dir` and transformers' `AutoTokenizer.from_pretrained` read back
        the same tokenizer; a chosen pad token is written as the pad_token. Each file is
        written under a temporary name and moved into place, so a crash leaves no half file.
        A stale chat_template.jinja is removed when the tokenizer has no template.
        generation_config.json belongs to the model and is not written.
        """
        target = Path(directory)
        if target.exists() and not target.is_dir():
            raise TokenizerError(f"cannot save the tokenizer into {target}: it is a file")
        target.mkdir(parents=True, exist_ok=True)

        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "backend": "tokenizers",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "model_max_length": (
                self.model_max_length
                if self.model_max_length is not None
                else UNLIMITED_MODEL_MAX_LENGTH
            ),
        }
        if self.truncation_side != "right":
            config["truncation_side"] = self.truncation_side
        if self.backend.encode_special_tokens:
            config["split_special_tokens"] = True
        config.update(self.special_tokens_map)
        if self.pad_token is not None:
            config["pad_token"] = self.pad_token
        if self._extra_special_tokens:
            # transformers v4 reads this name; v5 turns it into extra_special_tokens.
            config["additional_special_tokens"] = self.extra_special_tokens
        # With added_tokens_decoder present, transformers ignores any stale special_tokens_map.json.
        config["added_tokens_decoder"] = {
            str(index): _added_token_fields(token)
            for index, token in sorted(self.backend.get_added_tokens_decoder().items())
        }
        extra_template_files: dict[str, str] = {}
        if isinstance(self.chat_template, str):
            config["chat_template"] = self.chat_template
        elif isinstance(self.chat_template, dict):
            config["chat_template"] = [
                {"name": name, "template": text} for name, text in self.chat_template.items()
            ]
            extra_template_files = {n: t for n, t in self.chat_template.items() if n != "default"}

        _write_atomically(target / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        _write_atomically(
            target / TOKENIZER_CONFIG_FILE,
            json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
        )
        default_template = (
            self.chat_template
            if isinstance(self.chat_template, str)
            else (self.chat_template or {}).get("default")
        )
        if default_template is not None:
            _write_atomically(target / CHAT_TEMPLATE_FILE, default_template)
        elif (target / CHAT_TEMPLATE_FILE).exists():
            (target / CHAT_TEMPLATE_FILE).unlink()
        for name, text in extra_template_files.items():
            (target / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
            path = target / CHAT_TEMPLATE_DIR / f"{name}.jinja"
            if path.resolve().parent != (target / CHAT_TEMPLATE_DIR).resolve():
                raise TokenizerError(f"chat template name {name!r} is not a plain file name")
            _write_atomically(path, text)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"special_tokens={self.special_tokens_map}, pad_token={self.pad_token!r}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )


# ---------------------------------------------------------------------- file reading


def _read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path} could not be read: {error}") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        hint = (
            " (it looks like a Git LFS pointer: fetch the real file)"
            if text.startswith("version https://git-lfs")
            else ""
        )
        raise TokenizerError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}{hint}"
        ) from error


def _read_json_object(path: Path, *, default: dict) -> dict:
    if not path.is_file():
        return default
    value = _read_json(path)
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _read_chat_templates(directory: Path) -> dict[str, str]:
    templates = {}
    for name, path in [("default", directory / CHAT_TEMPLATE_FILE)] + [
        (p.name.removesuffix(".jinja"), p)
        for p in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja"))
    ]:
        if path.is_file():
            try:
                templates[name] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise TokenizerError(f"{path} could not be read: {error}") from error
    return templates


def _write_atomically(path: Path, text: str) -> None:
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- special tokens

_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def _as_added_token(value, source: Path) -> AddedToken:
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, str):
        return AddedToken(value, special=True)
    if not isinstance(value, dict) or "content" not in value:
        raise TokenizerError(f"{source}: expected a token object with a 'content', got {value!r}")
    fields = {k: v for k, v in value.items() if k in _ADDED_TOKEN_FIELDS}
    return AddedToken(**fields)


def _convert_typed_added_tokens(value, source: Path):
    # transformers' convert_added_tokens: {"__type": "AddedToken", ...} anywhere becomes an
    # AddedToken; a bare {"content": ...} in a token slot is read the same way.
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        return _as_added_token({k: v for k, v in value.items() if k != "__type"}, source)
    if isinstance(value, list):
        return [_convert_typed_added_tokens(v, source) for v in value]
    if isinstance(value, dict):
        if "content" in value and set(value) <= set(_ADDED_TOKEN_FIELDS):
            return _as_added_token(value, source)
        return {k: _convert_typed_added_tokens(v, source) for k, v in value.items()}
    return value


def _token_content(token):
    return token.content if isinstance(token, AddedToken) else token


def _added_token_fields(token: AddedToken) -> dict:
    return {field: getattr(token, field) for field in _ADDED_TOKEN_FIELDS}


def _add_special_tokens_to_backend(
    backend: BackendTokenizer,
    added_tokens_decoder: dict[int, AddedToken],
    special: dict[str, str | AddedToken],
    extra: list[str | AddedToken],
) -> None:
    # transformers' TokenizersBackend.__init__: the config's added tokens are re-added (its
    # "already present" test compares against dict keys, so it never matches), then every named or
    # extra special token that is not yet an added token is added as a special one. A token that
    # is already in the base vocabulary keeps its id but becomes an added token, so it is matched
    # whole in text and dropped by decode(skip_special_tokens=True).
    to_add: list[str | AddedToken] = [token for _, token in sorted(added_tokens_decoder.items())]
    present = [t.content for t in backend.get_added_tokens_decoder().values()]
    present += [str(_token_content(t)) for t in to_add]
    for token in [*special.values(), *extra]:
        if str(_token_content(token)) not in present and token not in to_add:
            to_add.append(token)
    if not to_add:
        return
    named = [str(_token_content(t)) for t in special.values()]
    tokens = []
    for token in to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif not token.special and token.content in named:
            token.special = True
        tokens.append(token)
    backend.add_tokens(tokens)


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization, for WordPiece-era tokenizers that ask for it.
    for spaced, joined in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(spaced, joined)
    return text


# ---------------------------------------------------------------------- chat templates

# transformers marks the end of the message to continue with this tag, renders, and cuts there.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Names a message's reasoning is passed under; the first is the one templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning_fields(chat: list) -> list:
    # transformers fills reasoning_content from older names, and thinking for gpt-oss templates.
    aliased = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next(
                (message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None
            )
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _plain_template_data(value):
    # As transformers does: the sandbox only sees plain JSON-like data; anything else (tensors,
    # images) becomes an inert "<TypeName>" placeholder, which templates never read.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if (
        type(value).__module__ == "numpy"
        and hasattr(value, "item")
        and getattr(value, "ndim", 1) == 0
    ):
        return _plain_template_data(value.item())
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=32)
def _compile_chat_template(template: str):
    """Compile `template` in transformers' chat-template Jinja environment (cached by text)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit())
    if version < _MIN_JINJA_VERSION:
        raise TokenizerError(
            f"chat templates need jinja2>=3.1.6 (older versions have sandbox escapes); found "
            f"{jinja2.__version__}: pip install -U jinja2"
        )

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers'
        # assistant-token masks; rendering it is just its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
                lineno
            )

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers replaces it with plain dumps.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # dict() for templates without exposing the dict type itself.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Namespaces that refuse underscore attributes, so templates cannot reach interpreter
        # internals through them.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attributes = dict(*args, **kwargs)
            for name in attributes:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attributes)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, "
                    f"but got {name!r}."
                )

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    environment.globals["dict"] = TemplateDict()
    environment.globals["namespace"] = TemplateNamespace
    try:
        return environment.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise TokenizerError(
            f"the chat template does not compile: {error.message} (template line {error.lineno})"
        ) from error
