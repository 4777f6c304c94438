"""The Ollama Modelfile written beside a GGUF export: its TEMPLATE rendered by Go's text/template
(tests/ollama/render.go, as Ollama renders it; skipped without `go`) must give the chat template's
own text for every conversation, for each common template shape and the embedded SmolLM2; a
template of another shape is reported, and the Modelfile keeps FROM and the stops."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import transformers

import fnlm
from fnlm.gguf.ollama import modelfile
from fnlm.tokenizer import Tokenizer
from tests.test_tokenizer import GEMMA_TEMPLATE
from tests.tokenizer_fixtures import write_byte_level_bpe

RENDER_GO = Path(__file__).parent / "ollama" / "render.go"
needs_go = pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (apt install golang-go)")

CHATML = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Meta-Llama-3-8B-Instruct's
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = GEMMA_TEMPLATE  # gemma-2-9b-it's
# Mistral-7B-Instruct-v0.1's
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index % 2 == 1) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)
# Gemma 3's shape: the system prompt merged into the first user turn (no per-role reading)
MERGED_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content']"
    " + '\\n\\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (first if loop.first else '') + message['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# shape -> (template, special tokens, bos, eos, the end-of-turn stop)
SHAPES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>"),
    "llama3": (LLAMA3, [], "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
              "<end_of_turn>"),
    "mistral": (MISTRAL, ["<s>", "</s>"], "<s>", "</s>", "</s>"),
}  # fmt: skip
CONVERSATIONS = [
    [("user", "Hi there")],
    [("system", "Answer in French."), ("user", "What is the capital of France?")],
    [("user", "One"), ("assistant", "Two"), ("user", 'Three "quoted" {{ braces }} ünïcode 😀')],
    [("system", "S"), ("user", "A\nB"), ("assistant", "C"), ("user", "D"), ("assistant", "E"),
     ("user", "F")],
]  # fmt: skip


def shaped_tokenizer(directory: Path, template: str, specials, bos, eos) -> Tokenizer:
    write_byte_level_bpe(directory)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    hf.add_special_tokens({"additional_special_tokens": specials, "bos_token": bos or "",
                           "eos_token": eos})  # fmt: skip
    if bos is None:
        hf.bos_token = None
    hf.chat_template = template
    hf.save_pretrained(directory)
    return Tokenizer.from_dir(directory)


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    return {
        name: shaped_tokenizer(tmp_path_factory.mktemp(name), template, specials, bos, eos)
        for name, (template, specials, bos, eos, _) in SHAPES.items()
    }


def parse(text: str) -> dict:
    """A Modelfile's instructions: FROM, TEMPLATE, SYSTEM (strings) and the stops (a list)."""
    found = {"stops": re.findall(r'^PARAMETER stop (".*")$', text, re.M)}
    found["stops"] = [json.loads(s) for s in found["stops"]]
    for key in ("FROM", "TEMPLATE", "SYSTEM"):
        match = re.search(rf'^{key} (?:"""(.*?)"""|(\S+))$', text, re.M | re.S)
        if match:
            found[key] = match.group(1) if match.group(1) is not None else match.group(2)
    return found


def go_render(cases: list[dict]) -> list[str]:
    done = subprocess.run(
        ["go", "run", str(RENDER_GO)], input=json.dumps(cases), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_ollama_renders_as_template(tok, text: str, add_bos: bool) -> None:
    """Each conversation through Ollama's steps (the Modelfile's SYSTEM as a leading system
    message when the chat has none; BOS added by the runtime) gives the chat template's text."""
    parsed = parse(text)
    cases, expected = [], []
    for conversation in CONVERSATIONS:
        refused = conversation[0][0] == "system" and _refuses_system(tok)
        chat = conversation[1:] if refused else conversation
        messages = [{"role": r, "content": c} for r, c in chat]
        expected.append(tok.apply_chat_template(messages, add_generation_prompt=True))
        if "SYSTEM" in parsed and chat[0][0] != "system":
            messages = [{"role": "system", "content": parsed["SYSTEM"]}, *messages]
        cases.append({"template": parsed["TEMPLATE"], "messages": messages, "system": ""})
    bos = tok.bos_token if add_bos else ""
    rendered = [bos + r if not expected[i].startswith(bos + bos) else r
                for i, r in enumerate(go_render(cases))]  # fmt: skip
    assert rendered == expected


def _refuses_system(tok) -> bool:
    try:
        tok.apply_chat_template(
            [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
        )
    except Exception:
        return True
    return False


@needs_go
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_template_renders_in_go_as_the_chat_template(shaped, shape):
    tok = shaped[shape]
    add_bos = bool(tok.add_bos_token)
    with pytest.warns(UserWarning, match="refuses system") if shape in ("gemma", "mistral") else (
        _no_warning()
    ):  # fmt: skip
        text = modelfile(tok, "model-f16.gguf", add_bos=add_bos)
    assert_ollama_renders_as_template(tok, text, add_bos)


@needs_go
def test_smollm2_modelfile_renders_its_chat_template(tmp_path):
    params, tok = fnlm.load(None, quant=None, device="cpu")
    text = modelfile(tok, "smollm2.gguf", add_bos=bool(tok.add_bos_token))
    parsed = parse(text)
    assert parsed["SYSTEM"].startswith("You are a helpful AI assistant named SmolLM")
    assert parsed["stops"] == ["<|im_end|>"]
    assert_ollama_renders_as_template(tok, text, bool(tok.add_bos_token))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_modelfile_names_the_file_and_the_end_of_turn_stop(shaped, shape):
    tok = shaped[shape]
    text = modelfile(tok, "model-q4_0.gguf", add_bos=bool(tok.add_bos_token))
    parsed = parse(text)
    assert parsed["FROM"] == "./model-q4_0.gguf"
    assert SHAPES[shape][4] in parsed["stops"] and tok.eos_token in parsed["stops"]
    assert ("SYSTEM" in parsed) == (shape == "chatml")
    assert "ADAPTER" not in text  # the export is merged


def test_an_untranslatable_template_is_reported_and_keeps_from_and_stops(tmp_path):
    tok = shaped_tokenizer(tmp_path, MERGED_SYSTEM, ["<bos>", "<eos>", "<start_of_turn>",
                                                      "<end_of_turn>"], "<bos>", "<eos>")  # fmt: skip
    with pytest.warns(UserWarning, match="merged into the first user turn.*no TEMPLATE"):
        text = modelfile(tok, "m.gguf", add_bos=True)
    parsed = parse(text)
    assert "TEMPLATE" not in parsed and parsed["FROM"] == "./m.gguf"
    assert "<eos>" in parsed["stops"]


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


@pytest.fixture(scope="module")
def tiny_llama3(shaped, tmp_path_factory):
    """A tiny Llama checkpoint directory with the Llama 3 shaped tokenizer."""
    from tests.models import saved_checkpoint

    tok = shaped["llama3"]
    config = transformers.LlamaConfig(
        vocab_size=len(tok.backend.get_vocab()), hidden_size=32, intermediate_size=48,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("tiny")
    with saved_checkpoint(config) as (_, d):
        for file in Path(d).iterdir():
            shutil.copy(file, directory)
    tok.save(directory)
    return directory


def test_gguf_export_writes_the_modelfile_beside_it(tiny_llama3, tmp_path):
    params, tok = fnlm.load(tiny_llama3, quant=None, device="cpu")
    gguf = fnlm.save(tmp_path / "dir", params, tok, format="gguf", gguf_type="q8_0")
    text = (tmp_path / "dir" / "Modelfile").read_text()
    assert parse(text)["FROM"] == "./model-q8_0.gguf" == f"./{gguf.name}"
    assert "<|eot_id|>" in parse(text)["stops"] and "<|start_header_id|>" in parse(text)["TEMPLATE"]
    fnlm.save(tmp_path / "demo.gguf", params, tok, format="gguf")
    assert parse((tmp_path / "demo.Modelfile").read_text())["FROM"] == "./demo.gguf"
    (tmp_path / "demo.gguf").unlink()
    with pytest.raises(fnlm.errors.ExportError, match=r"demo.Modelfile exists"):
        fnlm.save(tmp_path / "demo.gguf", params, tok, format="gguf", ollama=True)
    fnlm.save(tmp_path / "bare.gguf", params, tok, format="gguf", ollama=False)
    assert not (tmp_path / "bare.Modelfile").exists()


def test_cli_export_gguf_writes_the_modelfile(tiny_llama3, tmp_path):
    from fnlm.cli import main

    base = ["export", "--model", str(tiny_llama3), "--format", "gguf"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "Modelfile").is_file()
    assert main([*base, "--out", str(tmp_path / "b.gguf"), "--no-modelfile"]) == 0
    assert (tmp_path / "b.gguf").is_file() and not (tmp_path / "b.Modelfile").exists()
