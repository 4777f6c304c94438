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

import operator
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from fnlm import files
from fnlm.errors import ArgumentError, TokenizerError
from fnlm.tokenizer import chat_template as chat_template_lib
from fnlm.tokenizer import checkpoint
from fnlm.tokenizer.checkpoint import (
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    added_token_fields,
    token_content,
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
        return cls(**checkpoint.read(Path(path)))

    # ------------------------------------------------------------------ special tokens

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The checkpoint's named special tokens as strings (what chat templates receive).

        A pad token chosen by fnlm is not in it; see `pad_token`.
        """
        return {name: str(token_content(token)) for name, token in self._special_tokens.items()}

    @property
    def extra_special_tokens(self) -> list[str]:
        """The additional special tokens (additional_special_tokens / extra_special_tokens)."""
        return [str(token_content(t)) for t in self._extra_special_tokens]

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
        return None if token is None else str(token_content(token))

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
            token = str(token_content(self._checkpoint_pad_token))
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
        template = chat_template_lib.select(self.chat_template, chat_template, tools, self._where())
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
        rendered = chat_template_lib.render(
            template,
            messages,
            {**self.special_tokens_map, **template_kwargs},
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            continue_final_message=continue_final_message,
            where=self._where(),
        )
        if tokenize:
            return self.encode(rendered, add_special_tokens=False)
        return rendered

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
            str(index): added_token_fields(token)
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

        files.write_text(target / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        files.write_json(target / TOKENIZER_CONFIG_FILE, config, sort_keys=True)
        default_template = (
            self.chat_template
            if isinstance(self.chat_template, str)
            else (self.chat_template or {}).get("default")
        )
        if default_template is not None:
            files.write_text(target / CHAT_TEMPLATE_FILE, default_template)
        elif (target / CHAT_TEMPLATE_FILE).exists():
            (target / CHAT_TEMPLATE_FILE).unlink()
        for name, text in extra_template_files.items():
            (target / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
            path = target / CHAT_TEMPLATE_DIR / f"{name}.jinja"
            if path.resolve().parent != (target / CHAT_TEMPLATE_DIR).resolve():
                raise TokenizerError(f"chat template name {name!r} is not a plain file name")
            files.write_text(path, text)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"special_tokens={self.special_tokens_map}, pad_token={self.pad_token!r}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )


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
