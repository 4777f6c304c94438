"""fnlm.tokenizer against transformers' AutoTokenizer on the same checkpoint files.

Fixtures (tests/tokenizer_fixtures.py) are written by transformers' save_pretrained: the real
SmolLM2-135M-Instruct tokenizer, a Llama-3 style byte-level BPE, a Llama-2 / Mistral style
SentencePiece BPE, and the latter rewritten in older (v4) config style. Hypothesis draws the
texts, batches and conversations; every comparison is exact (ids, strings), so there is no
tolerance to state.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import jinja2
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizer_fixtures import (
    write_byte_level_bpe,
    write_legacy_configs,
    write_metaspace_bpe,
    write_smollm2,
    write_word_level,
)

from fnlm.errors import ArgumentError, TokenizerError
from fnlm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------------- chat templates

# Llama-3.1 style: bos from the tokenizer, header tokens, strftime_now, trim filter.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen2.5 style ChatML: a default system prompt, tools rendered with tojson, tool calls.
QWEN2_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Mistral [INST] style: raise_exception on roles that do not alternate.
MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Gemma style: no system role, 'model' for the assistant.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# Qwen3 style features: namespace, reversed loops, break, {% generation %}, a template kwarg.
QWEN3_FEATURES_TEMPLATE = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "assistant" %}
        {%- generation %}{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}{%- endgeneration %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
    {%- if loop.index0 > ns.last_query_index + 1 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

TEMPLATES = {
    "llama3": LLAMA3_TEMPLATE,
    "qwen2": QWEN2_TEMPLATE,
    "mistral": MISTRAL_TEMPLATE,
    "gemma": GEMMA_TEMPLATE,
    "qwen3": QWEN3_FEATURES_TEMPLATE,
}
TEMPLATES_WITH_SYSTEM = {"llama3", "qwen2", "mistral", "qwen3"}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather at a place <b>now</b> & later — in °C, ünïcode kept",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "城市"}},
                "required": ["city"],
            },
        },
    }
]

# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """name -> tokenizer directory, built once per session (SmolLM2 from its GGUF: ~6 s)."""
    root = tmp_path_factory.mktemp("tokenizers")
    directories = {name: root / name for name in ("smollm2", "byte_level", "metaspace", "legacy")}
    for directory in directories.values():
        directory.mkdir()
    write_smollm2(directories["smollm2"])
    write_byte_level_bpe(directories["byte_level"], chat_template=LLAMA3_TEMPLATE)
    write_metaspace_bpe(directories["metaspace"], chat_template=MISTRAL_TEMPLATE)
    write_metaspace_bpe(directories["legacy"])
    write_legacy_configs(directories["legacy"], chat_template=MISTRAL_TEMPLATE)
    return directories


@pytest.fixture(scope="session")
def loaded(checkpoints) -> dict[str, tuple[Tokenizer, object]]:
    """name -> (fnlm Tokenizer, transformers tokenizer) read from the same directory.

    The reference gets fnlm's chosen pad token where the checkpoint has none, so that batches
    can be compared at all (transformers refuses to pad without one).
    """
    pairs = {}
    for name, directory in checkpoints.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = Tokenizer.from_dir(directory)
        reference = transformers.AutoTokenizer.from_pretrained(directory)
        if reference.pad_token is None:
            reference.pad_token = ours.pad_token
        pairs[name] = (ours, reference)
    return pairs


NAMES = ["smollm2", "byte_level", "metaspace", "legacy"]

# ---------------------------------------------------------------------- strategies

SPECIAL_PIECES = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
    "<unk>",
    "[INST]",
    "<image>",
    "<0x41>",
    "▁",
]
OTHER_PIECES = [
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    "😀",
    "👩‍👩‍👧",
    "👍🏽",
    "中文字符",
    "日本語",
    "한국어",
    "é",
    "ﬁ",
    "\u200b",
    "don't",
    "1234567",
    "Hello world",
    " the",
]

texts = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=8),
        st.sampled_from(SPECIAL_PIECES),
        st.sampled_from(OTHER_PIECES),
    ),
    max_size=8,
).map("".join)


@st.composite
def conversations(draw, template_name: str):
    """A valid conversation for the template: optional system, then user/assistant turns."""
    messages = []
    if template_name in TEMPLATES_WITH_SYSTEM and draw(st.booleans()):
        messages.append({"role": "system", "content": draw(texts)})
    turns = draw(st.integers(1, 4))
    for turn in range(turns):
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": draw(texts)})
    return messages


def _expect_same_error(render_reference, render_ours):
    """Both raise, or neither; when both raise, fnlm's TokenizerError carries the message."""
    try:
        expected = render_reference()
    except jinja2.exceptions.TemplateError as error:
        with pytest.raises(TokenizerError, match="failed to render") as caught:
            render_ours()
        assert str(error) in str(caught.value)
        return None, None
    return expected, render_ours()


# ---------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("name", NAMES)
@given(text=texts)
def test_encode_matches_transformers(loaded, name, text):
    ours, reference = loaded[name]
    for add_special_tokens in (True, False):
        assert ours.encode(text, add_special_tokens=add_special_tokens) == reference.encode(
            text, add_special_tokens=add_special_tokens
        )


@pytest.mark.parametrize("name", NAMES)
@given(text=texts)
def test_decode_matches_transformers(loaded, name, text):
    ours, reference = loaded[name]
    ids = reference.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
            ids, skip_special_tokens=skip
        )
    assert ours.decode(torch.tensor(ids)) == reference.decode(ids)


@pytest.mark.parametrize("name", NAMES)
@given(batch=st.lists(texts, min_size=1, max_size=4), side=st.sampled_from(["left", "right"]))
def test_batch_call_matches_transformers(loaded, name, batch, side):
    ours, reference = loaded[name]
    got = ours(batch, padding_side=side)
    expected = reference(batch, padding=True, padding_side=side, return_tensors="pt")
    for key in ("input_ids", "attention_mask"):
        assert got[key].dtype == torch.int64
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("name", NAMES)
@given(
    batch=st.lists(texts, min_size=1, max_size=3),
    side=st.sampled_from(["left", "right"]),
    max_length=st.integers(1, 12),
    add_special_tokens=st.booleans(),
)
def test_truncated_batch_matches_transformers(
    loaded, name, batch, side, max_length, add_special_tokens
):
    ours, reference = loaded[name]
    got = ours(
        batch,
        padding_side=side,
        truncation=True,
        max_length=max_length,
        add_special_tokens=add_special_tokens,
    )
    expected = reference(
        batch,
        padding=True,
        padding_side=side,
        truncation=True,
        max_length=max_length,
        add_special_tokens=add_special_tokens,
        return_tensors="pt",
    )
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])


def test_truncation_defaults_to_model_max_length(loaded):
    ours, reference = loaded["legacy"]  # model_max_length 24 in its config
    assert ours.model_max_length == 24 == reference.model_max_length
    text = "Hello world " * 20
    got = ours(text, truncation=True)["input_ids"]
    assert got.shape == (1, 24)
    assert got[0].tolist() == reference(text, truncation=True)["input_ids"]


def test_single_text_and_unpadded_batch(loaded):
    ours, _ = loaded["smollm2"]
    single = ours("Hello world")
    assert single["input_ids"][0].tolist() == ours.encode("Hello world")
    assert single["attention_mask"].tolist() == [[1] * len(ours.encode("Hello world"))]
    with pytest.raises(ArgumentError, match="padding=True"):
        ours(["a", "a much longer text than the first"], padding=False)
    with pytest.raises(ArgumentError, match="padding_side"):
        ours(["a"], padding_side="middle")


def test_special_token_attributes_match_transformers(loaded):
    for name in NAMES:
        ours, reference = loaded[name]
        for attribute in ("bos_token", "eos_token", "unk_token", "bos_token_id", "eos_token_id"):
            assert getattr(ours, attribute) == getattr(reference, attribute), (name, attribute)
        assert ours.pad_token == reference.pad_token
        assert ours.pad_token_id == reference.pad_token_id
        assert ours.vocab_size == len(reference)
        assert ours.extra_special_tokens == reference.extra_special_tokens
        assert set(ours.all_special_ids) == set(reference.all_special_ids) | {ours.pad_token_id}
        assert ours.chat_template == reference.chat_template


def test_smollm2_known_values(loaded):
    ours, _ = loaded["smollm2"]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert (ours.bos_token_id, ours.eos_token_id, ours.eos_token_ids) == (1, 2, (2,))
    assert ours.vocab_size == 49152
    assert not ours.add_bos_token and not ours.add_eos_token


def test_add_bos_token_reflects_post_processor(loaded):
    ours, _ = loaded["byte_level"]
    assert ours.add_bos_token and not ours.add_eos_token
    assert ours.encode("hi")[0] == ours.bos_token_id
    legacy, reference = loaded["legacy"]
    # tokenizer_config.json says add_bos_token=false, but tokenizer.json's post-processor adds
    # <s>; transformers v5 follows tokenizer.json, and so do we.
    assert legacy.add_bos_token
    assert legacy.encode("hi")[0] == reference.encode("hi")[0] == legacy.bos_token_id


def test_eos_token_ids_include_generation_config(loaded):
    ours, _ = loaded["byte_level"]
    eot, end_of_text = ours.token_to_id("<|eot_id|>"), ours.token_to_id("<|end_of_text|>")
    assert ours.eos_token_id == eot
    assert ours.eos_token_ids == (eot, end_of_text)


def test_legacy_extra_special_tokens_are_added_like_transformers(loaded):
    ours, reference = loaded["legacy"]
    for token in ("[INST]", "[/INST]", "<image>"):
        assert ours.token_to_id(token) == reference.convert_tokens_to_ids(token) is not None
    reference_map = {k: v for k, v in reference.special_tokens_map.items() if k != "pad_token"}
    assert ours.special_tokens_map == reference_map  # the reference was given fnlm's pad
    assert ours.encode("[INST] hi [/INST]") == reference.encode("[INST] hi [/INST]")


# ---------------------------------------------------------------------- pad token choice


def _load_warning(directory) -> tuple[Tokenizer, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenizer = Tokenizer.from_dir(directory)
    return tokenizer, [str(w.message) for w in caught]


def test_pad_token_choice_is_warned_once(checkpoints, tmp_path):
    cases = {
        "byte_level": "<|finetune_right_pad_id|>",  # Llama-3.1's reserved pad
        "metaspace": "<unk>",  # Llama-2 / Mistral practice
    }
    for name, expected in cases.items():
        tokenizer, messages = _load_warning(checkpoints[name])
        assert tokenizer.pad_token == expected
        assert tokenizer.pad_token_id not in tokenizer.eos_token_ids
        assert (
            len(messages) == 1 and repr(expected) in messages[0] and "no pad token" in messages[0]
        )

    tokenizer, messages = _load_warning(checkpoints["smollm2"])  # the checkpoint names a pad
    assert tokenizer.pad_token == "<|im_end|>" and messages == []

    only_eos = write_word_level(tmp_path / "eos")
    tokenizer, messages = _load_warning(only_eos)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<eos>", 0)
    assert len(messages) == 1 and "eos token" in messages[0]

    from_generation_config = write_word_level(tmp_path / "generation", generation_pad_token_id=3)
    tokenizer, messages = _load_warning(from_generation_config)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("[UNK]", 3)
    assert len(messages) == 1 and "generation_config.json" in messages[0]


# ---------------------------------------------------------------------- chat templates

TEMPLATE_CASES = [
    ("smollm2", None),  # the real SmolLM2 template, from the checkpoint
    ("byte_level", None),  # Llama-3 template saved as chat_template.jinja
    ("metaspace", None),  # Mistral template saved as chat_template.jinja
    ("legacy", None),  # Mistral template inside tokenizer_config.json
    ("smollm2", "qwen2"),
    ("smollm2", "qwen3"),
    ("byte_level", "gemma"),
]


@pytest.mark.parametrize("name,template_name", TEMPLATE_CASES)
@given(data=st.data(), add_generation_prompt=st.booleans())
def test_chat_template_matches_transformers(
    loaded, name, template_name, data, add_generation_prompt
):
    ours, reference = loaded[name]
    template = TEMPLATES[template_name] if template_name else None
    kind = template_name or {"byte_level": "llama3", "smollm2": "qwen2"}.get(name, "mistral")
    messages = data.draw(conversations(kind))
    extra = {}
    if template_name == "qwen3":
        extra["enable_thinking"] = data.draw(st.booleans())
    for tokenize in (False, True):
        expected, got = _expect_same_error(
            lambda tokenize=tokenize: reference.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=tokenize,
                return_dict=False,
                chat_template=template,
                **extra,
            ),
            lambda tokenize=tokenize: ours.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=tokenize,
                chat_template=template,
                **extra,
            ),
        )
        assert got == expected


@given(data=st.data(), use_tools=st.booleans(), add_generation_prompt=st.booleans())
def test_chatml_tools_and_tool_calls_match_transformers(
    loaded, data, use_tools, add_generation_prompt
):
    ours, reference = loaded["smollm2"]
    messages = data.draw(conversations("qwen2"))
    if messages[-1]["role"] == "user":
        messages += [
            {
                "role": "assistant",
                "content": None,  # dropped before rendering, as transformers does
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": data.draw(texts)}}}
                ],
            },
            {"role": "tool", "content": data.draw(texts)},
            {"role": "tool", "content": '{"temp": 21, "unit": "°C"}'},
        ]
    kwargs = {"tools": TOOLS if use_tools else None, "add_generation_prompt": add_generation_prompt}
    expected = reference.apply_chat_template(
        messages, tokenize=False, chat_template=QWEN2_TEMPLATE, **kwargs
    )
    assert ours.apply_chat_template(messages, chat_template=QWEN2_TEMPLATE, **kwargs) == expected


@pytest.mark.parametrize("template_name", ["mistral", "gemma"])
@given(data=st.data())
def test_bad_roles_raise_like_transformers(loaded, template_name, data):
    ours, reference = loaded["metaspace"]
    roles = data.draw(
        st.lists(st.sampled_from(["user", "assistant", "system", "tool"]), min_size=1, max_size=4)
    )
    messages = [{"role": role, "content": data.draw(texts)} for role in roles]
    template = TEMPLATES[template_name]
    expected, got = _expect_same_error(
        lambda: reference.apply_chat_template(messages, tokenize=False, chat_template=template),
        lambda: ours.apply_chat_template(messages, chat_template=template),
    )
    assert got == expected


def test_raise_exception_message_reaches_the_user(loaded):
    ours, _ = loaded["metaspace"]
    with pytest.raises(TokenizerError, match="roles must alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "first"}])


def test_continue_final_message_matches_transformers(loaded):
    ours, reference = loaded["smollm2"]
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "The colour is"},
    ]
    expected = reference.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert expected.endswith("The colour is")
    assert ours.apply_chat_template(messages, continue_final_message=True) == expected


def test_tokenize_uses_no_extra_special_tokens(loaded):
    ours, _ = loaded["byte_level"]  # its post-processor adds bos, and its template writes one
    messages = [{"role": "user", "content": "hi"}]
    ids = ours.apply_chat_template(messages, tokenize=True)
    assert ids == ours.encode(ours.apply_chat_template(messages), add_special_tokens=False)
    assert ids.count(ours.bos_token_id) == 1


# ---------------------------------------------------------------------- save


@pytest.mark.parametrize("name", NAMES)
@given(text=texts)
def test_save_round_trips_through_both_readers(loaded, name, text):
    ours, reference = loaded[name]
    with tempfile.TemporaryDirectory() as directory:
        ours.save(directory)
        names = {p.name for p in Path(directory).iterdir()}
        assert not [n for n in names if n.endswith(".tmp")], names
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the pad is now written: no second warning
            again = Tokenizer.from_dir(directory)
        reread = transformers.AutoTokenizer.from_pretrained(directory)
    for add_special_tokens in (True, False):
        expected = reference.encode(text, add_special_tokens=add_special_tokens)
        assert again.encode(text, add_special_tokens=add_special_tokens) == expected
        assert reread.encode(text, add_special_tokens=add_special_tokens) == expected
    ids = reference.encode(text)
    assert again.decode(ids) == reread.decode(ids) == reference.decode(ids)
    assert again.special_tokens_map == {**ours.special_tokens_map, "pad_token": ours.pad_token}
    assert reread.special_tokens_map == again.special_tokens_map
    assert reread.extra_special_tokens == again.extra_special_tokens == ours.extra_special_tokens
    assert reread.chat_template == again.chat_template == ours.chat_template
    assert again.model_max_length == ours.model_max_length
    assert (again.pad_token_id, again.vocab_size) == (ours.pad_token_id, ours.vocab_size)
    messages = [{"role": "user", "content": text}]
    if ours.chat_template is not None:
        assert again.apply_chat_template(messages) == reread.apply_chat_template(
            messages, tokenize=False
        )


def test_save_removes_stale_template_and_keeps_named_templates(loaded, tmp_path):
    ours, _ = loaded["smollm2"]
    (tmp_path / "chat_template.jinja").write_text("stale {{ messages }}")
    untemplated = Tokenizer(ours.backend, special_tokens=ours.special_tokens_map)
    untemplated.save(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    assert Tokenizer.from_dir(tmp_path).chat_template is None

    several = Tokenizer(
        ours.backend,
        special_tokens=ours.special_tokens_map,
        chat_template={"default": ours.chat_template, "tool_use": QWEN2_TEMPLATE},
    )
    several.save(tmp_path / "several")
    again = Tokenizer.from_dir(tmp_path / "several")
    reread = transformers.AutoTokenizer.from_pretrained(tmp_path / "several")
    assert again.chat_template == reread.chat_template == several.chat_template
    messages = [{"role": "user", "content": "weather?"}]
    assert again.apply_chat_template(messages, tools=TOOLS) == reread.apply_chat_template(
        messages, tools=TOOLS, tokenize=False
    )
    assert again.apply_chat_template(messages) == reread.apply_chat_template(
        messages, tokenize=False
    )


# ---------------------------------------------------------------------- errors


def test_missing_directory_or_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is missing"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_files_are_named(checkpoints, tmp_path):
    def broken_copy(file_name: str, content: str) -> Path:
        directory = tmp_path / f"broken-{file_name}-{len(content)}"
        shutil.copytree(checkpoints["smollm2"], directory)
        (directory / file_name).write_text(content)
        return directory

    cases = [
        (
            "tokenizer.json",
            '{"model": {"type": "BPE", "vocab": ',
            r"tokenizer\.json is not valid JSON",
        ),
        ("tokenizer.json", "version https://git-lfs.github.com/spec/v1\n", "Git LFS pointer"),
        ("tokenizer.json", '{"model": {"type": "Nonsense"}}', r"tokenizer\.json could not be read"),
        ("tokenizer.json", "[1, 2]", r"tokenizer\.json is not a tokenizers file"),
        (
            "tokenizer_config.json",
            "{'single': 'quotes'}",
            r"tokenizer_config\.json is not valid JSON",
        ),
        ("tokenizer_config.json", "[]", r"tokenizer_config\.json must hold a JSON object"),
        (
            "generation_config.json",
            '{"eos_token_id": "two"}',
            r"generation_config\.json: eos_token_id",
        ),
        ("special_tokens_map.json", "{", r"special_tokens_map\.json is not valid JSON"),
    ]
    for file_name, content, message in cases:
        with pytest.raises(TokenizerError, match=message):
            Tokenizer.from_dir(broken_copy(file_name, content))


def test_no_chat_template(checkpoints, tmp_path):
    directory = write_metaspace_bpe(tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = Tokenizer.from_dir(directory)
    with pytest.raises(TokenizerError, match="has no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_errors(loaded):
    ours, _ = loaded["smollm2"]
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="does not compile"):
        ours.apply_chat_template(messages, chat_template="{% for m in messages %}")
    with pytest.raises(TokenizerError, match="failed to render"):
        ours.apply_chat_template(messages, chat_template="{{ messages[0]['content'] + 1 }}")
    with pytest.raises(TokenizerError, match="failed to render.*SecurityError"):
        ours.apply_chat_template(
            messages,
            chat_template="{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
        )
    with pytest.raises(ArgumentError, match="JSON-schema dicts"):
        ours.apply_chat_template(messages, tools=[len])
    with pytest.raises(ArgumentError, match="non-empty list"):
        ours.apply_chat_template([])
    with pytest.raises(ArgumentError, match="non-negative"):
        ours.decode([1, -100])


def test_sandbox_matches_transformers_globals(loaded):
    ours, reference = loaded["smollm2"]
    template = (
        "{{ {'a': '<é>'} | tojson }} {{ dict(x=1) | tojson }} {% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if loop.index > 1 %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }} {{ bos_token }}{{ eos_token }}"
        "{{ strftime_now('%Y') }}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    expected = reference.apply_chat_template(messages, tokenize=False, chat_template=template)
    assert ours.apply_chat_template(messages, chat_template=template) == expected
    assert expected.startswith('{"a": "<é>"} {"x": 1} 1 <|im_start|><|im_end|>')


def test_whitespace_control_and_message_normalisation_match_transformers(loaded):
    ours, reference = loaded["smollm2"]
    # lstrip_blocks + trim_blocks: indented block tags on their own lines leave no whitespace.
    template = (
        "    {% for m in messages %}\n"
        "  <{{ m | tojson }}|{{ m.reasoning_content }}|{{ m.thinking }}>\n"
        "    {% endfor %}\n"
        "{{ messages | length }}"
    )
    messages = [
        {"role": "user", "content": "q", "tool_calls": None},  # None values are dropped
        {
            "role": "assistant",
            "content": "a",
            "reasoning": "because",
        },  # aliased to reasoning_content
    ]
    expected = reference.apply_chat_template(messages, tokenize=False, chat_template=template)
    assert "tool_calls" not in expected and "because|because" in expected
    assert ours.apply_chat_template(messages, chat_template=template) == expected
