"""fnlm.train.methods: DPO, ORPO and GRPO against TRL's trainers (trl 1.15) on the same tiny model,
batch and completions, the data formats, reward-function errors, rollouts on the trained weights,
and short end-to-end runs that learn.

TRL's loss code is called as it is (`DPOTrainer._compute_loss`, `ORPOTrainer.get_batch_loss_metrics`,
`GRPOTrainer._compute_loss`) on a trainer object whose attributes are set by hand instead of by
its __init__ (which would also build datasets, an accelerator and an optimizer); the model is a
transformers + peft model with the same weights and adapters as fnlm's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import defaultdict
from types import SimpleNamespace

import peft
import pytest
import torch
import transformers
from models import saved_checkpoint
from test_train import PEFT_NAMES, adapted_lora, load_fp32, tiny_config

from fnlm import lora as lora_lib
from fnlm import train as train_lib
from fnlm.errors import ArgumentError, DataError
from fnlm.generate import generate_tokens
from fnlm.params import leaf_paths, path_name
from fnlm.train import methods
from fnlm.train.methods import data as method_data

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
try:  # TRL is the reference (test extra); without it only the comparisons are skipped
    import trl
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.utils import add_fused_lm_head, nanstd
except ImportError:
    trl = None
needs_trl = pytest.mark.skipif(trl is None, reason="needs trl (the reference; test extra)")

# Losses and gradients of the same fp32 model on the same inputs: the two sides differ only in
# the order of float operations (fused / chunked lm head, SDPA vs eager attention, LoRA as one
# op vs two modules). Measured over this file (CPU, torch 2.13, trl 1.15): at most 5.3e-7
# relative on the losses (GRPO) and 2.7e-6 on the gradients (DPO sigmoid).
LOSS_REL_TOL = 1e-5
GRAD_REL_TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint():
    with saved_checkpoint(tiny_config()) as (_, directory):
        yield directory


def matching_models(directory, *, temperature=1.0, outputs=("log_probs",)):
    """(fnlm params, fnlm lora, peft model): the same weights and the same non-zero adapters."""
    params = load_fp32(directory)
    lora = adapted_lora(params)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    add_fused_lm_head(model, temperature=temperature, outputs=outputs)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(PEFT_NAMES.values()))
    )
    with torch.no_grad():
        for path, value in leaf_paths(dict(lora)):
            _, i, group, leaf, half = path_name(path).split(".")
            layer = model.base_model.model.model.layers[int(i)]
            linear = getattr(
                getattr(layer, "self_attn" if group == "attn" else "mlp"), PEFT_NAMES[leaf]
            )
            (linear.lora_A if half == "a" else linear.lora_B)["default"].weight.copy_(value)
    return params, lora, model.train()


def peft_grads(model, lora):
    """peft's gradients in the order of fnlm's lora leaves."""
    grads = []
    for path, _ in leaf_paths(dict(lora)):
        _, i, group, leaf, half = path_name(path).split(".")
        layer = model.base_model.model.model.layers[int(i)]
        linear = getattr(
            getattr(layer, "self_attn" if group == "attn" else "mlp"), PEFT_NAMES[leaf]
        )
        grads.append((linear.lora_A if half == "a" else linear.lora_B)["default"].weight.grad)
    return grads


def assert_close(ours, ref, tol, what):
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    error = ((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-3)).item()
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


class Accelerator:
    """The few accelerate calls TRL's loss code makes, on one CPU process."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True
    is_main_process = True

    def unwrap_model(self, model):
        return model

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics

    def reduce(self, x, reduction="sum"):
        return x

    def autocast(self):
        return contextlib.nullcontext()


def trainer(cls, model, args, **attributes):
    """A TRL trainer object with the attributes its loss code reads (no __init__)."""
    t = object.__new__(cls)
    t.__dict__.update(model=model, accelerator=Accelerator(), args=SimpleNamespace(**args),
                      _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                      aux_loss_enabled=False, **attributes)  # fmt: skip
    return t


def random_pairs(n=3, seed=0, vocab=96):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: torch.randint(
        0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g, dtype=torch.int32
    )  # noqa: E731
    return [method_data.Pair(r(3, 7), r(2, 8), r(2, 8)) for _ in range(n)]


def fake_run(params, lora, config, mode="lora"):
    """The parts of a Run the method losses read."""
    model = lambda training: (params, lora_lib.train_mode(lora, training))  # noqa: E731
    return SimpleNamespace(config=SimpleNamespace(mode=mode), params=params, layer_fn=None,
                           trainable=SimpleNamespace(model=model))  # fmt: skip


def count_sevens(completion_ids, **_):
    """A verifiable reward for the tests: the share of token 7 in each completion."""
    return [sum(t == 7 for t in ids) / len(ids) for ids in completion_ids]


def dpo_config(**changes):
    return train_lib.TrainConfig(method="dpo", pad_to_multiple=1, progress=False, **changes)


# ---------------------------------------------------------------------------------------------
# DPO / ORPO against TRL
# ---------------------------------------------------------------------------------------------


@needs_trl
@pytest.mark.parametrize(
    "loss_type, label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)]
)
def test_dpo_loss_and_gradients_equal_trl(checkpoint, loss_type, label_smoothing):
    params, lora, model = matching_models(
        checkpoint, outputs=("log_probs", "entropy", "mean_logits", "is_top1")
    )
    config = dpo_config(loss_type=loss_type, beta=0.3, label_smoothing=label_smoothing)
    method = methods.PreferenceMethod(config)
    batch = method.collate(random_pairs(), pad_id=0)
    loss, step_stats = method.step_loss(fake_run(params, lora, config), batch, training=True)
    loss = loss / method.count(batch)
    ours = torch.autograd.grad(loss, lora_lib.parameters(lora))

    reference = trainer(
        trl.DPOTrainer, model, {"gradient_checkpointing_kwargs": None}, ref_model=None,
        precompute_ref_logps=False, ld_alpha=None, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=0.3, label_smoothing=label_smoothing,
        use_weighting=False, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {"input_ids": batch["tokens"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}  # fmt: skip
    expected = reference._compute_loss(model, inputs, return_outputs=False)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), LOSS_REL_TOL, f"{loss_type} loss")
    for i, (a, b) in enumerate(zip(ours, peft_grads(model, lora), strict=True)):
        assert_close(a, b, GRAD_REL_TOL, f"{loss_type} gradient {i}")
    # the logged rewards are TRL's
    stats = method.metrics([step_stats])
    metrics = reference._metrics["train"]
    assert stats["rewards_chosen"] == pytest.approx(
        metrics["rewards/chosen"][0], rel=1e-4, abs=1e-6
    )
    assert stats["margin"] == pytest.approx(metrics["rewards/margins"][0], rel=1e-4, abs=1e-6)
    assert stats["accuracy"] == pytest.approx(metrics["rewards/accuracies"][0])


@needs_trl
def test_orpo_loss_and_gradients_equal_trl(checkpoint):
    params, lora, model = matching_models(checkpoint)
    config = train_lib.TrainConfig(method="orpo", beta=0.25, pad_to_multiple=1)
    method = methods.PreferenceMethod(config)
    batch = method.collate(random_pairs(seed=1), pad_id=0)
    loss, step_stats = method.step_loss(fake_run(params, lora, config), batch, training=True)
    loss = loss / method.count(batch)
    ours = torch.autograd.grad(loss, lora_lib.parameters(lora))

    reference = trainer(ORPOTrainer, model, {}, beta=0.25, is_encoder_decoder=False,
                        padding_value=0)  # fmt: skip
    b = method.count(batch)
    prompt_masked = batch["labels"]  # completion tokens only, as ORPO's tokenize_row labels
    inputs = {"chosen_input_ids": batch["tokens"][:b], "chosen_attention_mask": batch["attention_mask"][:b],
              "chosen_labels": prompt_masked[:b], "rejected_input_ids": batch["tokens"][b:],
              "rejected_attention_mask": batch["attention_mask"][b:], "rejected_labels": prompt_masked[b:]}  # fmt: skip
    expected, metrics = reference.get_batch_loss_metrics(model, inputs)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), LOSS_REL_TOL, "orpo loss")
    for i, (a, r) in enumerate(zip(ours, peft_grads(model, lora), strict=True)):
        assert_close(a, r, GRAD_REL_TOL, f"orpo gradient {i}")
    stats = method.metrics([step_stats])
    assert stats["nll"] == pytest.approx(metrics["nll_loss"], rel=1e-5)
    assert stats["log_odds_ratio"] == pytest.approx(metrics["log_odds_chosen"], rel=1e-4)
    assert stats["margin"] == pytest.approx(metrics["rewards/margins"], rel=1e-4, abs=1e-6)


HF_NAMES = {"norm_attn": "input_layernorm", "norm_mlp": "post_attention_layernorm",
            **{k: f"self_attn.{v}" for k, v in PEFT_NAMES.items() if k in "qkvo"},
            **{k: f"mlp.{v}" for k, v in PEFT_NAMES.items() if k not in "qkvo"}}  # fmt: skip


def hf_name(name: str) -> str:
    """transformers' name of a Llama weight from fnlm's (layers.0.attn.q -> model.layers.0...)."""
    top = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
    if name in top:
        return top[name] + ".weight"
    _, i, *rest = name.split(".")
    return f"model.layers.{i}.{HF_NAMES[rest[-1]]}.weight"


@needs_trl
def test_orpo_full_finetuning_loss_and_gradients_equal_trl(checkpoint):
    # Full mode: every weight trained, no adapters; TRL's ORPOTrainer on the plain model.
    params = load_fp32(checkpoint)
    trainable = train_lib.Trainable(params, None, full=True, fp32_master=False)
    config = train_lib.TrainConfig(method="orpo", mode="full", beta=0.25, pad_to_multiple=1)
    method = methods.PreferenceMethod(config)
    batch = method.collate(random_pairs(seed=2), pad_id=0)
    run = SimpleNamespace(config=config, params=params, layer_fn=None, trainable=trainable)
    loss, step_stats = method.step_loss(run, batch, training=True)
    loss = loss / method.count(batch)
    ours = torch.autograd.grad(loss, trainable.tensors)

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    reference = trainer(ORPOTrainer, model.train(), {}, beta=0.25, is_encoder_decoder=False,
                        padding_value=0)  # fmt: skip
    b = method.count(batch)
    inputs = {"chosen_input_ids": batch["tokens"][:b], "chosen_attention_mask": batch["attention_mask"][:b],
              "chosen_labels": batch["labels"][:b], "rejected_input_ids": batch["tokens"][b:],
              "rejected_attention_mask": batch["attention_mask"][b:], "rejected_labels": batch["labels"][b:]}  # fmt: skip
    expected, metrics = reference.get_batch_loss_metrics(model, inputs)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), LOSS_REL_TOL, "orpo full loss")
    hf = dict(model.named_parameters())
    assert len(ours) == len(hf)  # every weight (none tied in this config)
    for (name, _), grad in zip(trainable.named, ours, strict=True):
        assert_close(grad, hf[hf_name(name)].grad, GRAD_REL_TOL, f"orpo full gradient {name}")
    assert method.metrics([step_stats])["log_odds_ratio"] == pytest.approx(
        metrics["log_odds_chosen"], rel=1e-4
    )


# ---------------------------------------------------------------------------------------------
# GRPO against TRL
# ---------------------------------------------------------------------------------------------


@needs_trl
@pytest.mark.parametrize(
    "loss_type, beta, iterations",
    [("grpo", 0.0, 1), ("grpo", 0.04, 2), ("dr_grpo", 0.04, 2), ("bnpo", 0.0, 2)],
)
def test_grpo_loss_and_gradients_equal_trl(checkpoint, loss_type, beta, iterations):
    temperature, max_len = 0.7, 6
    params, lora, model = matching_models(checkpoint, temperature=temperature,
                                          outputs=("log_probs", "entropy"))  # fmt: skip
    config = train_lib.TrainConfig(
        method="grpo", rewards=("test_methods:count_sevens",), loss_type=loss_type, beta=beta,
        num_iterations=iterations, temperature=temperature, max_completion_length=max_len,
        epsilon=0.2, epsilon_high=0.28, num_generations=2,
    )  # fmt: skip
    g = torch.Generator().manual_seed(3)
    prompt_len, rows = 4, 4  # equal prompts: TRL left-pads prompts, which shifts its positions
    prompts = [
        SimpleNamespace(tokens=torch.randint(0, 96, (prompt_len,), generator=g))
        for _ in range(rows)
    ]
    completions = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (6, 3, 5, 1)]
    batch = methods.grpo.collate_rollouts(prompts, completions, pad_id=0)
    batch["advantages"] = torch.randn(rows, generator=g)
    seq = batch["tokens"].shape[1]
    completion_mask = torch.zeros(rows, max_len, dtype=torch.long)
    for r, ids in enumerate(completions):
        completion_mask[r, : len(ids)] = 1
    # old / reference log-probs away from the current ones, so ratios clip and the KL is not 0
    with torch.no_grad():
        current = methods.token_logprobs(params, batch, lora=lora, temperature=temperature)
    scored = batch["labels"][:, 1:] != -100
    scored = torch.cat([scored, torch.zeros_like(scored[:, :1])], 1)
    old = torch.where(scored, current + 0.3 * torch.randn(rows, seq, generator=g), 0.0)
    ref = torch.where(scored, current + 0.5 * torch.randn(rows, seq, generator=g), 0.0)
    if iterations > 1:
        batch["old_logps"] = old
    if beta:
        batch["ref_logps"] = ref

    method = methods.GrpoMethod(config)
    loss, step_stats = method.step_loss(fake_run(params, lora, config), batch, training=True)
    loss = loss / method.count(batch)
    ours = torch.autograd.grad(loss, lora_lib.parameters(lora))

    def completion_part(
        x,
    ):  # fnlm's layout (position t scores token t + 1) -> TRL's [rows, max_len]
        return x[:, prompt_len - 1 : prompt_len - 1 + max_len] * completion_mask

    completion_ids = torch.zeros(rows, max_len, dtype=torch.long)
    for r, ids in enumerate(completions):
        completion_ids[r, : len(ids)] = torch.tensor(ids)
    inputs = {
        "prompt_ids": torch.stack([p.tokens for p in prompts]),
        "prompt_mask": torch.ones(rows, prompt_len, dtype=torch.long),
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": batch["advantages"],
        **({"old_per_token_logps": completion_part(old)} if iterations > 1 else {}),
        **({"ref_per_token_logps": completion_part(ref)} if beta else {}),
    }  # fmt: skip
    reference = trainer(
        trl.GRPOTrainer, model,
        {"use_bias_correction_kl": False, "delta": None},
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        max_completion_length=max_len, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
    )  # fmt: skip
    expected = reference._compute_loss(model, inputs)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), LOSS_REL_TOL, f"{loss_type} loss")
    for i, (a, b) in enumerate(zip(ours, peft_grads(model, lora), strict=True)):
        assert_close(a, b, GRAD_REL_TOL, f"{loss_type} gradient {i}")
    stats, metrics = method.metrics([step_stats]), reference._metrics["train"]
    assert stats["clip_ratio"] == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
    if beta:
        assert stats["kl"] == pytest.approx(metrics["kl"][0], rel=1e-4)


@needs_trl
def test_group_advantages_equal_trl_formula():
    # TRL computes advantages inline in _generate_and_score_completions (sum_then_normalize):
    # (r - group mean) / (group nanstd + 1e-4), NaN rows (no reward scored) excluded, then 0.
    rewards = torch.tensor([1.0, 0.0, 0.5, float("nan"), 2.0, 2.0, 3.0, 1.0])
    groups = rewards.view(-1, 4)
    mean = torch.nanmean(groups, 1).repeat_interleave(4)
    std = nanstd(groups, dim=1).repeat_interleave(4)
    expected = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)
    assert torch.allclose(methods.group_advantages(rewards, 4), expected, atol=1e-6)
    batch_std = nanstd(rewards)
    expected = torch.nan_to_num((rewards - mean) / (batch_std + 1e-4), nan=0.0)
    assert torch.allclose(methods.group_advantages(rewards, 4, "batch"), expected, atol=1e-6)
    assert torch.allclose(
        methods.group_advantages(rewards, 4, "none"), torch.nan_to_num(rewards - mean), atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# Data, rewards, rollouts
# ---------------------------------------------------------------------------------------------

TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizer_fixtures import write_byte_level_bpe

    from fnlm.tokenizer import Tokenizer

    return Tokenizer.from_dir(
        write_byte_level_bpe(tmp_path_factory.mktemp("tok"), chat_template=TEMPLATE)
    )


def test_preference_rows_in_trl_formats(tok, tmp_path):
    user = [{"role": "user", "content": "What color is the sky?"}]
    blue, green = ([{"role": "assistant", "content": c}] for c in ("It is blue.", "It is green."))
    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": user, "chosen": blue, "rejected": green},
        {"chosen": user + blue, "rejected": user + green},  # implicit prompt
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = methods.prepare_pairs(str(path), tok, max_seq_length=64)
    standard, explicit, implicit = data.examples
    eos = tok.eos_token_id
    assert standard.prompt.tolist() == tok.encode("The sky is")
    assert (
        standard.chosen.tolist()
        == tok.encode("The sky is blue." + tok.eos_token)[len(standard.prompt) :]
    )
    assert standard.chosen.tolist()[-1] == eos
    prompt_text = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert explicit.prompt.tolist() == tok.encode(prompt_text, add_special_tokens=False)
    full = tok.apply_chat_template(user + blue, tokenize=False)
    assert tok.decode(explicit.chosen.tolist()) == full[len(prompt_text) :]
    for a, b in zip((explicit.prompt, explicit.chosen, explicit.rejected),
                    (implicit.prompt, implicit.chosen, implicit.rejected)):  # fmt: skip
        assert torch.equal(a, b)
    batch = methods.PreferenceMethod(dpo_config()).collate(data.examples, pad_id=0)
    assert batch["tokens"].shape[0] == 6 and int((batch["labels"] != -100).sum()) == sum(
        len(p.chosen) + len(p.rejected) for p in data.examples
    )


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "x", "chosen": "a"}, "line 1: a preference row needs 'chosen' and 'rejected'"),
        (
            {"prompt": "x", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
            "line 1: 'chosen' and 'rejected' must both be strings or both",
        ),
        ({"chosen": "same", "rejected": "same"}, "line 1: empty chosen, rejected"),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "robot", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "line 1: chosen\\[0\\] has unknown role",
        ),
    ],
)
def test_bad_preference_rows_name_the_row(tok, tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        methods.prepare_pairs(str(path), tok, max_seq_length=64)


def test_prompt_rows_keep_their_columns(tok, tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "2+2=", "answer": "4"},
        {"prompt": [{"role": "user", "content": "3+3?"}], "answer": "6"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = methods.prepare_prompts(str(path), tok, max_prompt_length=5)
    assert [p.columns for p in data.examples] == [{"answer": "4"}, {"answer": "6"}]
    assert data.examples[0].tokens.tolist() == tok.encode("2+2=")[-5:]
    assert len(data.examples[1].tokens) == 5 and data.stats["truncated"] >= 1
    path.write_text(json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(DataError, match="line 1: a GRPO row needs a 'prompt'"):
        methods.prepare_prompts(str(path), tok, max_prompt_length=5)


def raises(**_):
    raise ValueError("boom")


def too_few(completions, **_):
    return [1.0] * (len(completions) - 1)


def not_a_number(completions, **_):
    return [float("nan")] + [0.0] * (len(completions) - 1)


@pytest.mark.parametrize(
    "name, message",
    [
        ("raises", "test_methods:raises raised ValueError: boom"),
        ("too_few", "test_methods:too_few returned 1 rewards for 2 completions"),
        ("not_a_number", "test_methods:not_a_number returned nan for completion 0"),
    ],
)
def test_reward_errors_name_the_function(name, message):
    rewards = [methods.load_reward(f"test_methods:{name}")]
    with pytest.raises(methods.RewardError, match=message):
        methods.score(rewards, ["p", "p"], ["a", "b"], [[1], [2]], {})


def test_reward_specs_and_weights(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def length(completions, **kw):\n    return [len(c) for c in completions]\n"
    )
    spec = f"{tmp_path / 'my_rewards.py'}:length"
    rewards = [methods.load_reward(spec), methods.load_reward("test_methods:count_sevens")]
    scores = methods.score(rewards, ["p"] * 2, ["ab", "abc"], [[7, 1], [7, 7, 7]], {})
    assert scores.tolist() == [[2.0, 0.5], [3.0, 1.0]]
    with pytest.raises(ArgumentError, match="has no function 'missing'"):
        methods.load_reward("test_methods:missing")
    with pytest.raises(ArgumentError, match="expected 'module:function'"):
        methods.load_reward("no_colon")
    with pytest.raises(ArgumentError, match="reward_weights has 1 weights for 2"):
        train_lib.TrainConfig(method="grpo", rewards=("a:b", "c:d"), reward_weights=(1.0,))
    with pytest.raises(ArgumentError, match="TrainConfig.loss_type must be one of"):
        train_lib.TrainConfig(method="dpo", loss_type="dr_grpo")


def test_rollouts_run_on_the_trained_tensors_and_equal_merged_generation(checkpoint):
    params = load_fp32(checkpoint)
    lora = adapted_lora(params)
    prompts = [[5, 9, 2, 11], [3, 4]]
    unmerged = generate_tokens(params, prompts, lora=lora, max_new_tokens=6)
    merged = generate_tokens(lora_lib.merge(params, lora), prompts, max_new_tokens=6)
    assert unmerged == merged
    # the policy the rollouts sample from holds the optimizer's tensors themselves (no copy)
    config = train_lib.TrainConfig(method="grpo", rewards=("test_methods:count_sevens",))
    trainable = train_lib.Trainable(params, lora, full=False, fp32_master=False)
    method = methods.GrpoMethod(config)
    method.bind(SimpleNamespace(trainable=trainable, config=config, params=params))
    _, policy_lora = method.policy()
    assert [id(t) for t in lora_lib.parameters(policy_lora)] == [id(t) for t in trainable.tensors]
    assert not policy_lora.training


# ---------------------------------------------------------------------------------------------
# Runs that learn, in every mode
# ---------------------------------------------------------------------------------------------


def run_config(tmp_path, method, **changes):
    base = dict(out=str(tmp_path / method), method=method, mode="lora", batch_size=2, grad_accum=2,
                lr=1e-2, progress=False, r=4, alpha=8, pad_to_multiple=1, max_seq_length=64,
                warmup_steps=0, schedule="constant")  # fmt: skip
    base.update(changes)
    return train_lib.TrainConfig(**base)


def metrics_of(result):
    return [json.loads(line) for line in result.metrics.read_text().splitlines()]


def test_dpo_run_raises_the_margin(checkpoint, tmp_path):
    data = methods.MethodData(random_pairs(8, seed=4), "random pairs")
    config = run_config(tmp_path, "dpo", max_steps=8, eval_fraction=0.25, eval_every=4)
    result = train_lib.train(config, params=load_fp32(checkpoint), data=data)
    steps = [m for m in metrics_of(result) if "margin" in m]
    assert steps[0]["margin"] == pytest.approx(0.0, abs=1e-6)  # the adapters start at zero
    assert steps[-1]["margin"] > 0.5 and steps[-1]["accuracy"] == 1.0
    assert result.losses[-1] < result.losses[0] - 0.2
    assert result.eval_losses and all(math.isfinite(v) for _, v in result.eval_losses)
    assert any(result.run_dir.rglob("adapter_config.json"))  # the PEFT adapter was written


class Digits:
    """The decoding a GRPO run needs, for the tiny random model."""

    eos_token_ids = ()
    eos_token_id = 0
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def save(self, directory):  # full mode saves the tokenizer beside the model
        pass


def test_grpo_run_raises_the_mean_reward(checkpoint, tmp_path):
    g = torch.Generator().manual_seed(5)
    prompts = [
        method_data.Prompt(torch.randint(1, 96, (4,), generator=g), "p", {}) for _ in range(4)
    ]
    config = run_config(
        tmp_path, "grpo", max_steps=12, lr=0.1, rewards=("test_methods:low_tokens",),
        num_generations=8, max_completion_length=8, num_iterations=2, beta=0.02,
    )  # fmt: skip
    result = train_lib.train(config, params=load_fp32(checkpoint), tokenizer=Digits(),
                             data=methods.MethodData(prompts, "prompts"))  # fmt: skip
    steps = metrics_of(result)
    rewards = [m["reward"] for m in steps]
    assert all(k in steps[-1] for k in ("reward/test_methods:low_tokens", "kl", "clip_ratio",
                                        "completion_length", "rollout_s"))  # fmt: skip
    # seeded sampling on CPU: measured 0.36 -> 0.55 (mean of the first / last four steps)
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards


@pytest.mark.parametrize("keep", [True, False])
def test_grpo_frees_the_rollout_graphs_unless_kept(checkpoint, tmp_path, monkeypatch, keep):
    """keep_rollout_graphs (default on) leaves the rollouts' decode graph and cache in
    fnlm.generate's graph cache for the next rollout; off, they are freed after every rollout
    (2 rollouts: 4 steps of 2 iterations each)."""
    from fnlm.train.methods import grpo

    freed = []
    monkeypatch.setattr(grpo, "release_graphs", lambda: freed.append(1))
    g = torch.Generator().manual_seed(7)
    prompts = [method_data.Prompt(torch.randint(1, 96, (3,), generator=g), "p", {})
               for _ in range(2)]  # fmt: skip
    config = run_config(
        tmp_path, "grpo", max_steps=4, rewards=("test_methods:low_tokens",), num_generations=2,
        max_completion_length=3, num_iterations=2, keep_rollout_graphs=keep,
    )  # fmt: skip
    train_lib.train(config, params=load_fp32(checkpoint), tokenizer=Digits(),
                    data=methods.MethodData(prompts, "prompts"))  # fmt: skip
    assert len(freed) == (0 if keep else 2)


def test_rollouts_from_the_dequantized_base_sample_what_the_quantized_one_does(
    checkpoint, tmp_path, monkeypatch
):
    """rollout_dequantized: a QLoRA run's rollouts decode from plain tensors (the NF4 base
    dequantized once per rollout) and sample the very completions the NF4 base does (the same
    dequantized values in each matmul), so losses and rewards are equal; the copy and its decode
    graph are freed after every rollout."""
    from fnlm.train.methods import grpo

    quantized, freed = [], []
    original = grpo.generate_tokens

    def recording(params, *args, **kwargs):
        quantized.append(grpo.has_quantized(params))
        return original(params, *args, **kwargs)

    monkeypatch.setattr(grpo, "generate_tokens", recording)
    monkeypatch.setattr(grpo, "release_graphs", lambda: freed.append(1))
    g = torch.Generator().manual_seed(5)
    prompts = [method_data.Prompt(torch.randint(1, 96, (3,), generator=g), "p", {})
               for _ in range(2)]  # fmt: skip
    runs = {}
    for dense in (False, True):
        quantized.clear()
        freed.clear()
        config = run_config(
            tmp_path / str(dense), "grpo", mode="qlora", model=str(checkpoint), dtype="float32",
            max_steps=2, rewards=("test_methods:count_sevens",), num_generations=2,
            max_completion_length=4, rollout_dequantized=dense,
        )  # fmt: skip
        result = train_lib.train(config, tokenizer=Digits(), data=methods.MethodData(prompts, "p"))
        runs[dense] = [(m["loss"], m["reward"], m["completion_length"]) for m in metrics_of(result)]
        assert quantized == [not dense] * len(quantized) and len(quantized) >= 2
        assert len(freed) == (len(quantized) if dense else 0)
    assert runs[True] == runs[False]


def test_dequantized_keeps_expert_stacks_quantized():
    from fnlm import quant
    from fnlm.train.methods import grpo

    w = lambda *shape: quant.quantize(torch.randn(*shape), "nf4", compute_dtype=torch.float32)  # noqa: E731
    norm = torch.ones(64)
    params = {"layers": [{"attn": {"q": w(64, 64)}, "mlp": {"experts": {"gate_up": w(128, 64)}}}],
              "norm": norm}  # fmt: skip
    dense = grpo.dequantized(params)
    layer = dense["layers"][0]
    assert torch.equal(layer["attn"]["q"], params["layers"][0]["attn"]["q"].dequantize())
    assert layer["mlp"]["experts"]["gate_up"] is params["layers"][0]["mlp"]["experts"]["gate_up"]
    assert (
        dense["norm"] is norm
        and grpo.has_quantized(dense)
        and not grpo.has_quantized({"norm": norm})
    )


@pytest.mark.parametrize(
    "method, mode",
    [(m, mode) for m in ("dpo", "orpo", "grpo") for mode in ("qlora", "lora", "full")],
)
def test_every_method_trains_in_every_mode(checkpoint, tmp_path, method, mode):
    if method == "grpo":
        g = torch.Generator().manual_seed(6)
        data = [
            method_data.Prompt(torch.randint(1, 96, (3,), generator=g), "p", {}) for _ in range(2)
        ]
        extra = dict(rewards=("test_methods:count_sevens",), num_generations=2,
                     max_completion_length=3, beta=0.1)  # fmt: skip
    else:
        data, extra = random_pairs(4, seed=7), {}
    config = run_config(tmp_path, method, mode=mode, max_steps=2, grad_accum=1, lr=1e-3,
                        dtype="float32", model=str(checkpoint), **extra)  # fmt: skip
    result = train_lib.train(config, tokenizer=Digits(), data=methods.MethodData(data, "d"))
    assert result.step == 2 and all(math.isfinite(x) for x in result.losses)
    assert any(result.run_dir.rglob("*.safetensors"))


def low_tokens(completion_ids, **_):
    """A verifiable reward for the runs: the share of ids below 32 (a third of the vocabulary)."""
    return [sum(t < 32 for t in ids) / len(ids) for ids in completion_ids]


def test_full_mode_dpo_resumes_with_the_starting_reference(checkpoint, tmp_path):
    # The reference log-probs come from the starting weights even when a resumed run restores
    # trained ones: the resumed steps equal those of an uninterrupted run.
    data = methods.MethodData(random_pairs(8, seed=9), "random pairs")
    common = dict(mode="full", lr=1e-3, grad_accum=1, model=str(checkpoint), dtype="float32")
    whole = train_lib.train(run_config(tmp_path / "a", "dpo", max_steps=4, **common),
                            tokenizer=Digits(), data=data)  # fmt: skip
    train_lib.train(run_config(tmp_path / "b", "dpo", max_steps=2, **common), tokenizer=Digits(),
                    data=data)  # fmt: skip
    resumed = train_lib.train(run_config(tmp_path / "b", "dpo", max_steps=4, resume=True, **common),
                              tokenizer=Digits(), data=data)  # fmt: skip
    assert resumed.losses == pytest.approx(whole.losses[2:], rel=1e-5)


def test_example_rewards_score_the_answer_format():
    # examples/rewards.py, the reward of scripts/demo_grpo.py and the README's GRPO example
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = os.path.join(root, "examples", "rewards.py")
    _, answer_format = methods.load_reward(f"{spec}:answer_format")
    _, exact_answer = methods.load_reward(f"{spec}:exact_answer")
    texts = ["<answer>15</answer>", " <answer>15</answer>\n", "It is <answer>15</answer>, yes",
             "<answer>15", "15</answer>", "<answer></answer>", "15"]  # fmt: skip
    chats = [[{"role": "assistant", "content": t}] for t in texts]
    assert answer_format(completions=chats) == [1.0, 1.0, 0.5, 0.25, 0.0, 0.5, 0.0]
    assert answer_format(completions=texts) == answer_format(completions=chats)
    assert exact_answer(completions=texts, answer=["15"] * 7) == [1, 1, 1, 0, 0, 0, 0]
