"""DPO in full fine-tuning mode against TRL's DPOTrainer loss: every weight trained, the reference
either the model before the first update (its log-probs precomputed, as a full-mode run does in
`bind`) or a given reference model (TrainConfig.ref_model); TRL's side is the plain transformers
model with `ref_model` set. Tolerances: test_methods.LOSS_REL_TOL / GRAD_REL_TOL (measured here,
CPU fp32: at most 5.6e-7 relative on the losses, 1.3e-6 on the gradients)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import test_methods as tm
import torch
import transformers
from models import saved_checkpoint
from test_train import load_fp32, tiny_config

from fnlm import train as train_lib
from fnlm.params import leaf_paths, path_name
from fnlm.train import methods

if tm.trl is not None:
    from trl.trainer.utils import add_fused_lm_head


@pytest.fixture(scope="module")
def checkpoint():
    with saved_checkpoint(tiny_config()) as (_, directory):
        yield directory


def hf_model(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def perturb(params, models, seed: float):
    """An update's worth of change to fnlm's weights and the same to each transformers model's."""
    g = torch.Generator().manual_seed(seed)
    hf = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for path, leaf in leaf_paths(dict(params)):
            if not (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()):
                continue
            delta = 0.05 * leaf.abs().mean() * torch.randn(leaf.shape, generator=g)
            leaf.add_(delta)
            for named in hf:
                named[tm.hf_name(path_name(path))].add_(delta)


@tm.needs_trl
@pytest.mark.parametrize("reference", ["starting weights", "given model"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_full_finetuning_dpo_loss_and_gradients_equal_trl(checkpoint, reference, loss_type):
    params = load_fp32(checkpoint)
    trainable = train_lib.Trainable(params, None, full=True, fp32_master=False)
    config = train_lib.TrainConfig(method="dpo", mode="full", beta=0.3, loss_type=loss_type,
                                   pad_to_multiple=1)  # fmt: skip
    method = methods.PreferenceMethod(config)
    batch = method.collate(tm.random_pairs(seed=8), pad_id=0)
    run = SimpleNamespace(config=config, params=params, layer_fn=None, trainable=trainable)
    model, ref_model = hf_model(checkpoint), hf_model(checkpoint)
    if reference == "starting weights":
        method.precompute(run, [batch])  # as bind does, before the first update
        perturb(params, [model], seed=1)  # the first update: the reference stays where it was
    else:  # TrainConfig.ref_model: a different model than the one trained
        method.reference = load_fp32(checkpoint)
        perturb(method.reference, [ref_model], seed=2)
        perturb(params, [model], seed=3)
    step_batch = method.with_reference(run, batch)
    # precomputed: a batch input; a given model: a forward inside the step
    assert "pair_keys" not in step_batch
    assert ("ref_logps" in step_batch) == (reference == "starting weights")
    loss, step_stats = method.step_loss(run, step_batch, training=True)
    loss = loss / method.count(batch)
    ours = torch.autograd.grad(loss, trainable.tensors)

    ref = tm.trainer(
        tm.trl.DPOTrainer, model.train(), {"gradient_checkpointing_kwargs": None},
        ref_model=ref_model.eval(), precompute_ref_logps=False, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=0.3,
        label_smoothing=0.0, use_weighting=False, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {"input_ids": batch["tokens"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}  # fmt: skip
    expected = ref._compute_loss(model, inputs, return_outputs=False)
    expected.backward()
    tm.assert_close(loss.detach(), expected.detach(), tm.LOSS_REL_TOL, f"full dpo {loss_type} loss")
    hf = dict(model.named_parameters())
    assert len(ours) == len(hf)  # every weight (none tied in this config)
    for (name, _), grad in zip(trainable.named, ours, strict=True):
        tm.assert_close(
            grad, hf[tm.hf_name(name)].grad, tm.GRAD_REL_TOL, f"full dpo gradient {name}"
        )
    stats, metrics = method.metrics([step_stats]), ref._metrics["train"]
    assert stats["margin"] == pytest.approx(metrics["rewards/margins"][0], rel=1e-4, abs=1e-6)
    assert stats["rewards_chosen"] == pytest.approx(
        metrics["rewards/chosen"][0], rel=1e-4, abs=1e-6
    )
    assert stats["accuracy"] == pytest.approx(metrics["rewards/accuracies"][0], abs=1e-6)
    # the reference log-probs are not those of the trained weights (the test would be vacuous)
    with torch.no_grad():
        now, _ = methods.sequence_logprobs(params, batch)
    assert not torch.allclose(now, method.reference_logprobs(run, batch), atol=1e-3)
