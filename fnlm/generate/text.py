"""Text: prompts or conversations through the tokenizer and chat template, stop strings, and
streaming of text pieces, over `generate_tokens`.

    text = fnlm.generate(params, tok, "Hello", max_new_tokens=32)
    texts = fnlm.generate(params, tok, [[{"role": "user", "content": "Hi"}]], temperature=0.7, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fnlm.errors import ArgumentError
from fnlm.generate.sampling import Sampling
from fnlm.generate.tokens import generate_tokens
from fnlm.params import Params


def generate(
    params: Params,
    tok,
    prompts_or_messages,
    *,
    lora=None,
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    stop: str | Sequence[str] = (),
    stream: Callable[[int, str], None] | None = None,
    return_tokens: bool = False,
    cache_dtype: torch.dtype | str | None = None,
    **knobs,
):
    """Generate text for one prompt, a batch of prompts, one conversation or a batch of them.

    prompts_or_messages: a str, a list of str, a conversation (list of {"role", "content"} dicts,
        rendered with tok.apply_chat_template(add_generation_prompt=True)) or a list of them.
    lora: adapters from fnlm.lora, applied unmerged.
    sampling: a `Sampling` (default greedy: temperature 0); the keyword `knobs` temperature=,
        top_p=, top_k=, min_p=, repetition_penalty= and seed= replace its fields (see Sampling:
        transformers' processors in transformers' order; `seed` makes sampling reproducible).
    stop: strings that end a sequence (the returned text stops before them); sequences also stop
        at any of tok.eos_token_ids, after max_new_tokens, or at the model's context length.
    stream(index, piece) receives each new piece of text of sequence `index` as it is decoded.
    cache_dtype: None (the params' dtype) or "fp8" (float8_e4m3fn: half the cache memory).
    Returns a str for one prompt/conversation, else a list of str; with return_tokens, a pair
    (texts, new token ids) of the same shape.
    Raises ArgumentError naming the bad argument (empty prompt list, prompt longer than the
    model's context, sampling values out of range, ...).

        fnlm.generate(params, tok, [{"role": "user", "content": "Capital of France?"}])
    """
    if tok is None:
        raise ArgumentError(
            "tok is None: pass the tokenizer from fnlm.load, or call "
            "fnlm.generate.generate_tokens with token ids"
        )
    single, texts = render_prompts(tok, prompts_or_messages)
    stops = check_stop(stop)
    prompts = [
        tok.encode(text, add_special_tokens=not chat) for text, chat in texts
    ]  # a chat template writes its own bos
    rows = [TextRow(tok, stops, stream, i) for i in range(len(prompts))]
    watch = bool(stops) or stream is not None
    ids = generate_tokens(
        params, prompts, lora=lora, max_new_tokens=max_new_tokens,
        sampling=Sampling.of(sampling, **knobs), eos_token_ids=tok.eos_token_ids,
        cache_dtype=cache_dtype,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        on_token=(lambda row, token: rows[row].push(token)) if watch else None,
    )  # fmt: skip
    eos = set(tok.eos_token_ids)
    outputs = []
    for row, new in zip(rows, ids, strict=True):
        text_ids = new[:-1] if new and new[-1] in eos else new
        outputs.append(row.finish(text_ids))
    if single:
        return (outputs[0], ids[0]) if return_tokens else outputs[0]
    return (outputs, ids) if return_tokens else outputs


class TextRow:
    """Incremental detokenization of one sequence: stop strings and streamed pieces.

    Pieces are the text of the newest tokens decoded together with a few tokens before them (so
    tokenizers that drop or merge leading spaces render them as in the whole text), held back
    while they end in an incomplete UTF-8 character or in the beginning of a stop string.
    """

    CONTEXT_TOKENS = 6

    def __init__(self, tok, stops: list[str], stream, index: int):
        self.tok, self.stops, self.stream, self.index = tok, stops, stream, index
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` already streamed
        self.prefix = 0  # ids[prefix:read] were decoded into the end of `text`
        self.read = 0
        self.stopped_at: int | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> bool:
        """Add one token; True when a stop string has appeared."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += after[len(before) :]
        self.prefix, self.read = max(0, len(self.ids) - self.CONTEXT_TOKENS), len(self.ids)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.stopped_at = min(found)
            self._send(self.stopped_at)
            return True
        self._send(len(self.text) - self._held_back())
        return False

    def _held_back(self) -> int:
        """Length of the longest end of `text` that begins a stop string."""
        for n in range(min(max((len(s) for s in self.stops), default=0), len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _send(self, end: int) -> None:
        if self.stream is not None and end > self.sent:
            self.stream(self.index, self.text[self.sent : end])
            self.sent = end

    def finish(self, ids: list[int]) -> str:
        """The final text of `ids` (the row's ids without a trailing eos), cut at a stop string."""
        text = self._decode(ids)
        if self.stopped_at is not None:
            text = self.text[: self.stopped_at]
        elif self.stream is not None:
            self.text = text
            self._send(len(text))
        return text


def render_prompts(tok, prompts) -> tuple[bool, list[tuple[str, bool]]]:
    """(single?, [(text, is_chat)]) for any accepted prompt form."""
    if isinstance(prompts, str):
        return True, [(prompts, False)]
    if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict):
        return True, [(render_chat(tok, prompts, 0), True)]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ArgumentError(
            "prompts_or_messages must be a str, a non-empty list of str, a conversation (list of "
            f"{{'role', 'content'}} dicts) or a non-empty list of conversations; got {prompts!r}"
        )
    texts = []
    for i, item in enumerate(prompts):
        if isinstance(item, str):
            texts.append((item, False))
        elif isinstance(item, Sequence) and item and all(isinstance(m, dict) for m in item):
            texts.append((render_chat(tok, item, i), True))
        else:
            raise ArgumentError(
                f"prompts_or_messages[{i}] must be a str or a conversation (list of "
                f"{{'role', 'content'}} dicts), got {item!r}"
            )
    return False, texts


def render_chat(tok, messages: Sequence[dict], index: int) -> str:
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ArgumentError(
                f"conversation {index}: every message must be a dict with 'role' and 'content', "
                f"got {m!r}"
            )
    return tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def check_stop(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, Sequence) or not all(isinstance(s, str) and s for s in stops):
        raise ArgumentError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return list(stops)
