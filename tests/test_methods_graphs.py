"""DPO, ORPO and GRPO steps under `StepGraphs` (the CUDA-graph step), checked on a CPU: a stand-in
capture replays by calling the step again on the static inputs, so these tests cover the
bookkeeping the GPU path shares (static batch buffers, the stats vector returned beside the loss,
the reference log-probs as batch inputs, the length buckets). The GPU capture itself is not run
here."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from models import saved_checkpoint
from test_methods import Digits, random_pairs, run_config
from test_train import tiny_config

from fnlm import train as train_lib
from fnlm.errors import ArgumentError
from fnlm.generate import step as generate_step
from fnlm.train import methods, setup
from fnlm.train.graphs import check_ids
from fnlm.train.methods import data as method_data


@pytest.fixture(scope="module")
def checkpoint():
    with saved_checkpoint(tiny_config()) as (_, directory):
        yield directory


REPLAYS: list = []


def stats_capture(fn, pool, stream):
    """A stand-in for CUDA graph capture of a step returning (loss, stats vector): nothing runs
    at capture time; each replay runs `fn` again and writes into the captured outputs."""
    out = (torch.zeros(()), torch.zeros(0))

    def replay():
        REPLAYS.append(1)
        loss, stats = fn()
        out[0].copy_(loss)
        out[1].resize_(stats.shape).copy_(stats)

    return replay, out, pool


def graphed_train(monkeypatch, config, *, capture: bool, bucket: int = 8, **inputs):
    """train() with the step through StepGraphs (warm-up 1) as on CUDA; capture=False never
    captures (the same padded batches, eager). Returns (result, the StepGraphs)."""
    made = []
    REPLAYS.clear()

    def graphs(tensors, **options):
        options.update(warmup=1 if capture else 10**9, capture=stats_capture)
        made.append(train_lib.StepGraphs(tensors, **options))
        return made[-1]

    monkeypatch.setattr(setup, "use_graphs", lambda *a: True)
    monkeypatch.setattr(setup, "StepGraphs", graphs)
    monkeypatch.setattr(method_data, "GRAPH_BUCKET", bucket)
    result = train_lib.train(config, **inputs)
    assert bool(REPLAYS) == capture
    return result, made[0]


def logged(result, keys):
    lines = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    return [{k: m[k] for k in keys if k in m} for m in lines if "step" in m and "loss" in m]


PAIR_STATS = ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy")


@pytest.mark.parametrize("method, mode", [("dpo", "lora"), ("dpo", "full"), ("orpo", "lora")])
def test_preference_steps_under_graphs_equal_eager(checkpoint, tmp_path, monkeypatch, method, mode):
    # pairs of 5 to 15 tokens: unbucketed, the micro-batches take many lengths; bucketed (8, 16)
    # at most two shapes (and a short last batch), each captured once and replayed. DPO's
    # reference: LoRA, the adapters off inside the step; full, precomputed log-probs as inputs
    data = methods.MethodData(random_pairs(12, seed=11), "pairs")
    keys = PAIR_STATS + (("logps_chosen",) if method == "dpo" else ("nll", "log_odds_ratio"))
    common = dict(max_steps=6, lr=1e-2 if mode == "lora" else 1e-3, model=str(checkpoint),
                  dtype="float32", mode=mode)  # fmt: skip
    graphed, graphs = graphed_train(
        monkeypatch, run_config(tmp_path / "g", method, **common), capture=True,
        tokenizer=Digits(), data=data,
    )  # fmt: skip
    eager, _ = graphed_train(monkeypatch, run_config(tmp_path / "e", method, **common),
                             capture=False, tokenizer=Digits(), data=data)  # fmt: skip
    assert graphs.captured and graphs.failed is None
    assert all(c.stats is not None and c.keys[0] == "pairs" for c in graphs.captured.values())
    inputs = {name for c in graphs.captured.values() for name in c.inputs}
    assert ("ref_logps" in inputs) == (mode == "full") and "pair_keys" not in inputs
    assert len(graphs.seen) <= 3  # signatures over the run: the buckets (+ a short last batch)
    lengths = {len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in data.examples}
    assert len(lengths) > 3  # what padding to the longest row would have captured
    assert graphed.losses == eager.losses
    assert logged(graphed, keys) == logged(eager, keys)
    # bucketed padding changes nothing beyond float rounding: an unpadded eager run
    monkeypatch.undo()
    plain = train_lib.train(run_config(tmp_path / "p", method, **common), tokenizer=Digits(),
                            data=data)  # fmt: skip
    assert graphed.losses == pytest.approx(plain.losses, rel=1e-5)
    for a, b in zip(logged(graphed, keys), logged(plain, keys), strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_grpo_steps_under_graphs_equal_eager(checkpoint, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(12)
    prompts = [
        method_data.Prompt(torch.randint(1, 96, (int(n),), generator=g), "p", {})
        for n in torch.randint(2, 9, (6,), generator=g)
    ]
    common = dict(max_steps=6, lr=5e-2, model=str(checkpoint), dtype="float32",
                  rewards=("test_methods:low_tokens",), num_generations=4,
                  max_completion_length=6, num_iterations=2, beta=0.05, max_prompt_length=8)  # fmt: skip
    keys = ("loss", "reward", "clip_ratio", "kl", "completion_length")
    inputs = dict(tokenizer=Digits(), data=methods.MethodData(prompts, "prompts"))
    graphed, graphs = graphed_train(
        monkeypatch, run_config(tmp_path / "g", "grpo", **common), capture=True, **inputs
    )
    eager, _ = graphed_train(
        monkeypatch, run_config(tmp_path / "e", "grpo", **common), capture=False, **inputs
    )
    assert graphs.captured and graphs.failed is None
    assert len(graphs.seen) <= 2  # prompt + completion <= 14 tokens: buckets 8 and 16
    assert all(set(c.keys) == {"tokens", "clip_ratio", "kl"} for c in graphs.captured.values())
    assert graphed.losses == eager.losses
    steps = logged(graphed, keys)
    assert steps == logged(eager, keys)
    assert any(s["clip_ratio"] > 0 for s in steps) and all(s["kl"] >= 0 for s in steps)


def test_graphed_step_checks_prompt_labels():
    # ORPO's prompt labels feed the captured cross-entropy too: checked before each replay
    config = train_lib.TrainConfig(method="orpo", pad_to_multiple=1)
    batch = methods.PreferenceMethod(config).collate(random_pairs(2), pad_id=0)
    check_ids(batch, 96)
    batch["prompt_labels"][0, 0] = 96
    with pytest.raises(ArgumentError, match=r"labels must be -100 \(ignored\) or lie in \[0, 96\)"):
        check_ids(batch, 96)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_pairs_are_checked_on_the_host_as_they_collate(checkpoint, tmp_path, method):
    """An id outside the vocabulary in a pair stops the run as its micro-batch is collated, on
    the host (the captured step cannot check it, and StepGraphs no longer reads the device before
    each replay), naming the data and the pairs."""
    data = random_pairs(8, seed=11)
    data[5].chosen[1] = 500  # the vocabulary has 96 tokens
    config = run_config(tmp_path, method, max_steps=4, model=str(checkpoint), dtype="float32",
                        batch_size=2, grad_accum=1, seed=0)  # fmt: skip
    with pytest.raises(ArgumentError, match=r"pairs: the pairs \[.*5.*\]: token ids must lie in "
                       r"\[0, 96\) for this model; got ids from \d+ to 500"):  # fmt: skip
        train_lib.train(config, tokenizer=Digits(), data=methods.MethodData(data, "pairs"))


def test_padded_length_buckets():
    length = method_data.padded_length
    assert [length(n, bucket=64, limit=512) for n in (1, 64, 65, 200, 300, 512)] == [
        64, 64, 128, 256, 512, 512,
    ]  # fmt: skip
    assert length(300, bucket=64, limit=300) == 300  # capped at the longest row possible
    assert length(70, bucket=64, limit=100, pad_to_multiple=8) == 104
    assert length(13, pad_to_multiple=8) == 16 and length(13) == 13


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "method, dtype", [("dpo", "float32"), ("orpo", "float32"), ("grpo", "float32"),
                      ("grpo", "bfloat16")],
)  # fmt: skip
def test_method_steps_captured_on_gpu_equal_eager(checkpoint, tmp_path, monkeypatch, method, dtype):
    """fnlm.train.train on CUDA with CUDA graphs (the default) and without: the step is captured
    (no host sync inside the loss: no fallback warning) and the losses agree. GRPO on a bf16 base
    (fp32 adapters): the rollouts leave no autograd node on the adapters (one did, and the step's
    capture then failed) and reuse one kept decode graph across rollouts (one per rollout was
    kept, with its cache, up to fnlm.generate.step.GRAPH_CACHE_SIZE)."""
    if method == "grpo":
        g = torch.Generator().manual_seed(13)
        data = [method_data.Prompt(torch.randint(1, 96, (4,), generator=g), "p", {})
                for _ in range(4)]  # fmt: skip
        extra = dict(rewards=("test_methods:low_tokens",), num_generations=4,
                     max_completion_length=6, num_iterations=2, beta=0.05)  # fmt: skip
    else:
        data, extra = random_pairs(12, seed=11), {}
    made = []

    def graphs(tensors, **options):
        made.append(train_lib.StepGraphs(tensors, **options))
        return made[-1]

    monkeypatch.setattr(setup, "StepGraphs", graphs)
    losses = {}
    for graphed in (False, True):
        config = run_config(tmp_path / str(graphed), method, max_steps=8, model=str(checkpoint),
                            dtype=dtype, device="cuda", cuda_graphs=graphed, compile=False,
                            **extra)  # fmt: skip
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*could not be captured")
            result = train_lib.train(config, tokenizer=Digits(),
                                     data=methods.MethodData(data, "d"))  # fmt: skip
        losses[graphed] = result.losses
    assert made and made[-1].captured and made[-1].failed is None
    assert losses[True] == pytest.approx(losses[False], rel=1e-4 if dtype == "float32" else 1e-2)
    if method == "grpo":
        assert len(generate_step._graphs) == 1
