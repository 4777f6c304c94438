"""The checks every newer family's tests run against transformers (+ peft), shared by
tests/test_gpt_oss.py, tests/test_gemma4.py and tests/test_qwen3_5.py: logits with and without
left padding, and LoRA training step by step."""

from __future__ import annotations

import peft
import torch
from hypothesis import strategies as st

import fnlm
from tests.models import FP32_REL_TOL, max_rel_error
from tests.test_train import reference_run, rel_close, run_config


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
