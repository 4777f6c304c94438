"""fnlm.data on `datasets`: the same tokenized rows whether read in this process, in two processes
or streamed; the tokenization cache and what invalidates it; splits and subsets (a hub dataset's
repository laid out locally, a saved DatasetDict); column mapping; long texts split into blocks
without a lost target; bad rows stopped on (named) or skipped (counted); the TrainConfig / CLI
options and their TRL spellings. Local files only, no network."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from test_data import LLAMA3_TEMPLATE
from tokenizer_fixtures import write_byte_level_bpe

from fnlm import data as data_lib
from fnlm.errors import ArgumentError, DataError
from fnlm.tokenizer import Tokenizer
from fnlm.train.config import TrainConfig, data_options

datasets = pytest.importorskip("datasets")  # the `data` and `test` extras install it


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no pad token: the fixture's choice
        return Tokenizer.from_dir(
            write_byte_level_bpe(tmp_path_factory.mktemp("tok"), chat_template=LLAMA3_TEMPLATE)
        )


def chat(*turns):
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


ROWS = [
    {"messages": chat("what is 2+2?", "4")},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello!"}]},
    {"instruction": "Add", "input": "1 and 2", "output": "3"},
    {"prompt": "Say yes", "completion": "yes"},
    {"text": "a plain text row about " + "many things " * 20},
    {"messages": chat("first", "one", "second", "two")},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def same_examples(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels)
        for x, y in zip(a.examples, b.examples, strict=True)
    )


def test_processes_streaming_and_in_process_give_the_same_rows(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [*ROWS, "", *ROWS * 2])  # a blank line: no row
    common = dict(max_seq_length=40, cache_dir=tmp_path / "cache")
    here = data_lib.prepare(path, tok, use_cache=False, **common)
    two = data_lib.prepare(path, tok, num_proc=2, **common)
    streamed = data_lib.prepare(path, tok, streaming=True, **common)
    assert same_examples(here, two) and same_examples(here, streamed)
    counts = ("rows", "examples", "tokens", "trained_tokens", "truncated", "blocks", "dropped")
    assert {k: here.stats[k] for k in counts} == {k: two.stats[k] for k in counts}
    assert here.stats["rows"] == streamed.stats["rows"] == len(ROWS) * 3
    assert here.stats["blocks"] >= 3 * 2 and here.stats["blocks"] % 3 == 0  # the long text row
    # A saved dataset: streamed and whole alike, in one process or two.
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": r["text"]} for r in ROWS if "text" in r] * 4).save_to_disk(
        saved
    )
    whole = data_lib.prepare(saved, tok, **common)
    assert same_examples(whole, data_lib.prepare(saved, tok, streaming=True, **common))
    assert same_examples(whole, data_lib.prepare(saved, tok, num_proc=2, **common))


def test_datasets_cache_is_reused_and_keyed_by_tokenizer_template_and_length(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cache = tmp_path / "cache"
    first = data_lib.prepare(path, tok, max_seq_length=64, num_proc=2, cache_dir=cache)
    again = data_lib.prepare(path, tok, max_seq_length=64, num_proc=2, cache_dir=cache)
    assert "cached" not in first.stats and "cached" in again.stats
    assert same_examples(first, again)
    longer = data_lib.prepare(path, tok, max_seq_length=65, num_proc=2, cache_dir=cache)
    assert "cached" not in longer.stats
    other = copy.copy(tok)
    other.chat_template = LLAMA3_TEMPLATE.replace("<|eot_id|>' }}", "<|eot_id|>\\n' }}")
    retemplated = data_lib.prepare(path, other, max_seq_length=64, num_proc=2, cache_dir=cache)
    assert "cached" not in retemplated.stats
    assert not same_examples(first, retemplated)
    write_jsonl(path, ROWS[:3])  # new contents: tokenized again
    changed = data_lib.prepare(path, tok, max_seq_length=64, num_proc=2, cache_dir=cache)
    assert "cached" not in changed.stats and changed.stats["rows"] == 3


def test_splits_and_subsets_of_a_hub_layout_and_a_saved_dataset_dict(tok, tmp_path):
    # A hub dataset repository as `datasets` reads it: configurations declared in the README.
    repo = tmp_path / "org_chats"
    (repo / "en").mkdir(parents=True)
    (repo / "fr").mkdir()
    write_jsonl(repo / "en" / "train_sft.jsonl", [{"messages": chat("hi", "hello")}] * 3)
    write_jsonl(repo / "en" / "test_sft.jsonl", [{"messages": chat("bye", "goodbye")}])
    write_jsonl(repo / "fr" / "train_sft.jsonl", [{"messages": chat("salut", "bonjour")}] * 2)
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: en\n  data_files:\n  - split: train_sft\n    path: en/train_sft.jsonl\n"
        "  - split: test_sft\n    path: en/test_sft.jsonl\n"
        "- config_name: fr\n  data_files:\n  - split: train_sft\n    path: fr/train_sft.jsonl\n"
        "---\n"
    )
    common = dict(max_seq_length=64, cache_dir=tmp_path / "cache")
    en = data_lib.prepare(repo, tok, subset="en", split="train_sft", **common)
    test = data_lib.prepare(repo, tok, subset="en", split="test_sft", **common)
    fr = data_lib.prepare(repo, tok, subset="fr", split="train_sft", **common)
    assert (len(en), len(test), len(fr)) == (3, 1, 2)
    assert "goodbye" in tok.decode(test.examples[0].tokens.tolist())
    with pytest.raises(DataError, match="could not load dataset .*split 'nope'"):
        data_lib.prepare(repo, tok, subset="en", split="nope", **common)
    saved = tmp_path / "dict"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"text": "one two three"}] * 2),
        test=datasets.Dataset.from_list([{"text": "four"}]),
    ).save_to_disk(saved)
    assert len(data_lib.prepare(saved, tok, split="test", **common)) == 1
    with pytest.raises(DataError, match=r"has splits \['test', 'train'\], not 'dev'"):
        data_lib.prepare(saved, tok, split="dev", **common)
    # A directory's splits by file name, as `datasets` finds them; a single file has none.
    (tmp_path / "plain").mkdir()
    write_jsonl(tmp_path / "plain" / "train.jsonl", [{"text": "one two"}] * 2)
    local = write_jsonl(tmp_path / "plain" / "test.jsonl", [{"text": "three"}])
    assert len(data_lib.prepare(tmp_path / "plain", tok, split="test", **common)) == 1
    with pytest.raises(ArgumentError, match="is a single file"):
        data_lib.prepare(local, tok, split="test", **common)


def test_column_mapping_parquet_and_jsonl(tok, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    bodies = ["first document", "second document here"]
    pq.write_table(pa.table({"body": bodies, "id": [1, 2]}), tmp_path / "d.parquet")
    mapped = data_lib.prepare(
        tmp_path / "d.parquet", tok, max_seq_length=64, columns={"text": "body"}, use_cache=False
    )
    direct = data_lib.prepare(
        write_jsonl(tmp_path / "t.jsonl", [{"text": b} for b in bodies]), tok, max_seq_length=64,
        use_cache=False,
    )  # fmt: skip
    assert same_examples(mapped, direct)
    through = data_lib.prepare(
        tmp_path / "d.parquet", tok, max_seq_length=64, columns={"text": "body"}, num_proc=2,
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert same_examples(mapped, through)
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
    for num_proc in (None, 2):  # read here, and through datasets
        with pytest.raises(DataError, match=r"bad\.parquet (is not a readable|could not be read)"):
            data_lib.prepare(tmp_path / "bad.parquet", tok, max_seq_length=64, num_proc=num_proc,
                             cache_dir=tmp_path / "cache")  # fmt: skip
    rows = [{"dialog": chat("q", "a")}, {"other": 1}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=r"c\.jsonl line 2: no column 'dialog'.*has \['other'\]"):
        data_lib.prepare(path, tok, max_seq_length=64, columns={"messages": "dialog"})


def test_long_text_becomes_blocks_that_lose_no_target(tok, tmp_path):
    text = " ".join(f"word{i}" for i in range(300))
    whole = data_lib.tokenize_example(tok, {"text": text})
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": text}])
    for limit in (16, 37, 64):
        data = data_lib.prepare(path, tok, max_seq_length=limit, use_cache=False)
        assert all(len(e) <= limit for e in data.examples)
        assert data.stats["blocks"] == len(data) > 1 and data.stats["truncated"] == 0
        # Each block's first token is the previous block's last one (context only): the targets
        # of the blocks, in order, are the document's targets, each once.
        targets = torch.cat([e.labels[1:] for e in data.examples])
        assert torch.equal(targets, whole.labels[1:])
        # Packed, every block stays a segment of its own and the trained tokens add up.
        batches = list(data_lib.micro_batches(data, batch_size=2, max_seq_length=limit, seed=1))
        assert sum(data_lib.trained_tokens(b) for b in batches) == len(whole) - 1
    cut = data_lib.prepare(path, tok, max_seq_length=16, text_blocks=False, use_cache=False)
    assert len(cut) == 1 and cut.stats["truncated"] == 1 and cut.stats["blocks"] == 0


BAD_ROWS = [
    json.dumps({"messages": chat("fine", "row")}),
    '{"messages": [broken json',
    json.dumps({"question": "no known keys"}),
    json.dumps({"messages": chat("long " * 40, "answer")}),
    json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
    json.dumps({"text": "another fine row"}),
]


@pytest.mark.parametrize("num_proc", [None, 2])
def test_bad_rows_stop_naming_the_row_or_are_skipped_and_counted(tok, tmp_path, num_proc):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    common = dict(max_seq_length=32, truncation=False, num_proc=num_proc, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2 is not valid JSON.*on_bad_row='skip'"):
        data_lib.prepare(path, tok, **common)
    with pytest.warns(UserWarning, match="4 bad row"):
        data = data_lib.prepare(path, tok, on_bad_row="skip", **common)
    assert len(data) == 2 and data.stats["skipped"] == 4 and data.stats["rows"] == 6
    named = "\n".join(data.stats["skipped_rows"])
    for line, why in [(2, "not valid JSON"), (3, "unknown row format"),
                      (4, "more than max_seq_length=32"), (5, "unknown role 'wizard'")]:  # fmt: skip
        assert f"bad.jsonl line {line}" in named and why in named
    first_fine = data_lib.tokenize_example(tok, {"messages": chat("fine", "row")})
    assert torch.equal(data.examples[0].tokens, first_fine.tokens)


def test_streaming_and_num_proc_options_are_checked(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    with pytest.raises(ArgumentError, match="streaming"):
        data_lib.prepare(path, tok, max_seq_length=32, streaming=True, num_proc=2)
    with pytest.raises(ArgumentError, match="num_proc must be a positive integer"):
        data_lib.prepare(path, tok, max_seq_length=32, num_proc=0)
    with pytest.raises(ArgumentError, match="on_bad_row must be one of"):
        data_lib.prepare(path, tok, max_seq_length=32, on_bad_row="ignore")


def test_train_config_data_options_flags_and_trl_names(tok, tmp_path):
    from fnlm.cli import normalize, parser
    from fnlm.cli.train import config_from_args

    config = TrainConfig.from_dict({
        "dataset_text_field": "body", "dataset_num_proc": 2, "dataset_train_split": "train_sft",
        "dataset_test_split": "test_sft", "dataset_config": "en", "on_bad_row": "skip",
        "enable_thinking": False,
    })  # fmt: skip
    assert (config.columns, config.num_proc, config.data_split, config.eval_split) == (
        ("text=body",),
        2,
        "train_sft",
        "test_sft",
    )
    options = data_options(config)
    assert options["columns"] == {"text": "body"} and options["subset"] == "en"
    assert options["template_kwargs"] == {"enable_thinking": False}
    assert TrainConfig(columns={"messages": "dialog"}).columns == ("messages=dialog",)
    for bad, match in [
        ({"columns": ["words=body"]}, "KEY=COLUMN"),
        ({"on_bad_row": "ignore"}, "on_bad_row must be one of"),
        ({"num_proc": 0}, "num_proc must be a positive integer"),
        ({"streaming": True, "num_proc": 4}, "streaming"),
        ({"columns": ["text=a"], "dataset_text_field": "b"}, "given twice"),
        ({"columns": ["text=a", "text=b"]}, "'text' is given twice"),
        ({"method": "dpo", "num_proc": 2}, "num_proc applies to supervised data"),
        ({"packing": False, "packing_strategy": "wrapped"}, "'wrapped' packs rows, but packing"),
        ({"packing_strategy": "bfd_split"}, "packing_strategy must be one of"),
        ({"method": "dpo", "packing_strategy": "wrapped"}, "packing_strategy applies to super"),
        ({"rollout_dequantized": True}, "rollout_dequantized must be off for a method without"),
    ]:
        with pytest.raises(ArgumentError, match=match):
            TrainConfig.from_dict(bad)
    args = parser().parse_args(normalize(
        ["train", "--data", "org/set", "--data-split", "train_sft", "--columns", "text=body",
         "--num-proc", "3", "--on-bad-row", "skip", "--no-enable-thinking", "--streaming",
         "--num-proc", "1", "--dataset_config", "en"]
    ))  # fmt: skip
    parsed = config_from_args(args)
    assert (parsed.data_split, parsed.columns, parsed.num_proc, parsed.on_bad_row) == (
        "train_sft",
        ("text=body",),
        1,
        "skip",
    )
    assert parsed.enable_thinking is False and parsed.streaming and parsed.data_subset == "en"


def test_training_setup_reads_the_eval_split(tok, tmp_path):
    from fnlm.train.setup import prepare_data

    saved = tmp_path / "dict"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"text": f"row {i} of training"} for i in range(3)]),
        test=datasets.Dataset.from_list([{"text": "held out"}]),
    ).save_to_disk(saved)
    config = TrainConfig(data=str(saved), eval_split="test", max_seq_length=32,
                         cache_dir=str(tmp_path / "cache"))  # fmt: skip
    data, eval_data = prepare_data(config, tok, None, None)
    assert (len(data), len(eval_data)) == (3, 1)


def test_a_run_trains_on_a_split_skips_a_bad_row_and_evaluates_the_eval_split(tmp_path, capsys):
    """End to end: `fnlm.train.train` on a saved DatasetDict's train split tokenized in two
    processes, its one bad row skipped and reported, the test split as held-out data."""
    import transformers
    from models import saved_checkpoint

    from fnlm import train as train_lib

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tok = Tokenizer.from_dir(write_byte_level_bpe(model_dir, chat_template=LLAMA3_TEMPLATE))
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )  # fmt: skip
    with saved_checkpoint(config) as (model, _):
        model.save_pretrained(model_dir)
    train_rows = [{"dialog": chat(f"what is {i}+{i}?", f"{2 * i}")} for i in range(8)]
    train_rows.append({"dialog": None, "note": "no conversation"})  # a bad row
    saved = tmp_path / "dict"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(train_rows),
        test=datasets.Dataset.from_list([{"dialog": chat("what is 9+9?", "18"), "note": None}]),
    ).save_to_disk(saved)
    result = train_lib.train(
        TrainConfig(
            model=str(model_dir),
            data=str(saved),
            eval_split="test",
            columns=("messages=dialog",),
            num_proc=2,
            on_bad_row="skip",
            mode="lora",
            max_steps=2,
            batch_size=2,
            grad_accum=1,
            max_seq_length=64,
            out=str(tmp_path / "run"),
            progress=False,
            cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
    )
    assert result.step == 2 and result.eval_losses and math.isfinite(result.eval_losses[-1][1])
    printed = capsys.readouterr().out
    assert "8 training examples" in printed and "1 bad row(s) skipped" in printed
    assert "1 held-out examples" in printed
