"""An Ollama `Modelfile` for a GGUF export: FROM the file, the chat template as Ollama's Go template,
the default system prompt, and a stop parameter for each end-of-turn token.

Ollama renders a chat with a Go text/template over `.Messages` (each with `.Role` and `.Content`;
a Modelfile's SYSTEM becomes a leading system message when the chat has none), then tokenizes the
text adding BOS as the GGUF says. The Jinja chat template is not translated statement by
statement: it is rendered for probe conversations and read as one prefix and suffix per role
plus the generation prompt — the shape of ChatML, Llama 3, Gemma, Phi-3, Zephyr and Mistral's
[INST] templates. The reading is then checked by rendering other conversations both ways; a
template that does more (dates, tool blocks, a system prompt merged into the first user turn,
the last turn rendered differently) is reported as not translatable, and the Modelfile keeps
FROM and the stops without a TEMPLATE.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
# probe contents: plain words, so a template that trims or escapes content renders them as given
PROBES = {"system": "SYSTEMPROBE", "user": "USERPROBE", "assistant": "ASSISTANTPROBE"}
# conversations the reading must reproduce (every role order a chat takes)
CHECKS = [
    [("user", "Hi there")],
    [("system", "Be brief."), ("user", "Hi")],
    [("user", "One"), ("assistant", "Two"), ("user", "Three")],
    [("system", "S"), ("user", "A"), ("assistant", "B"), ("user", "C"), ("assistant", "D"),
     ("user", "E")],
]  # fmt: skip


class UntranslatableTemplate(Exception):
    """The chat template is not of the prefix / suffix shape an Ollama template is written in."""


@dataclass(frozen=True)
class ChatShape:
    """A chat template read as text around each message."""

    prefix: dict[str, str]  # role -> text before its content ({} entry: the role is refused)
    suffix: dict[str, str]
    generation: str  # after the last message, to prompt the assistant
    start: str  # before the first message (a BOS the template writes itself)
    default_system: str | None  # the system prompt the template adds when the chat has none

    def render(self, messages: list[tuple[str, str]]) -> str:
        """What Ollama's rendering of `go_template()` gives for `messages` (no default system:
        Ollama adds the Modelfile's SYSTEM as a message)."""
        parts = [self.start]
        for role, content in messages:
            if role in self.prefix:
                parts += [self.prefix[role], content, self.suffix[role]]
        return "".join(parts) + self.generation

    def go_template(self) -> str:
        """The Ollama TEMPLATE: one line, no whitespace trimming, so every character is the
        Jinja template's own."""
        branches = []
        for role in ROLES:
            if role in self.prefix:
                keyword = "if" if not branches else "else if"
                branches.append(
                    f'{{{{ {keyword} eq .Role "{role}" }}}}{_literal(self.prefix[role])}'
                    f"{{{{ .Content }}}}{_literal(self.suffix[role])}"
                )
        body = "".join(branches) + "{{ end }}"
        return f"{_literal(self.start)}{{{{ range .Messages }}}}{body}{{{{ end }}}}" + _literal(
            self.generation
        )


def _literal(text: str) -> str:
    """Text as a Go template literal; "{{" would open an action, so it is printed by one."""
    return text.replace("{{", '{{ "{{" }}')


def chat_shape(tok, *, strip_bos: bool) -> ChatShape:
    """Read `tok`'s chat template as a ChatShape; UntranslatableTemplate says why it is not one.
    `strip_bos`: the runtime adds BOS itself (the GGUF's add_bos_token), so a BOS the template
    writes first is left out of the shape."""

    def render(messages, generation: bool) -> str:
        dicts = [{"role": r, "content": c} for r, c in messages]
        return tok.apply_chat_template(dicts, add_generation_prompt=generation)

    def probe(*roles: str, generation: bool = False) -> str:
        return render([(r, PROBES[r] + str(i)) for i, r in enumerate(roles)], generation)

    try:
        lone = probe("user")
        prompted = probe("user", generation=True)
        turns = probe("user", "assistant", "user")
    except Exception as e:  # the template's own error (TokenizerError or a Jinja exception)
        raise UntranslatableTemplate(f"rendering a plain chat fails: {e}") from None

    user0, assistant1, user2 = PROBES["user"] + "0", PROBES["assistant"] + "1", PROBES["user"] + "2"
    head, user_suffix = _around(lone, user0)
    if not prompted.startswith(lone):
        raise UntranslatableTemplate("the generation prompt changes the turns before it")
    generation = prompted[len(lone) :]
    between_ua, rest = _around(turns[turns.index(user0) + len(user0) :], assistant1)
    between_au, tail = _around(rest, user2)
    if tail != user_suffix or not between_ua.startswith(user_suffix):
        raise UntranslatableTemplate("a user turn ends differently in different places")
    assistant_prefix = between_ua[len(user_suffix) :]
    assistant_suffix, user_prefix = _split_turns(tok, between_au)
    if not head.endswith(user_prefix):
        raise UntranslatableTemplate("the first user turn starts differently from later ones")
    start, default_block = "", head[: len(head) - len(user_prefix)]

    bos = tok.bos_token or ""
    if bos and default_block.startswith(bos):
        start, default_block = bos, default_block[len(bos) :]
    prefix = {"user": user_prefix, "assistant": assistant_prefix}
    suffix = {"user": user_suffix, "assistant": assistant_suffix}
    default_system = None
    try:
        with_system = probe("system", "user")
    except Exception:
        with_system = None  # the template refuses system messages (Gemma 1/2, Mistral v0.1)
    if with_system is not None:
        system0 = PROBES["system"] + "0"
        sys_head, sys_rest = _around(with_system, system0)
        if not sys_head.startswith(start):
            raise UntranslatableTemplate("a system message moves the start of the chat")
        system_suffix, first_user = _split_turns(tok, sys_rest[: sys_rest.index("USERPROBE1")])
        if first_user != user_prefix:
            raise UntranslatableTemplate("the system prompt is merged into the first user turn")
        prefix["system"] = sys_head[len(start) :]
        suffix["system"] = system_suffix
        if default_block:
            if not (default_block.startswith(prefix["system"]) and default_block.endswith(
                system_suffix
            )):  # fmt: skip
                raise UntranslatableTemplate("text before the first turn that is not a system turn")
            default_system = default_block[len(prefix["system"]) : len(default_block) - len(system_suffix)]  # fmt: skip
    elif default_block:
        raise UntranslatableTemplate("text before the first turn that is not a system turn")

    shape = ChatShape(prefix, suffix, generation, start, default_system)
    for messages in CHECKS:
        if messages[0][0] == "system" and "system" not in prefix:
            messages = messages[1:]
        expected = render(messages, True)
        if default_system is not None and messages[0][0] != "system":
            messages = [("system", default_system), *messages]
        if shape.render(messages) != expected:
            raise UntranslatableTemplate(
                f"the template renders {expected!r}, its reading {shape.render(messages)!r}"
            )
    if strip_bos and start == bos and bos:
        shape = ChatShape(prefix, suffix, generation, "", default_system)
    return shape


def _around(text: str, marker: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise UntranslatableTemplate("the message content is not rendered once as written")
    before, after = text.split(marker)
    return before, after


def _split_turns(tok, between: str) -> tuple[str, str]:
    """The text between two messages cut into the first one's suffix and the next one's prefix:
    after the first special token (the end-of-turn one) and the newlines that follow it."""
    specials = sorted(
        (t.content for t in tok.backend.get_added_tokens_decoder().values() if t.special),
        key=len,
        reverse=True,
    )
    cut = min(
        ((between.find(s), s) for s in specials if s and between.find(s) >= 0),
        default=(-1, ""),
    )
    if cut[0] < 0:
        return "", between
    end = cut[0] + len(cut[1])
    while end < len(between) and between[end] == "\n":
        end += 1
    return between[:end], between[end:]


def modelfile(tok, gguf_name: str, *, add_bos: bool) -> str:
    """The Modelfile text for the GGUF file `gguf_name` (beside it) with tokenizer `tok`. Warns
    when the chat template cannot be translated (the Modelfile then has no TEMPLATE)."""
    lines = [
        "# Ollama Modelfile written by fnlm: `ollama create NAME -f Modelfile`",
        f"FROM ./{gguf_name}",
    ]
    stops = [tok.id_to_token(i) for i in tok.eos_token_ids]
    if tok.chat_template:
        try:
            shape = chat_shape(tok, strip_bos=add_bos)
            template = _quoted(shape.go_template())
            system = shape.default_system
        except UntranslatableTemplate as e:
            warnings.warn(
                f"Modelfile: the chat template cannot be written as an Ollama template ({e}); "
                "the Modelfile has FROM and the stop tokens but no TEMPLATE: write one by hand",
                stacklevel=3,
            )
        else:
            lines.append(f'TEMPLATE """{template}"""')
            if system is not None and '"""' not in system:
                lines.append(f'SYSTEM """{system}"""')
            # the assistant turn's end token (<|im_end|>, <|eot_id|>, <end_of_turn>, </s>)
            stops.append(_split_turns(tok, shape.suffix["assistant"])[0].strip())
            if "system" not in shape.prefix:
                warnings.warn(
                    "Modelfile: the chat template refuses system messages; Ollama's system "
                    "prompts are left out of the rendered chat",
                    stacklevel=3,
                )
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {_string(stop)}")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    if '"""' in text:
        raise UntranslatableTemplate('the template holds """, which ends a Modelfile block')
    return text


def _string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
