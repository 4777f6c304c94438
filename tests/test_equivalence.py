"""Every architecture against transformers: same checkpoint, same tokens, same logits (fp32)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fnlm
from tests.models import FP32_REL_TOL, HF_CONFIGS, hf_configs, max_rel_error, saved_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")


def load_fp32(directory):
    params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu")
    return params


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
@given(data=st.data())
def test_logits_match_transformers(model_type, data):
    config = data.draw(hf_configs(model_type))
    batch = data.draw(st.integers(1, 3))
    # longer than any drawn sliding window, so windowed layers are exercised
    seq = data.draw(st.integers(1, 12))
    with saved_checkpoint(config) as (model, directory):
        params = load_fp32(directory)
        tokens = torch.randint(
            0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq)
        )
        with torch.no_grad():
            ref = model(tokens).logits
        ours = fnlm.forward(params, tokens)
    assert ours.shape == ref.shape
    assert max_rel_error(ours, ref) <= FP32_REL_TOL


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
@given(data=st.data())
def test_left_padded_batch_matches_transformers(model_type, data):
    config = data.draw(hf_configs(model_type))
    seq = data.draw(st.integers(3, 12))
    pads = data.draw(st.lists(st.integers(0, seq - 1), min_size=2, max_size=3))
    mask = torch.tensor([[0] * p + [1] * (seq - p) for p in pads])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with saved_checkpoint(config) as (model, directory):
        params = load_fp32(directory)
        tokens = torch.randint(
            0, config.vocab_size, mask.shape, generator=torch.Generator().manual_seed(seq)
        )
        with torch.no_grad():
            ref = model(tokens, attention_mask=mask, position_ids=positions).logits
        ours = fnlm.forward(params, tokens, attention_mask=mask)
        # a padded row equals the same row without padding
        row = len(pads) - 1
        alone = fnlm.forward(params, tokens[row : row + 1, pads[row] :])
    real = mask.bool()
    assert max_rel_error(ours[real], ref[real]) <= FP32_REL_TOL
    assert max_rel_error(ours[row, pads[row] :], alone[0]) <= FP32_REL_TOL


def test_loss_matches_transformers():
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2,
    )  # fmt: skip
    with saved_checkpoint(hf_config) as (model, directory):
        params = load_fp32(directory)
        tokens = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
        labels = tokens.clone()
        labels[0, :4] = -100
        with torch.no_grad():
            ref = model(tokens, labels=labels).loss
        ours = fnlm.loss(params, {"tokens": tokens, "labels": labels})
    assert abs(ours.item() - ref.item()) <= FP32_REL_TOL * max(1.0, ref.item())
