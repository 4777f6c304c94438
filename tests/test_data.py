"""fnlm.data: row formats, chat rendering and response masks (against transformers' tokenizer on
the same template), packing, padded batches, the tokenization cache, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st
from tokenizer_fixtures import write_byte_level_bpe

from fnlm import data as data_lib
from fnlm.errors import ArgumentError, DataError
from fnlm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent

# Llama-3's chat layout: bos, a header per turn, <|eot_id|> closing each turn.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# A template that rewrites earlier turns once a later one exists (as reasoning templates drop
# past thinking): responses cannot be cut out turn by turn.
REWRITING_TEMPLATE = (
    "{%- for m in messages %}{%- if m['role'] == 'assistant' and not loop.last %}[old]"
    "{%- else %}{{ m['role'] }}: {{ m['content'] }}\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}assistant: {%- endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_byte_level_bpe(tmp_path_factory.mktemp("tok"), chat_template=LLAMA3_TEMPLATE)


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(*turns):
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


# --- formats --------------------------------------------------------------------------------


def test_formats_standardize_to_the_same_chat():
    expected = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add 2 and 3.\n\nUse digits."},
            {"role": "assistant", "content": "5"},
        ]
    }
    rows = {
        "messages": expected,
        "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."},
                                       {"from": "human", "value": "Add 2 and 3.\n\nUse digits."},
                                       {"from": "gpt", "value": "5"}]},
        "alpaca": {"instruction": "Add 2 and 3.", "input": "Use digits.", "output": "5",
                   "system": "Be brief."},
    }  # fmt: skip
    for kind, value in rows.items():
        row = data_lib.Row(value, f"{kind} row")
        assert data_lib.row_format(row) == kind
        assert data_lib.standardize(row) == expected, kind
    prompt = data_lib.Row({"prompt": "Hi", "completion": "Hello"}, "p")
    assert data_lib.standardize(prompt) == {"messages": chat("Hi", "Hello")}
    text = data_lib.Row({"text": "plain text", "meta": 1}, "t")
    assert data_lib.standardize(text) == {"text": "plain text"}
    alpaca_no_input = data_lib.Row({"instruction": "Say hi", "input": "", "output": "hi"}, "a")
    assert data_lib.standardize(alpaca_no_input) == {"messages": chat("Say hi", "hi")}


def test_unknown_row_format_names_the_row_and_its_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"question": "q", "answer": "a"}])
    rows = data_lib.read_rows(path)
    with pytest.raises(
        DataError, match=r"d\.jsonl line 2: unknown row format; found keys \['answer', 'question'\]"
    ):
        data_lib.standardize(rows[1])
    for value, said in [({"text": 5}, "'text' must be a string, got int"),
                        ({"text": None, "id": 3}, "'text' must be a string, got NoneType"),
                        ({"messages": "hi"}, "'messages' must be a list, got str")]:  # fmt: skip
        with pytest.raises(DataError, match=f"row 7: {said}"):
            data_lib.standardize(data_lib.Row(value, "row 7"))
    bad_role = data_lib.Row({"conversations": [{"from": "narrator", "value": "x"}]}, "row 9")
    with pytest.raises(DataError, match="row 9: conversations.0. has unknown from 'narrator'"):
        data_lib.standardize(bad_role)
    bad_turn = data_lib.Row({"messages": [{"role": "user"}]}, "row 3")
    with pytest.raises(
        DataError,
        match=r"row 3: messages\[0\] must be an object with 'role' and 'content'; found \['role'\]",
    ):
        data_lib.standardize(bad_turn)


def test_missing_empty_and_malformed_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data_lib.read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no rows"):
        data_lib.read_rows(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl line 2 is not valid JSON"):
        data_lib.read_rows(tmp_path / "broken.jsonl")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="holds no"):
        data_lib.read_rows(tmp_path / "emptydir")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match="needs pyarrow"):
            data_lib.read_rows(tmp_path / "d.parquet")


def test_json_files_and_directories(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": [{"text": "x"}, {"text": "y"}]}))
    (tmp_path / "b.jsonl").write_text('{"text": "z"}\n')
    rows = data_lib.read_rows(tmp_path)
    assert [r.value["text"] for r in rows] == ["x", "y", "z"]
    assert rows[1].where.endswith("a.json row 1")


# --- chat rendering and masks ---------------------------------------------------------------

content = st.text(
    alphabet=st.sampled_from(list("abcdefgh xyz,.!?0123") + ["é", "日", "😀", "\n"]),
    min_size=1,
    max_size=20,
).filter(lambda s: s.strip() == s)


@given(turns=st.lists(content, min_size=2, max_size=6), system=st.one_of(st.none(), content))
def test_chat_tokens_and_response_mask(tok, reference, turns, system):
    messages = chat(*turns)
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    example = data_lib.tokenize_example(tok, {"messages": messages})
    # The tokens are the reference tokenizer's tokens of the reference render.
    rendered = reference.apply_chat_template(messages, tokenize=False)
    assert example.tokens.tolist() == reference.encode(rendered, add_special_tokens=False)
    # The learned tokens are exactly the assistant turns with their end-of-turn marker.
    learned = example.tokens[example.labels != data_lib.IGNORE_INDEX].tolist()
    answers = "".join(m["content"] + "<|eot_id|>" for m in messages if m["role"] == "assistant")
    assert reference.decode(learned) == answers
    # Without the mask, everything is learned.
    full = data_lib.tokenize_example(tok, {"messages": messages}, train_on_responses_only=False)
    assert torch.equal(full.tokens, example.tokens) and torch.equal(full.labels, full.tokens)


def test_text_rows_get_bos_and_eos(tok, reference):
    example = data_lib.tokenize_example(tok, {"text": "Hello world!"})
    ids = reference.encode("Hello world!") + [reference.eos_token_id]
    assert example.tokens.tolist() == ids and torch.equal(example.labels, example.tokens)


def test_template_that_rewrites_turns_cannot_be_masked(tmp_path):
    tok = Tokenizer.from_dir(write_byte_level_bpe(tmp_path, chat_template=REWRITING_TEMPLATE))
    with pytest.raises(
        DataError, match="row 4: the chat template does not render this conversation turn by turn"
    ):
        data_lib.tokenize_example(tok, {"messages": chat("a", "b", "c", "d")}, where="row 4")
    with pytest.raises(DataError, match="starts with an assistant turn"):
        data_lib.tokenize_example(tok, {"messages": [{"role": "assistant", "content": "x"}]})


# --- prepare: truncation, dropped rows, cache -----------------------------------------------


def test_prepare_truncates_counts_and_rejects(tok, tmp_path):
    rows = [
        {"messages": chat("short question", "short answer")},
        {"messages": chat("long one", "a b " * 30)},  # longer than the limit
        {"messages": [{"role": "user", "content": "no answer here"}]},  # nothing to learn
        {"text": "a plain text row"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = data_lib.prepare(path, tok, max_seq_length=48, cache_dir=tmp_path / "cache")
    assert data.stats["rows"] == 4 and data.stats["dropped"] == 1 and data.stats["truncated"] == 1
    assert data.stats["tokens_cut"] > 0 and len(data) == 3
    assert max(len(e) for e in data.examples) == 48
    with pytest.raises(
        DataError,
        match=r"d\.jsonl line 2: the example is \d+ tokens long, more than max_seq_length=48",
    ):
        data_lib.prepare(path, tok, max_seq_length=48, truncation=False, use_cache=False)
    none = write_jsonl(tmp_path / "none.jsonl", [rows[2]])
    with pytest.raises(DataError, match="has a token to learn"):
        data_lib.prepare(none, tok, max_seq_length=48, use_cache=False)
    with pytest.raises(DataError, match="line 1: unknown row format"):
        data_lib.prepare(
            write_jsonl(tmp_path / "x.jsonl", [{"q": 1}]), tok, max_seq_length=48, use_cache=False
        )


def test_tokenization_is_cached_and_keyed_by_content(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat("hi", "hello")}] * 3)
    cache = tmp_path / "cache"
    first = data_lib.prepare(path, tok, max_seq_length=64, cache_dir=cache)
    second = data_lib.prepare(path, tok, max_seq_length=64, cache_dir=cache)
    assert "cached" not in first.stats and "cached" in second.stats
    for a, b in zip(first.examples, second.examples, strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    write_jsonl(path, [{"messages": chat("hi", "bye")}] * 3)  # new content -> new key
    third = data_lib.prepare(path, tok, max_seq_length=64, cache_dir=cache)
    assert "cached" not in third.stats and not torch.equal(
        third.examples[0].tokens, first.examples[0].tokens
    )
    other = data_lib.prepare(
        path, tok, max_seq_length=64, cache_dir=cache, train_on_responses_only=False
    )
    assert "cached" not in other.stats


# --- batches --------------------------------------------------------------------------------


def examples_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        t = torch.randint(0, 50, (n,), generator=g, dtype=torch.int32)
        out.append(data_lib.Example(t, t.clone()))
    return out


@given(lengths=st.lists(st.integers(1, 16), min_size=1, max_size=30), limit=st.integers(16, 40))
def test_pack_fills_rows_without_overflow_or_loss(lengths, limit):
    rows = data_lib.pack(lengths, limit)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= limit for row in rows)
    # first fit: no example could have gone into an earlier row with room
    assert len(rows) <= max(1, -(-2 * sum(lengths) // limit))


@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=20), limit=st.integers(2, 24))
def test_wrap_fills_every_row_and_learns_each_target_once_in_its_context(lengths, limit):
    """Wrapped rows are full but the last (at most one token short, where a one-token piece
    would learn nothing), and collated they learn exactly the targets of the whole examples,
    each once and after the same token: every token id is unique, so each learned
    (previous token, target) pair names its place in its example."""
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    examples = []
    for start, n in zip(starts, lengths, strict=True):
        t = torch.arange(start, start + n, dtype=torch.int32)
        examples.append(data_lib.Example(t, t.clone()))
    rows = data_lib.wrap(lengths, limit)
    cut = [len(data_lib.piece(examples, i)) for row in rows for i in row if not isinstance(i, int)]
    filled = [sum(len(data_lib.piece(examples, i)) for i in row) for row in rows]
    assert all(limit - 1 <= n <= limit for n in filled[:-1]) and 0 < filled[-1] <= limit
    assert all(n >= 2 for n in cut)  # a piece of a cut example learns at least one target
    batch = data_lib.collate_packed(
        [[data_lib.piece(examples, item) for item in row] for row in rows],
        pad_id=-1, length=limit,
    )  # fmt: skip
    learned = batch["labels"] != data_lib.IGNORE_INDEX
    pairs = sorted(zip(batch["tokens"][:, :-1][learned[:, 1:]].tolist(),
                       batch["labels"][:, 1:][learned[:, 1:]].tolist(), strict=True))  # fmt: skip
    expected = sorted((t - 1, t) for s, n in zip(starts, lengths, strict=True)
                      for t in range(s + 1, s + n))  # fmt: skip
    assert pairs == expected
    # every piece is a segment of its own, so attention (kept inside segments) stays in it
    for r, row in enumerate(rows):
        assert int(batch["segments"][r].max()) == len(row)


def test_epoch_plan_wraps_and_refuses_an_unknown_strategy():
    data = data_lib.TokenizedData(examples_of([5, 9, 3, 7]), "x")
    plan = data_lib.epoch_plan(data, batch_size=8, max_seq_length=6, packing=True, seed=0,
                               epoch=0, strategy="wrapped")  # fmt: skip
    rows = plan[0]
    pieces = [i for row in rows for i in row]
    cuts = sum(1 for i in pieces if not isinstance(i, int)) - len(
        {i[0] for i in pieces if not isinstance(i, int)}
    )
    batch = data_lib.collate(data, rows, pad_id=0, packing=True, length=6)
    filled = [int((row > 0).sum()) for row in batch["segments"]]
    assert sum(filled) == 24 + cuts and cuts >= 1  # each cut repeats one token
    assert sum(n < 5 for n in filled) <= 1  # only the last row is short (shuffled into the plan)
    with pytest.raises(ArgumentError, match="packing strategy must be one of"):
        data_lib.epoch_plan(data, batch_size=2, max_seq_length=6, packing=True, seed=0,
                            epoch=0, strategy="wrap")  # fmt: skip


def test_collate_packed_restarts_positions_and_masks_boundaries():
    examples = examples_of([3, 2, 4])
    batch = data_lib.collate_packed([examples[:2], examples[2:]], pad_id=7, pad_to_multiple=8)
    assert batch["tokens"].shape == (2, 8)
    assert batch["positions"][0].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert batch["segments"][0].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    assert batch["segments"][1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    first = examples[0].tokens.tolist()
    assert batch["labels"][0].tolist() == [
        -100,
        *first[1:],
        -100,
        examples[1].tokens[1].item(),
        -100,
        -100,
        -100,
    ]
    assert batch["tokens"][0, 5:].tolist() == [7, 7, 7]
    single = data_lib.collate_packed([[examples[0]]], pad_id=0)
    assert set(single) == {"tokens", "labels"}  # one example, no padding: plain causal
    assert data_lib.trained_tokens(batch) == (2 + 1) + 3


def test_collate_padded_and_epoch_plan():
    examples = examples_of([3, 5])
    batch = data_lib.collate_padded(examples, pad_id=9)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"][0, 3:].tolist() == [-100, -100]
    data = data_lib.TokenizedData(examples_of([4] * 10), "x")
    plan = lambda epoch: data_lib.epoch_plan(
        data, batch_size=2, max_seq_length=8, packing=True, seed=1, epoch=epoch
    )
    assert plan(0) == plan(0) and plan(0) != plan(1)
    assert sorted(i for mb in plan(1) for row in mb for i in row) == list(range(10))
    train, held = data.split(0.2, seed=0)
    assert len(train) == 8 and len(held) == 2


def test_demo_data_is_well_formed_and_holds_out_the_demo_prompts():
    rows = data_lib.read_rows(ROOT / "data" / "demo.jsonl")
    assert len(rows) >= 200
    chats = [data_lib.standardize(r)["messages"] for r in rows]
    for messages in chats:
        answer = messages[-1]["content"]
        assert answer.startswith("Arr, matey! ") and answer.endswith(" Yo ho ho!")
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    prompts = {m[0]["content"].lower() for m in chats}
    subjects = {
        "japan": "capital of japan",
        "spider": "spider",
        "wolf": "wolf",
        "healthy": "healthy",
    }
    for subject, held_out in zip(subjects, demo.HELD_OUT, strict=True):
        assert subject in held_out.lower()
        assert held_out.lower() not in prompts
        # no training question is about the subject, so the answer cannot be memorized
        assert not any(subjects[subject] in p for p in prompts)
