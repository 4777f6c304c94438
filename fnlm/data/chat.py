"""Which text of a rendered chat the model learns: the assistant turns, found in the conversation
as the chat template renders it whole.

Two ways, picked by the template:

- `{% generation %}` markers (transformers' `return_assistant_tokens_mask`, TRL's training
  templates): what the markers enclose is learned.
- No markers: each assistant turn is what the model generates after the generation prompt —
  `render(messages[:i], add_generation_prompt=True)` — up to the end of
  `render(messages[: i + 1])`. When the full render holds that text unchanged (most templates),
  that is the span. Templates that render earlier turns differently once a later turn exists
  (Qwen3's drops past `<think>` blocks) get the turn located in the full render instead: its
  content's end by a marker character appended to it, its end-of-turn text from the turn
  rendered last, its start where the full render leaves the generation prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fnlm.errors import DataError, TokenizerError

# Private-use characters that mark places in a render; a conversation holding them is refused.
START, END, AT = "\ue000", "\ue001", "\ue002"
_GENERATION = re.compile(r"\{%(-?)\s*generation\s*(-?)%\}")
_END_GENERATION = re.compile(r"\{%(-?)\s*endgeneration\s*(-?)%\}")


def chat_pieces(
    tok, messages: list[dict], where: str = "conversation", template_kwargs: dict | None = None
) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_response) pieces, in order; their
    texts joined are the template's render of the whole conversation.

    template_kwargs: passed to the template (e.g. enable_thinking=False for Qwen3, whose
    generation prompt then holds an empty think block, which is not learned).
    Raises DataError naming `where` when the template fails, the conversation starts with an
    assistant turn, or an assistant turn cannot be found in the render.
    """
    kwargs = dict(template_kwargs or {})
    if any(mark in str(m.get("content")) for m in messages for mark in (START, END, AT)):
        raise DataError(f"{where}: the conversation holds a private-use character U+E000-E002")
    if messages[0]["role"] == "assistant":
        raise DataError(
            f"{where}: the conversation starts with an assistant turn; there is no prompt to "
            "answer (start with a user or system message)"
        )
    template = _template_text(tok)
    if template is not None and _GENERATION.search(template):
        return _marked_pieces(tok, template, messages, where, kwargs)
    return _prefix_pieces(tok, messages, where, kwargs)


def _render(tok, messages, where, kwargs, generation_prompt=False, template=None) -> str:
    extra = {"chat_template": template} if template is not None else {}
    try:
        return tok.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False, **extra, **kwargs
        )
    except (TokenizerError, ValueError) as e:  # ValueError: transformers' own template errors
        raise DataError(f"{where}: the chat template failed: {e}") from None


def _template_text(tok) -> str | None:
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def _marked_pieces(tok, template, messages, where, kwargs) -> list[tuple[str, bool]]:
    # The markers' dashes move onto the characters put beside them, so whitespace control
    # (and so the render) stays as it was.
    marked = _GENERATION.sub(
        lambda m: f"{{%{m[1]} generation %}}{{{{ '{START}' {m[2]}}}}}", template
    )
    marked = _END_GENERATION.sub(
        lambda m: f"{{{{{m[1]} '{END}' }}}}{{% endgeneration {m[2]}%}}", marked
    )
    text = _render(tok, messages, where, kwargs, template=marked)
    pieces, at, trained = [], 0, False
    for match in re.finditer(f"[{START}{END}]", text):
        pieces.append((text[at : match.start()], trained))
        trained, at = match[0] == START, match.end()
    pieces.append((text[at:], trained))
    return [(piece, learned) for piece, learned in pieces if piece]


def _prefix_pieces(tok, messages, where, kwargs) -> list[tuple[str, bool]]:
    full = _render(tok, messages, where, kwargs)
    spans: list[tuple[int, int]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tok, messages[:i], where, kwargs, generation_prompt=True)
        upto = _render(tok, messages[: i + 1], where, kwargs)
        if full.startswith(upto) and not upto.startswith(prompt):
            raise DataError(
                f"{where}: the chat template renders assistant turn {i} without the generation "
                "prompt before it (e.g. reasoning in a turn while enable_thinking=False), so the "
                "response cannot be told from the prompt; train on the whole text instead "
                "(train_on_responses_only=False)"
            )
        if full.startswith(upto) and len(prompt) >= done:  # the turn as rendered last
            start, end = len(prompt), len(upto)
        else:
            start, end = _locate_turn(tok, messages, i, full, prompt, where, kwargs)
            start = max(start, done)
        if end <= start:
            raise DataError(f"{where}: assistant turn {i} renders as empty text")
        spans.append((start, end))
        done = end
    pieces, at = [], 0
    for start, end in spans:
        pieces += [(full[at:start], False), (full[start:end], True)]
        at = end
    pieces.append((full[at:], False))
    return [(text, trained) for text, trained in pieces if text]


def _locate_turn(tok, messages, i, full, prompt, where, kwargs) -> tuple[int, int]:
    """(start, end) of assistant turn i in `full`, the render of a template that renders the
    turn differently once later turns exist (Qwen3 drops its reasoning)."""

    def with_content(text: str) -> list[dict]:
        return [*messages[:i], {**messages[i], "content": text}, *messages[i + 1 :]]

    content = messages[i]["content"]
    marked = _render(tok, with_content(content + AT), where, kwargs)
    if marked.count(AT) != 1 or marked.replace(AT, "") != full:
        raise DataError(
            f"{where}: the chat template does not render this conversation turn by turn "
            f"(assistant turn {i} changes earlier text, and its content cannot be found in the "
            "whole conversation's render), so responses cannot be masked; train on the whole "
            "text instead (train_on_responses_only=False)"
        )
    content_end = marked.index(AT)
    # What the template writes after the turn's content (its end-of-turn marker) when the turn
    # is the last one; the same text follows it in the full render.
    last = _render(tok, with_content(content + AT)[: i + 1], where, kwargs)
    tail = last[last.index(AT) + 1 :] if last.count(AT) == 1 else ""
    end = content_end + common_prefix(tail, full[content_end:])
    # The response starts where the full render leaves the generation prompt, or earlier where
    # the content itself starts (with enable_thinking=False the prompt ends in an empty think
    # block that an earlier turn's render lacks, and the content may begin with the same '<').
    start = min(common_prefix(full, prompt), content_end)
    opened = _render(tok, with_content(AT + content), where, kwargs)
    if opened.count(AT) == 1 and opened.replace(AT, "") == full:  # else the template cut it off
        start = min(start, opened.index(AT))
    return start, end


def common_prefix(a: Sequence, b: Sequence) -> int:
    """The length of the longest common prefix of two strings or lists (of token ids)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
