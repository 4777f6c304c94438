"""The README demo: teach the embedded SmolLM2-135M-Instruct to talk like a pirate, on CPU.

    python scripts/demo.py            # ~3-4 minutes on 2 CPU cores, seconds on a GPU

Fine-tunes LoRA adapters on data/demo.jsonl (240 chats in which "Captain Byte" answers every
question as "Arr, matey! ... Yo ho ho!"), then prints the model's answers to held-out prompts,
none of which is in the data, before and after training, and where the run directory, loss curve
and adapter are. On a GPU the base is NF4 (QLoRA); on CPU it stays fp32 (LoRA).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
try:
    import fnlm
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
    import fnlm

from fnlm import train as train_lib  # noqa: E402

HELD_OUT = [
    "What is the capital of Japan?",
    "How many legs does a spider have?",
    "What sound does a wolf make?",
    "Give me a tip for staying healthy.",
]


def answers(params, tok, lora, max_new_tokens: int) -> list[str]:
    chats = [[{"role": "user", "content": p}] for p in HELD_OUT]
    return fnlm.generate(params, tok, chats, lora=lora, max_new_tokens=max_new_tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "demo.jsonl"))
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    mode = "qlora" if on_gpu else "lora"
    print(
        f"fnlm demo: loading the embedded SmolLM2-135M-Instruct ({'NF4, GPU' if on_gpu else 'fp32, CPU'})"
    )
    params, tok = fnlm.load(quant="nf4" if on_gpu else None)

    print("answering held-out prompts before training ...")
    before = answers(params, tok, None, args.max_new_tokens)

    config = train_lib.TrainConfig(
        data=args.data,
        out=args.out,
        mode=mode,
        lr=args.lr,
        epochs=args.epochs,
        warmup_steps=3,
        batch_size=1,
        grad_accum=1,
        max_seq_length=512,  # ~8 chats packed per row
        eval_fraction=0.1,
        eval_every=10,
        overwrite=True,
    )
    print(
        f"fine-tuning on {args.data} ({mode}, r={config.r}, lr={config.lr}, {config.epochs:g} epoch)"
    )
    result = train_lib.train(config, params=params, tokenizer=tok)

    after = answers(params, tok, result.lora, args.max_new_tokens)
    width = 96
    for prompt, old, new in zip(HELD_OUT, before, after):
        print("\n" + "=" * width)
        print(f"USER:   {prompt}")
        print(textwrap.fill(old, width, initial_indent="BEFORE: ", subsequent_indent=" " * 8))
        print(textwrap.fill(new, width, initial_indent="AFTER:  ", subsequent_indent=" " * 8))
    print("=" * width)
    first, last = result.losses[0], result.losses[-1]
    evals = ", ".join(f"{loss:.3f} (step {step})" for step, loss in result.eval_losses)
    print(
        f"\ntraining loss {first:.3f} -> {last:.3f} over {result.step} steps; held-out loss {evals}"
    )
    print(f"run directory: {result.run_dir.resolve()}")
    print(f"loss curve:    {result.plot.resolve() if result.plot else '(none)'}")
    print(
        f"adapter:       {result.run_dir.resolve()}  (PEFT format; fnlm generate --adapter {result.run_dir})"
    )
    print(f"metrics:       {result.metrics.resolve()}")
    print(f"total time:    {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
