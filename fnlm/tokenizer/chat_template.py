"""Chat templates: transformers' Jinja sandbox, and rendering a conversation exactly as it does.

Templates come from the Hub and are untrusted code: they run in jinja2's immutable sandbox with
transformers' filters and globals (tojson without HTML escaping, raise_exception, strftime_now,
a dict() and a namespace() that refuses underscore names, the {% generation %} tag), and only
plain JSON-like data reaches them.

    text = render(select(tok.chat_template, None, None, "tok"), messages, tok.special_tokens_map,
                  add_generation_prompt=True, where="tok")
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fnlm.errors import ArgumentError, TokenizerError
from fnlm.tokenizer.checkpoint import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE

# Older jinja2 has sandbox escapes, which is why transformers refuses to render with anything
# below 3.1.6. So do we.
_MIN_JINJA_VERSION = (3, 1, 6)


def select(
    templates: str | dict[str, str] | None, name_or_template: str | None, tools, where: str
) -> str:
    """The template to render: a named one of several (`name_or_template`), the "tool_use" one
    when tools are passed, else the default; a string that names none is itself the template.
    Raises TokenizerError (prefixed with `where`) when there is none to choose."""
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
            f"{where} has several chat templates ({', '.join(sorted(templates))}) and "
            "none named 'default'; pass chat_template=<name>"
        )
    if name_or_template is not None:
        return name_or_template
    if templates is None:
        raise TokenizerError(
            f"{where} has no chat template (no {CHAT_TEMPLATE_FILE} and no "
            f"chat_template in {TOKENIZER_CONFIG_FILE}); pass chat_template=<jinja string>, or "
            "use a chat/instruct checkpoint"
        )
    return templates


def render(
    template: str,
    messages: list[Mapping],
    variables: Mapping[str, Any],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    continue_final_message: bool | str = False,
    where: str = "tokenizer",
) -> str:
    """Render `messages` (dicts; None values dropped) with `template`, as transformers does.

    `variables` (special tokens, template kwargs) are passed as template globals next to
    messages, tools, documents and add_generation_prompt. `continue_final_message` (True for
    "content", or the field name) leaves the last message open. Raises TokenizerError naming
    `where` when the template does not compile or raises, ArgumentError for a final message
    that cannot be continued.
    """
    chat = _plain_template_data([{k: v for k, v in m.items() if v is not None} for m in messages])
    chat = _alias_reasoning_fields(chat)
    variables = _plain_template_data(dict(variables))
    try:
        compiled = compile_template(template)
    except TokenizerError as error:
        raise TokenizerError(f"{where}: {error}") from error
    final_text = None
    if continue_final_message:
        final_text = _mark_final_message(chat, template, continue_final_message)
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
            f"the chat template of {where} failed to render: {type(error).__name__}: {error}"
        ) from error
    if final_text is not None:
        rendered = _cut_after_final_message(rendered, final_text)
    return rendered


def _mark_final_message(chat: list, template: str, continue_final_message: bool | str) -> str:
    """Append the continue tag to the final message's text (in place); returns that text."""
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
                return final_text
        raise ArgumentError(
            "continue_final_message is set but the final message has no text to continue"
        )
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final_text


def _cut_after_final_message(rendered: str, final_text: str) -> str:
    if final_text.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
        raise TokenizerError(
            "continue_final_message is set but the chat template dropped part of the final "
            "message, so it cannot be left open"
        )
    at = rendered.rindex(_CONTINUE_TAG.strip())
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()


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
def compile_template(template: str):
    """Compile `template` in transformers' chat-template Jinja environment (cached by text)."""
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
