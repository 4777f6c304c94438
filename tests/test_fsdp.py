"""FSDP2 (distributed="fsdp"; CPU, gloo, 2 ranks through torch.multiprocessing.spawn): a 2-process
sharded run — full fine-tuning, or LoRA over a sharded frozen base — equals a 1-process unsharded
run with the same global batch, its checkpoints resume on another number of processes, its export
or adapter is a single-GPU run's (the adapter loads in peft), and a rank failing inside the step
(where FSDP's collectives are) stops the other with its error."""

from __future__ import annotations

import json
import os
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_distributed import (
    assert_losses_close,
    free_port,
    model_and_chats,
    ranks_errors,
    torchrun,
    worker,
)

from fnlm.errors import ArgumentError, CheckpointError
from fnlm.train import TrainConfig, distributed, train

# The sharded run sums the same per-rank partial gradients as the replicated one (a
# reduce-scatter instead of an all-reduce), and its gradient norm adds the two shards' partial
# norms: the same terms in another order, ~1e-7 relative in fp32 through 4 AdamW steps.
# Measured: losses 1.0e-7 relative, eval losses 4.0e-8, weights 6.0e-8 absolute (largest 1.28);
# the bounds of test_distributed (10x margin) hold.
LOSS_REL_TOL = 1e-6
WEIGHT_ABS_TOL = 2e-6

COMMON = dict(mode="full", max_steps=4, batch_size=2, packing=False, save_every=2,
              save_total_limit=0, pad_to_multiple=1, seed=3, eval_fraction=0.25, eval_every=2)  # fmt: skip
DATA = dict(n=26, seed=7)  # 7 held-out examples: 4 eval batches of 2 (odd ones out on rank 1)
# LoRA over the sharded base: the adapters' gradients are all-reduced as in test_distributed (the
# frozen shards have none), the same bounds. Measured: losses 8.9e-8 relative, eval losses equal,
# adapters 1.2e-7 absolute (largest 3.2), the resumed run's losses equal; peft's logits with the
# 2-rank adapter vs fnlm's with the 1-process one 6.5e-7 relative.
# embed and lm_head among the targets: the PEFT file stores their base weights, gathered from the
# root's shards of both ranks
LORA = dict(mode="lora", lora_dropout=0.0, targets=("embed", "q", "v", "down", "lm_head"))
PEFT_REL_TOL = 1e-5  # fp32 forwards of two libraries (test_train's FP32_REL_TOL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawn of 2 ranks running four sharded jobs (a run, a 1-process sharded checkpoint
    continued on 2 ranks, a LoRA run over the sharded base, a run whose rank 1 fails in step 2),
    and the 1-process runs they are compared with: unsharded (full and LoRA), sharded to step 2,
    and the 2-rank checkpoints continued; peft loading the 2-rank adapter."""
    from models import saved_checkpoint
    from test_train import load_fp32, random_data, run_config, tiny_config

    tmp = tmp_path_factory.mktemp("fsdp")
    with saved_checkpoint(tiny_config(tie=True)) as (model, directory):

        def one_process(out, **changes):
            config = run_config(tmp / out, **{**COMMON, "grad_accum": 4, **changes})
            return train(config, params=load_fp32(directory), data=random_data(**DATA))

        one = one_process("one")
        one_process("one-half", max_steps=2, distributed="fsdp")
        lora_one = one_process("lora-one", **LORA)
        jobs = [
            # checkpointing: the backward recomputes each layer through weights gathered again
            (run_config(tmp / "two", **COMMON, grad_accum=2, distributed="fsdp",
                        checkpointing="layer"), None),
            (run_config(tmp / "two-resumed", **COMMON, grad_accum=2, distributed="fsdp",
                        resume=str(tmp / "one-half" / "checkpoint-2")), None),
            (run_config(tmp / "lora-two", **{**COMMON, **LORA}, grad_accum=2, distributed="fsdp",
                        checkpointing="layer"), None),
            (run_config(tmp / "failing", **COMMON, grad_accum=2, distributed="fsdp"), 1),
        ]  # fmt: skip
        ports = [free_port() for _ in jobs]
        started, raised = time.perf_counter(), None
        try:
            mp.spawn(worker, args=(2, ports, load_fp32(directory), random_data(**DATA), jobs,
                                   str(tmp / "report")), nprocs=2)  # fmt: skip
        except mp.ProcessRaisedException as e:
            raised = e
        seconds = time.perf_counter() - started
        back = one_process("one-resumed", resume=str(tmp / "two" / "checkpoint-2"),
                           distributed="fsdp")  # fmt: skip
        lora_back = one_process("lora-one-resumed", **LORA, distributed="fsdp",
                                resume=str(tmp / "lora-two" / "checkpoint-2"))  # fmt: skip
        lora_unsharded = one_process("lora-one-unsharded", **LORA,
                                     resume=str(tmp / "lora-two" / "checkpoint-2"))  # fmt: skip
        peft_error = peft_vs_fnlm(model, load_fp32(directory), tmp / "lora-two", lora_one.lora)
    reports = [json.loads((tmp / f"report.{r}").read_text()) for r in range(2)]
    return dict(tmp=tmp, one=one, back=back, reports=reports, raised=raised, seconds=seconds,
                lora_one=lora_one, lora_back=lora_back, lora_unsharded=lora_unsharded,
                peft_error=peft_error)  # fmt: skip


def peft_vs_fnlm(model, params, adapter_dir, lora) -> float:
    """The largest relative error between peft's logits with the adapter of `adapter_dir` loaded
    into `model` and fnlm's with `lora` over `params`."""
    import peft
    from models import max_rel_error

    import fnlm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, params.config.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        return max_rel_error(peft_model(tokens).logits, fnlm.forward(params, tokens, lora=lora))


def assert_run_equals(runs, job: int, two: str, one, weights: str, configs: tuple) -> None:
    """Job `job` of the spawn (written to `two`) equals the 1-process TrainResult `one`: the same
    losses on both ranks, close to one's; eval losses; the `weights` file's tensors; `configs`."""
    tmp, (rank0, rank1) = runs["tmp"], runs["reports"]
    assert rank0[job]["losses"] == rank1[job]["losses"]
    assert_losses_close(rank0[job]["losses"], one.losses)
    logged = [json.loads(x) for x in (tmp / two / "metrics.jsonl").read_text().splitlines()]
    evals = [e["eval_loss"] for e in logged if "eval_loss" in e]
    assert_losses_close(evals, [value for _, value in one.eval_losses])
    ref = load_file(one.run_dir / weights)
    ours = load_file(tmp / two / weights)
    assert sorted(ours) == sorted(ref) and ref
    for name, tensor in ours.items():
        assert tensor.dtype == ref[name].dtype and tensor.shape == ref[name].shape, name
        assert torch.allclose(tensor, ref[name], rtol=0, atol=WEIGHT_ABS_TOL), name
    for name in configs:
        ref_config = json.loads((one.run_dir / name).read_text())
        assert json.loads((tmp / two / name).read_text()) == ref_config, name


def test_two_sharded_ranks_equal_one_unsharded_process(runs):
    """2 ranks x grad_accum 2 with FSDP2 (and activation checkpointing, whose recomputation
    gathers each layer again) == 1 process x grad_accum 4 without: losses, eval losses (each rank
    evaluates its share of the held-out batches) and the exported model, whose files are those of
    the single-process run."""
    assert_run_equals(runs, 0, "two", runs["one"], "model.safetensors",
                      ("config.json", "generation_config.json"))  # fmt: skip


def test_lora_over_a_sharded_base_on_two_ranks_equals_one_unsharded_process(runs):
    """LoRA with the frozen base sharded per layer (2 ranks x grad_accum 2, with activation
    checkpointing) == 1 process x grad_accum 4 without fsdp: losses, eval losses and the final
    adapter (same PEFT files), which peft loads into the transformers model; checkpoint-2 of the
    2-rank run continues on 1 process, with fsdp or without, with the uninterrupted run's
    losses."""
    tmp, one = runs["tmp"], runs["lora_one"]
    assert_run_equals(runs, 2, "lora-two", one, "adapter_model.safetensors",
                      ("adapter_config.json",))  # fmt: skip
    assert not (tmp / "lora-two" / "model.safetensors").exists()
    checkpoint = tmp / "lora-two" / "checkpoint-2"  # a replicated run's: the adapters only
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "sharded").exists()
    assert_losses_close(runs["lora_back"].losses, one.losses[2:])
    assert_losses_close(runs["lora_unsharded"].losses, one.losses[2:])
    assert runs["peft_error"] <= PEFT_REL_TOL


def test_sharded_checkpoints_resume_on_another_number_of_processes(runs):
    """checkpoint-2 of the 2-rank run continues on 1 process, and a 1-process sharded checkpoint
    on 2 ranks, each with the uninterrupted run's losses."""
    tmp, one, (rank0, _) = runs["tmp"], runs["one"], runs["reports"]
    sharded = tmp / "two" / "checkpoint-2" / "sharded"
    assert (sharded / ".metadata").is_file() and len(list(sharded.glob("*.distcp"))) == 2
    assert_losses_close(rank0[1]["losses"], one.losses[2:])
    assert_losses_close(runs["back"].losses, one.losses[2:])


def test_a_failing_rank_stops_the_sharded_run_with_its_error(runs):
    """Rank 1 raises at the start of step 2's forward while rank 0 waits in FSDP's all-gather of
    the first layer: rank 1 ends with its error, rank 0 at once with RankFailedError naming it."""
    assert "boom on rank 1" in str(runs["raised"])
    rank0, rank1 = runs["reports"]
    assert rank1[3] == {"error": "ValueError: boom on rank 1"}
    assert rank0[3]["error"].startswith("RankFailedError: training stopped on rank 0")
    assert "rank 1: ValueError: boom on rank 1" in rank0[3]["error"]
    assert runs["seconds"] < 300


def test_fsdp_options_and_checkpoint_kinds_are_checked(tmp_path):
    """fsdp shards 16-bit bases (full or LoRA SFT with AdamW; QLoRA's NF4 is refused); a full
    replicated run's checkpoint is refused by an fsdp run and
    the other way round, each naming the option to use."""
    from test_train import run_config

    with pytest.raises(ArgumentError, match="mode='lora'"):
        run_config(tmp_path, distributed="fsdp", mode="qlora")
    with pytest.raises(ArgumentError, match="optimizer"):
        run_config(tmp_path, distributed="fsdp", optimizer="adamw8bit")
    assert run_config(tmp_path, distributed="fsdp", mode="lora").distributed == "fsdp"
    with pytest.raises(ArgumentError, match="distributed must be one of"):
        run_config(tmp_path, distributed="deepspeed")
    from fnlm.train import fsdp
    from fnlm.train.checkpoint import load_checkpoint

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="written without fsdp"):
        fsdp.load_checkpoint(tmp_path / "plain", None, None, None)
    (tmp_path / "sharded" / "sharded").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="distributed='fsdp'"):
        load_checkpoint(tmp_path / "sharded", named=[], optimizer=None, scheduler=None)
    assert TrainConfig(mode="full", distributed="fsdp").distributed == "fsdp"


def test_mixed_precision_fp32_shards_over_a_bf16_model_equal_unsharded_masters(tmp_path):
    """One process: fsdp with fp32_master_weights over a bf16 model (fp32 shards, layers computing
    in bf16 through MixedPrecisionPolicy, inputs left as they are) trains exactly as the unsharded
    run with fp32 master weights, and exports bf16 weights as it does. fsdp_cpu_offload on a CPU
    run is refused."""
    from models import saved_checkpoint
    from test_train import random_data, run_config, tiny_config

    from fnlm.load import load_params, read_config

    options = dict(mode="full", max_steps=3, batch_size=2, grad_accum=2, packing=False,
                   pad_to_multiple=1, seed=3, fp32_master_weights=True)  # fmt: skip
    results = {}
    with saved_checkpoint(tiny_config(tie=True)) as (_, directory):
        for name, extra in {"plain": {}, "fsdp": {"distributed": "fsdp"}}.items():
            params = load_params(directory, read_config(directory), dtype=torch.bfloat16,
                                 device=torch.device("cpu"))  # fmt: skip
            config = run_config(tmp_path / name, **options, **extra)
            results[name] = train(config, params=params, data=random_data(n=16, seed=7)).losses
        params = load_params(directory, read_config(directory), dtype=torch.bfloat16,
                             device=torch.device("cpu"))  # fmt: skip
        offload = run_config(tmp_path / "offload", **options, distributed="fsdp",
                             fsdp_cpu_offload=True)  # fmt: skip
        with pytest.raises(ArgumentError, match="fsdp_cpu_offload"):
            train(offload, params=params, data=random_data(n=16, seed=7))
    assert results["fsdp"] == results["plain"]
    ref = load_file(tmp_path / "plain" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "fsdp" / "model.safetensors").items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, ref[name]), name


def test_lora_adapting_embed_and_lm_head_over_a_sharded_base(tmp_path):
    """One process: LoRA on embed and lm_head (the root's sharded tensors, adapted on the root) and
    a layer, with a saved module, trains exactly as without fsdp, and its PEFT files hold the same
    tensors — the embed / lm_head base weights PEFT stores among them, gathered from the shards."""
    from models import saved_checkpoint
    from test_train import load_fp32, random_data, run_config, tiny_config

    options = dict(mode="lora", max_steps=3, batch_size=2, grad_accum=2, packing=False,
                   pad_to_multiple=1, seed=3, save_every=2, targets=("embed", "q", "lm_head"),
                   modules_to_save=("norm",))  # fmt: skip
    results = {}
    with saved_checkpoint(tiny_config()) as (_, directory):
        for name, extra in {"plain": {}, "fsdp": {"distributed": "fsdp"}}.items():
            config = run_config(tmp_path / name, **options, **extra)
            data = random_data(n=16, seed=7)
            results[name] = train(config, params=load_fp32(directory), data=data).losses
    assert results["fsdp"] == results["plain"]
    for adapter in ("adapter_model.safetensors", "checkpoint-2/adapter_model.safetensors"):
        ref = load_file(tmp_path / "plain" / adapter)
        ours = load_file(tmp_path / "fsdp" / adapter)
        assert sorted(ours) == sorted(ref)
        assert any(name.endswith("lm_head.base_layer.weight") for name in ref)
        for name, tensor in ours.items():
            assert torch.equal(tensor, ref[name]), name


@pytest.mark.parametrize("world,total", [(2, 7), (3, 7), (4, 2), (2, 4)])
def test_eval_batches_are_shared_evenly(monkeypatch, world, total):
    """Every batch is counted on exactly one rank; with even=True every rank runs as many
    forwards (FSDP's are collectives), the extra ones not counted."""
    counted, forwards = [], set()
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        mine = list(distributed.shard_batches(iter(range(total)), even=True))
        counted += [b for b, c in mine if c]
        forwards.add(len(mine))
    assert sorted(counted) == list(range(total)) and forwards == {-(-total // world)}


def test_an_explicit_gpu_must_be_the_ranks_own(monkeypatch):
    """Under torchrun each process trains on GPU LOCAL_RANK: --device cuda:1 on local rank 0 is
    refused before any GPU is touched (checked here with CUDA pretended)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ArgumentError, match="LOCAL_RANK 0"):
        distributed.init("cuda:1")
    assert not torch.distributed.is_initialized()


def test_torchrun_shards_a_full_finetune_from_the_command_line(tmp_path):
    """`torchrun --nproc_per_node 2 -m fnlm.cli train --mode full --distributed fsdp` with
    --grad-accum 1 trains as one unsharded process with --grad-accum 2, prints its "done" line
    once and writes the same model files."""
    import subprocess
    import sys

    from test_train import ROOT

    model_dir, data = model_and_chats(tmp_path)
    common = ["train", "--model", str(model_dir), "--data", str(data), "--mode", "full",
              "--max-steps", "2", "--batch-size", "2", "--max-seq-length", "64", "--no-progress",
              "--lr", "1e-3", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cli = ["-m", "fnlm.cli", *common]
    runs = {
        "two": [*torchrun(2), *cli, "--distributed", "fsdp", "--grad-accum", "1"],
        "one": [sys.executable, *cli, "--grad-accum", "2"],
    }
    losses = {}
    for name, command in runs.items():
        done = subprocess.run([*command, "--out", str(tmp_path / name)], capture_output=True,
                              text=True, env=env, timeout=300)  # fmt: skip
        assert done.returncode == 0, ranks_errors(done.stderr)
        assert done.stdout.count("done: 2 steps") == 1, done.stdout
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines]
    assert_losses_close(losses["two"], losses["one"])
    ref = load_file(tmp_path / "one" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "two" / "model.safetensors").items():
        assert torch.allclose(tensor, ref[name], rtol=0, atol=WEIGHT_ABS_TOL), name
