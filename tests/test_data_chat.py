"""Assistant-only labels under Qwen3's own chat template, which renders earlier assistant turns
without their reasoning once a later user turn exists: the learned text equals the assistant
spans written out by hand, with and without enable_thinking, and the tokens equal transformers'
tokens of transformers' render. Qwen3's template with `{% generation %}` markers (TRL's training
variant) gives transformers' own assistant mask. Templates: the texts TRL keeps of them
(trl/chat_templates/qwen3.jinja is the template Qwen3 checkpoints ship); tokenizer: the real
SmolLM2 one (ChatML special tokens)."""

from __future__ import annotations

import copy
import importlib.resources
import warnings

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import write_smollm2

from fnlm import data as data_lib
from fnlm.errors import DataError
from fnlm.tokenizer import Tokenizer

trl_templates = importlib.resources.files("trl") / "chat_templates"  # trl: in the test extra
QWEN3 = (trl_templates / "qwen3.jinja").read_text()
QWEN3_TRAINING = (trl_templates / "qwen3_training.jinja").read_text()


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    directory = write_smollm2(tmp_path_factory.mktemp("qwen3"))
    (directory / "chat_template.jinja").write_text(QWEN3)
    return directory


@pytest.fixture(scope="module")
def tok(qwen3_dir) -> Tokenizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = Tokenizer.from_dir(qwen3_dir)
    assert tok.chat_template == QWEN3
    return tok


@pytest.fixture(scope="module")
def reference(qwen3_dir):
    return transformers.AutoTokenizer.from_pretrained(qwen3_dir)


def learned(tok, example) -> str:
    return "".join(
        tok.decode([t]) for t, lab in zip(example.tokens.tolist(), example.labels.tolist())
        if lab != data_lib.IGNORE_INDEX
    )  # fmt: skip


TWO_TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6", "reasoning_content": "add again"},
]


@pytest.mark.parametrize("thinking", [None, True])
def test_qwen3_two_turns_learn_the_hand_computed_spans(tok, reference, thinking):
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    example = data_lib.tokenize_example(
        tok, {"messages": TWO_TURNS}, template_kwargs=kwargs, where="row 1"
    )
    # The whole conversation, as Qwen3 renders it: the first answer's reasoning is dropped.
    by_hand = (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nadd again\n</think>\n\n6<|im_end|>\n"
    )
    rendered = reference.apply_chat_template(TWO_TURNS, tokenize=False, **kwargs)
    assert rendered == by_hand
    assert example.tokens.tolist() == reference.encode(by_hand, add_special_tokens=False)
    # What the model generates after each generation prompt: with thinking the reasoning is
    # generated; the first turn's, no longer in the text, is not learned.
    assert learned(tok, example) == "4<|im_end|>\n<think>\nadd again\n</think>\n\n6<|im_end|>\n"


def test_qwen3_without_thinking_leaves_the_empty_think_block_to_the_prompt(tok, reference):
    chat = [dict(m) for m in TWO_TURNS]
    chat[3] = {"role": "assistant", "content": "6"}  # reasoning in the first answer only
    for kwargs, last in [({}, "<think>\n\n</think>\n\n6<|im_end|>\n"),
                         ({"enable_thinking": False}, "6<|im_end|>\n")]:  # fmt: skip
        example = data_lib.tokenize_example(tok, {"messages": chat}, template_kwargs=kwargs)
        rendered = reference.apply_chat_template(chat, tokenize=False, **kwargs)
        # Prompt and answer are tokenized apart, as at inference, where the prompt ending in
        # "</think>\n\n" is encoded alone ("\n\n6" encoded whole merges differently).
        prompt, answer = rendered.rsplit("6<|im_end|>", 1)[0], "6<|im_end|>\n"
        if not kwargs:
            prompt, answer = prompt[: -len("<think>\n\n</think>\n\n")], last
        ids = reference.encode(prompt, add_special_tokens=False)
        assert example.tokens.tolist() == ids + reference.encode(answer, add_special_tokens=False)
        assert learned(tok, example) == "4<|im_end|>\n" + last
    # Reasoning in the last turn while thinking is off: the generation prompt (an empty think
    # block) is not what precedes the answer, so it cannot be told from the prompt.
    with pytest.raises(DataError, match="row 9: the chat template renders assistant turn 3"):
        data_lib.tokenize_example(
            tok, {"messages": TWO_TURNS}, template_kwargs={"enable_thinking": False},
            where="row 9",
        )  # fmt: skip


content = st.text(alphabet=st.sampled_from(list("ab <>/\nxyz?")), min_size=1, max_size=12).filter(
    lambda s: s.strip() == s
)


@settings(max_examples=15, deadline=None)
@given(turns=st.lists(content, min_size=2, max_size=6), thinking=st.booleans(), data=st.data())
def test_qwen3_learns_every_answer_as_the_full_render_holds_it(tok, reference, turns, thinking,
                                                               data):  # fmt: skip
    chat = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    if data.draw(st.booleans()):
        chat.insert(0, {"role": "system", "content": "be brief"})
    kwargs = {"enable_thinking": thinking}
    example = data_lib.tokenize_example(tok, {"messages": chat}, template_kwargs=kwargs)
    rendered = reference.apply_chat_template(chat, tokenize=False, **kwargs)
    assert reference.decode(example.tokens.tolist()) == rendered
    answers = [m["content"] for m in chat if m["role"] == "assistant"]
    last_user = max(i for i, m in enumerate(chat) if m["role"] == "user")
    after = [m["content"] for m in chat[last_user:] if m["role"] == "assistant"]
    before = answers[: len(answers) - len(after)]
    # Answers before the last question are rendered bare; the ones after it with a think block,
    # which is generated (learned) with thinking on and part of the prompt with it off.
    think = "" if not thinking else "<think>\n\n</think>\n\n"
    expected = "".join(a + "<|im_end|>\n" for a in before)
    expected += "".join(
        (think if i == len(after) - 1 else "") + a + "<|im_end|>\n" for i, a in enumerate(after)
    )
    assert learned(tok, example) == expected


def test_generation_markers_give_transformers_assistant_mask(tok, reference):
    chat = [dict(m) for m in TWO_TURNS]
    marked = copy.copy(tok)
    marked.chat_template = QWEN3_TRAINING
    example = data_lib.tokenize_example(marked, {"messages": chat})
    out = reference.apply_chat_template(
        chat, chat_template=QWEN3_TRAINING, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )  # fmt: skip
    assert example.tokens.tolist() == list(out["input_ids"])
    mask = torch.tensor(out["assistant_masks"], dtype=torch.bool)
    assert torch.equal(example.labels != data_lib.IGNORE_INDEX, mask)
    assert mask.any()
