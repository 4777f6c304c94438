"""The checks every newer family's tests run against transformers (+ peft), shared by
tests/test_gpt_oss.py, test_gemma4.py, test_qwen3_5.py, test_qwen3_next.py, test_glm4_moe.py and
test_deepseek_v3.py: logits with and without left padding, greedy generation (compiled too),
packed rows, a saved adapter in peft, the merged export in transformers, LoRA training step by
step, and NF4 against transformers on the dequantized weights.

The check_* helpers take a family's checkpoint context, `checkpoint` (entered once, it yields
(model, directory): a transformers model and the directory it is saved in), and where they draw,
hypothesis' `data` after the test has drawn the config."""

from __future__ import annotations

import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import peft
import pytest
import torch
import transformers
from hypothesis import settings
from hypothesis import strategies as st

import fnlm
from fnlm.generate import generate_tokens, step
from tests.models import FP32_REL_TOL, build_model, max_rel_error
from tests.test_generate import prompt_batches, reference_generate
from tests.test_lora import randomize_fnlm, read_adapter
from tests.test_train import random_data, reference_run, rel_close, run_config

# a family file's pytestmark: its tiny checkpoints have no tokenizer, which transformers warns of
NO_TOKENIZER = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")
# hypothesis examples of a drawn family test (each saves and loads a tiny checkpoint)
EXAMPLES = settings(max_examples=3, deadline=None)


def family(*model_types: str):
    """Parametrizes a test by model_type: its pytest ids then carry the family name, by which
    scripts/support_table.py counts the test for that family."""
    return pytest.mark.parametrize("model_type", list(model_types))


def left_padding(data, seq: int) -> torch.Tensor:
    """A drawn attention mask [2-3, seq] of left-padded rows (each keeps at least one token)."""
    pads = data.draw(st.lists(st.integers(0, seq - 1), min_size=2, max_size=3))
    return torch.tensor([[0] * p + [1] * (seq - p) for p in pads])


def assert_logits_match(model, params, tokens: torch.Tensor, mask: torch.Tensor) -> None:
    """fnlm's fp32 logits equal the transformers model's on `tokens`, and on the real positions of
    the same rows left padded by `mask` (FP32_REL_TOL of the logits' scale)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(tokens).logits
        ref_padded = model(tokens, attention_mask=mask, position_ids=positions).logits
    assert max_rel_error(fnlm.forward(params, tokens), ref) <= FP32_REL_TOL
    ours_padded = fnlm.forward(params, tokens, attention_mask=mask)
    real = mask.bool()
    assert max_rel_error(ours_padded[real], ref_padded[real]) <= FP32_REL_TOL


def assert_training_matches_peft(model, params, examples, out, targets=None) -> None:
    """Six LoRA steps of fnlm.train give the losses of peft + transformers started from the same
    saved adapter (within 2e-6 relative); targets: fnlm's default when None."""
    run = run_config(out / "run", max_steps=6, warmup_steps=1, lr=1e-2)
    extra = {} if targets is None else {"targets": targets}
    lora = fnlm.lora.init(params, r=run.r, alpha=run.alpha, seed=run.seed, **extra)
    fnlm.lora.save(out / "initial", lora, params=params)
    ours = fnlm.train.train(run, params=params, lora=lora, data=examples)
    reference = peft.PeftModel.from_pretrained(model, out / "initial", is_trainable=True)
    tensors = [p for p in reference.parameters() if p.requires_grad]
    assert len(tensors) == len(fnlm.lora.parameters(lora))
    expected = reference_run(reference.train(), tensors, run, examples, 6)
    assert ours.status == "completed" and expected[-1] != expected[0]
    assert rel_close(ours.losses, expected, 2e-6), (ours.losses, expected)


@contextmanager
def router_bias_checkpoint(config, seed: int = 0):
    """tests.models.saved_checkpoint for the sigmoid routers of GLM-4.5 and DeepSeek-V3: (model,
    directory) of a random model saved with save_pretrained, its routers' correction biases random
    too (build_model randomizes parameters; the bias is a buffer), large enough to change which
    experts are chosen."""
    model = build_model(config, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.3)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        yield model, Path(d)


def load_fp32(directory):
    params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu")
    return params


def tokens_for(vocab: int, shape=(2, 9), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def assert_adapter_matches_peft(model, params, lora, directory, out, again, tokens):
    """fnlm's saved adapter (in `out`; `directory` the checkpoint's) loads in peft on `model` with
    fnlm's logits on `tokens`, merged too, changes them, and peft re-saves (in `again`) the same
    tensors (FP32_REL_TOL; the tensors equal). Returns the peft model."""
    fnlm.lora.save(out, lora, params=params, base_model_name_or_path=str(directory))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(model, out).eval()
        peft_model.save_pretrained(again)
    with torch.no_grad():
        ref = peft_model(tokens).logits
    ours = fnlm.forward(params, tokens, lora=lora)
    assert max_rel_error(ours, ref) <= FP32_REL_TOL
    assert max_rel_error(fnlm.forward(fnlm.lora.merge(params, lora), tokens), ours) <= FP32_REL_TOL
    assert max_rel_error(ours, fnlm.forward(params, tokens)) > 10 * FP32_REL_TOL
    _, ours_tensors = read_adapter(out)
    _, ref_tensors = read_adapter(again)
    assert ours_tensors.keys() == ref_tensors.keys()
    for key in ours_tensors:
        assert torch.equal(ours_tensors[key], ref_tensors[key]), key
    return peft_model


def assert_merged_export_matches(params, lora, out, tokens) -> None:
    """The merged export of params + lora (written to `out`) loads in transformers with fnlm's
    adapted logits on `tokens`, and in fnlm again (FP32_REL_TOL)."""
    fnlm.save(out, params, lora=lora, format="merged")
    ours = fnlm.forward(params, tokens, lora=lora)
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(tokens)
    assert max_rel_error(ref.logits, ours) <= FP32_REL_TOL
    assert max_rel_error(fnlm.forward(load_fp32(out), tokens), ours) <= FP32_REL_TOL


def check_logits_match(data, config, checkpoint, lengths=None):
    """Draws a sequence length from `lengths` (a strategy; 3 to 12 when None) and a left padding
    (left_padding) of rows that long: assert_logits_match on the fp32 params of `checkpoint` (of
    `config`). Returns the params."""
    seq = data.draw(st.integers(3, 12) if lengths is None else lengths)
    mask = left_padding(data, seq)
    with checkpoint as (model, directory):
        params = load_fp32(directory)
        assert_logits_match(model, params, tokens_for(config.vocab_size, mask.shape, seq), mask)
    return params


def check_greedy_matches(data, config, checkpoint, most_new: int, repeat: int = 1) -> None:
    """Draws a left-padded batch of prompts and 1 to `most_new` new tokens: greedy generation
    with fnlm's KV cache on the fp32 params of `checkpoint` equals transformers' generate, each of
    `repeat` times in a row."""
    prompts = data.draw(prompt_batches(config.vocab_size))
    new = data.draw(st.integers(1, most_new))
    with checkpoint as (model, directory):
        params = load_fp32(directory)
        ours = [
            generate_tokens(params, prompts, max_new_tokens=new, eos_token_ids=[])
            for _ in range(repeat)
        ]
        ref = reference_generate(model, prompts, new, None)
    for tokens in ours:
        assert tokens == ref


def check_compiled_generation_equals_eager(monkeypatch, checkpoint) -> None:
    """The compiled prefill and decode layers (generate's compile=True; on the CPU with a backend
    that runs dynamo's traced graph) give eager's greedy tokens, which are transformers'."""
    monkeypatch.setattr(step, "COMPILE_BACKEND", lambda gm, inputs: gm.forward)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    with checkpoint as (model, directory):
        params = load_fp32(directory)
        eager = generate_tokens(params, prompts, max_new_tokens=5, eos_token_ids=[])
        compiled = generate_tokens(
            params, prompts, max_new_tokens=5, eos_token_ids=[], compile=True
        )
        ref = reference_generate(model, prompts, 5, None)
    assert eager == compiled == ref


def check_packed_rows_equal_documents(
    data, config, checkpoint, padding: int = 0, first_segment: int = 0
) -> None:
    """Draws 2-3 documents of 1-9 tokens and packs them in one row (segments numbered from
    `first_segment`, positions restarting per document), then `padding` tokens of segment 0: each
    document's logits are those of the document alone (FP32_REL_TOL)."""
    lengths = data.draw(st.lists(st.integers(1, 9), min_size=2, max_size=3))
    with checkpoint as (_, directory):
        params = load_fp32(directory)
    docs = [tokens_for(config.vocab_size, (1, n), seed=i) for i, n in enumerate(lengths)]
    tokens = torch.cat([*docs, torch.zeros(1, padding, dtype=torch.long)], dim=1)
    segments = torch.cat(
        [torch.full((1, n), first_segment + i) for i, n in enumerate(lengths)]
        + [torch.zeros(1, padding)],
        dim=1,
    ).long()
    positions = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(padding)]).long()[None]
    packed = fnlm.forward(params, tokens, positions=positions, segments=segments)
    alone = torch.cat([fnlm.forward(params, d) for d in docs], dim=1)
    assert max_rel_error(packed[:, : sum(lengths)], alone) <= FP32_REL_TOL


def assert_nf4_matches_dequantized(model, params, tokens: torch.Tensor, out) -> None:
    """NF4 `params` give on `tokens` the logits transformers gives on their dequantized weights,
    written to `out` by fnlm's merged export, and the NF4 error is real: those logits are over 100
    FP32_REL_TOL from `model`'s. Call it once the checkpoint's directory is gone: the export would
    read the 16-bit weights of params.source instead."""
    with torch.no_grad():
        full = model(tokens).logits
    fnlm.save(out, params, format="merged")
    with torch.no_grad():
        dequantized = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        ref = dequantized(tokens).logits
    assert max_rel_error(ref, full) > 100 * FP32_REL_TOL
    assert max_rel_error(fnlm.forward(params, tokens), ref) <= FP32_REL_TOL


def check_adapter_matches_peft(config, checkpoint, tmp_path_factory, **init) -> None:
    """A randomized (randomize_fnlm) fnlm.lora.init(params, r=4, alpha=8, **init) on the fp32
    params of `checkpoint`: assert_adapter_matches_peft on tokens_for(config.vocab_size)."""
    out, again = tmp_path_factory.mktemp("adapter"), tmp_path_factory.mktemp("again")
    with checkpoint as (model, directory):
        params = load_fp32(directory)
        lora = randomize_fnlm(fnlm.lora.init(params, r=4, alpha=8, **init))
        tokens = tokens_for(config.vocab_size)
        assert_adapter_matches_peft(model, params, lora, directory, out, again, tokens)


def check_training_matches_peft(config, checkpoint, tmp_path_factory, targets=None) -> None:
    """assert_training_matches_peft on the fp32 params of `checkpoint` and 12 random examples
    (random_data) of up to 20 tokens; targets: fnlm's default when None."""
    examples = random_data(n=12, vocab=config.vocab_size, longest=20)
    out = tmp_path_factory.mktemp("train")
    with checkpoint as (model, directory):
        params = load_fp32(directory)
        assert_training_matches_peft(model, params, examples, out, targets=targets)


def check_merged_export_matches(config, checkpoint, tmp_path_factory, targets) -> None:
    """A randomized rank-2 adapter on `targets` of the fp32 params of `checkpoint`:
    assert_merged_export_matches on tokens_for(config.vocab_size)."""
    out = tmp_path_factory.mktemp("merged")
    with checkpoint as (_, directory):
        params = load_fp32(directory)
        lora = randomize_fnlm(fnlm.lora.init(params, r=2, targets=targets))
        assert_merged_export_matches(params, lora, out, tokens_for(config.vocab_size))
