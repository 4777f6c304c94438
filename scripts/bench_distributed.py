"""Training speed on several GPUs: `fnlm.train.train` under torchrun, tokens/s and scaling.

    torchrun --nproc_per_node N scripts/bench_distributed.py --model llama-3.1-8b --mode qlora
    torchrun --nproc_per_node N scripts/bench_distributed.py --model llama-3.1-8b --mode full \\
        --distributed fsdp --fp32-master
    torchrun --nproc_per_node N scripts/bench_distributed.py --model llama-3.1-8b --mode lora \\
        --distributed fsdp

Rank 0 writes a random-init bf16 checkpoint of the real config (scripts/bench_train.py's
REAL_CONFIGS; kept in --checkpoints for the next run), then every rank trains it on the packed
synthetic documents of bench_train's --trainer benchmark (same seed on every rank: the plan is
sharded by rank), batch x seq rows per GPU, grad_accum 1, no checkpoints. Reported by rank 0:
tokens per wall second over all ranks after the warm-up (callback timestamps, as bench_train's
trainer figure), per GPU, step time, the peak GiB of every rank, MFU (4 N T, or 6 N T for full
fine-tuning, over time x N_gpus x 790e12). Scaling efficiency = tokens/s on N GPUs / (N x tokens/s
on one): run once with --nproc_per_node 1 and compare the JSON files. Writes
bench_distributed-<model>-<mode>-<distributed>-<N>.json to --out (default $OUT or .).
--model tiny: a 2-layer model on the CPU (gloo), to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench_configs import REAL_CONFIGS, parameter_count, write_checkpoint  # noqa: E402
from bench_train import PEAK_FLOPS, synthetic_documents  # noqa: E402

from fnlm import train as train_lib  # noqa: E402
from fnlm.train import distributed  # noqa: E402

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=512)  # fmt: skip


def write_tiny(directory: Path) -> None:
    import transformers

    if not (directory / "config.json").is_file():
        values = dict(TINY)
        config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b", choices=[*sorted(REAL_CONFIGS), "tiny"])
    parser.add_argument("--mode", default="qlora", choices=["qlora", "lora", "full"])
    parser.add_argument("--distributed", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--fp32-master", action="store_true", help="full: fp32 master weights")
    parser.add_argument("--offload", action="store_true", help="fsdp: fsdp_cpu_offload")
    parser.add_argument("--batch", type=int, default=2, help="rows per GPU")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="timed steps after the warm-up")
    parser.add_argument("--checkpoints", default="/tmp/fnlm-bench-checkpoints")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    gpu = torch.cuda.is_available() and args.model != "tiny"
    own = distributed.init(None if gpu else "cpu", single=args.distributed == "fsdp")
    world = distributed.world_size()
    directory = Path(args.checkpoints) / args.model
    if distributed.is_main():
        (write_tiny if args.model == "tiny" else lambda d: write_checkpoint(args.model, d))(
            directory
        )
    distributed.barrier()
    vocab = (TINY if args.model == "tiny" else REAL_CONFIGS[args.model])["vocab_size"]
    steps = args.warmup + args.steps
    global_tokens = steps * args.batch * args.seq * world
    data = synthetic_documents(vocab, max(64, int(global_tokens / 1200 * 1.3)))
    marks: list[tuple[float, int]] = []

    def callback(entry):
        if gpu:
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), entry["tokens"]))

    out = Path(args.checkpoints) / f"run-{args.model}-{args.mode}-{args.distributed}-{world}"
    config = train_lib.TrainConfig(
        model=str(directory), mode=args.mode, distributed=args.distributed, out=str(out),
        overwrite=True, batch_size=args.batch, grad_accum=1, max_seq_length=args.seq,
        max_steps=steps, lr=1e-5, progress=False, save_total_limit=1,
        fp32_master_weights=args.fp32_master, fsdp_cpu_offload=args.offload,
        device=None if gpu else "cpu", dtype="bfloat16" if gpu else "float32",
    )  # fmt: skip
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        train_lib.train(config, data=data, callback=callback)
        peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0
        peaks = distributed.sum_over_ranks([peak if r == distributed.rank() else 0.0
                                            for r in range(world)])  # fmt: skip
        main = distributed.is_main()
    finally:
        if own:
            distributed.teardown()
    if not main:
        return
    timed = marks[args.warmup :]
    seconds = timed[-1][0] - marks[args.warmup - 1][0]
    tokens = sum(n for _, n in timed)
    n_params = 0 if args.model == "tiny" else parameter_count(args.model)
    flops = (6 if args.mode == "full" else 4) * n_params * tokens
    result = {
        "model": args.model, "mode": args.mode, "distributed": args.distributed, "gpus": world,
        "batch_per_gpu": args.batch, "seq": args.seq, "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_gpu": tokens / seconds / world, "step_s": seconds / len(timed),
        "peak_gib_per_rank": [round(p, 2) for p in peaks],
        "mfu": flops / (seconds * world * PEAK_FLOPS),
    }  # fmt: skip
    print(json.dumps(result))
    name = f"bench_distributed-{args.model}-{args.mode}-{args.distributed}-{world}.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
