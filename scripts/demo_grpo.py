"""GRPO demo: teach the embedded SmolLM2-135M-Instruct to answer inside <answer>...</answer>, on CPU.

    python scripts/demo_grpo.py        # make demo-grpo; 12 steps, a few minutes on 2 CPU cores

The prompts (examples/grpo-prompts.jsonl: arithmetic questions that ask for the result inside
<answer></answer> tags, like <answer>10</answer>) rarely get that format from the base model (a
mean answer_format reward of 0.03). Each step samples 8 completions for each of 2 prompts with
fnlm's KV-cache decoder from the LoRA adapters being trained, scores them with
examples/rewards.py's answer_format (1 for the format, partial credit for a tag) plus
exact_answer (1 for the right number inside the tags) and pushes the adapters towards the better
completions of each group. Before and after training it prints both mean rewards of sampled
completions to eight held-out questions (none in the training file) and the greedy answers to
three of them. Measured (seed 0): answer_format 0.031 -> 1.000; exact_answer stays 0.000 — the
135M model learns the format by copying the prompt's example (<answer>10</answer>), which no
completion improves on within 12 steps. The same run from the command line:

    fnlm train --method grpo --mode lora --data examples/grpo-prompts.jsonl \\
        --reward examples/rewards.py:answer_format examples/rewards.py:exact_answer \\
        --num-generations 8 --batch-size 2 --grad-accum 1 --max-completion-length 24 \\
        --lr 2e-3 --schedule constant --max-steps 12 --checkpointing none --out runs/demo-grpo
"""

from __future__ import annotations

import argparse
import operator
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
from fnlm.train import methods  # noqa: E402

REWARDS = tuple(
    f"{ROOT / 'examples' / 'rewards.py'}:{name}" for name in ("answer_format", "exact_answer")
)
HELD_OUT = [(7, "+", 8), (31, "-", 9), (6, "*", 7), (44, "+", 19), (13, "*", 3), (58, "-", 25),
            (9, "+", 26), (17, "*", 2)]  # fmt: skip
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
SAMPLES = 4  # sampled completions per held-out question for the mean reward


def question(a: int, op: str, b: int) -> list[dict]:
    content = (f"What is {a} {op} {b}? Write the result inside <answer></answer> tags, "
               "like <answer>10</answer>.")  # fmt: skip
    return [{"role": "user", "content": content}]


def evaluate(params, tok, lora, rewards, args) -> tuple[list[float], list[str]]:
    """(mean of each reward over SAMPLES sampled completions per held-out question, greedy answers)."""
    chats = [question(*q) for q in HELD_OUT]
    sampled = fnlm.generate(params, tok, [c for c in chats for _ in range(SAMPLES)], lora=lora,
                            max_new_tokens=args.max_completion_length,
                            temperature=args.temperature, seed=args.seed)  # fmt: skip
    completions = [[{"role": "assistant", "content": t}] for t in sampled]
    answers = [str(OPS[op](a, b)) for a, op, b in HELD_OUT for _ in range(SAMPLES)]
    means = [
        sum(v) / len(v) for v in (f(completions=completions, answer=answers) for _, f in rewards)
    ]
    greedy = fnlm.generate(params, tok, chats[:3], lora=lora,
                           max_new_tokens=args.max_completion_length)  # fmt: skip
    return means, greedy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "examples" / "grpo-prompts.jsonl"))
    parser.add_argument("--out", default="runs/demo-grpo")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-completion-length", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    mode = "qlora" if on_gpu else "lora"
    print(f"fnlm GRPO demo: loading the embedded SmolLM2-135M-Instruct "
          f"({'NF4, GPU' if on_gpu else 'fp32, CPU'})")  # fmt: skip
    params, tok = fnlm.load(quant="nf4" if on_gpu else None)
    rewards = [methods.load_reward(spec) for spec in REWARDS]

    print(f"before training: sampling {SAMPLES} answers to each of {len(HELD_OUT)} held-out "
          "questions ...")  # fmt: skip
    before, greedy_before = evaluate(params, tok, None, rewards, args)
    print(f"answer_format {before[0]:.3f}, exact_answer {before[1]:.3f}")

    config = train_lib.TrainConfig(
        method="grpo", data=args.data, out=args.out, mode=mode, rewards=REWARDS,
        num_generations=args.generations, batch_size=args.prompts, grad_accum=1,
        max_completion_length=args.max_completion_length, temperature=args.temperature,
        lr=args.lr, max_steps=args.steps, warmup_steps=0, schedule="constant", seed=args.seed,
        checkpointing="none", overwrite=True,
    )  # fmt: skip
    print(f"GRPO on {args.data}: {args.steps} steps of {args.prompts} prompts x "
          f"{args.generations} completions ({mode}, r={config.r}, lr={config.lr})")  # fmt: skip
    per_step = []
    result = train_lib.train(config, params=params, tokenizer=tok,
                             callback=lambda m: per_step.append(m["reward"]))  # fmt: skip

    after, greedy_after = evaluate(params, tok, result.lora, rewards, args)
    width = 96
    for q, old, new in zip(HELD_OUT, greedy_before, greedy_after):
        print("\n" + "=" * width)
        print("USER:   " + question(*q)[0]["content"])
        print(textwrap.fill(repr(old), width, initial_indent="BEFORE: ", subsequent_indent=" " * 8))
        print(textwrap.fill(repr(new), width, initial_indent="AFTER:  ", subsequent_indent=" " * 8))
    print("=" * width)
    print("\nmean training reward per step (answer_format + exact_answer): "
          + " ".join(f"{r:.2f}" for r in per_step))  # fmt: skip
    print(f"held-out mean reward ({len(HELD_OUT)} questions x {SAMPLES} samples, temperature "
          f"{args.temperature}): answer_format {before[0]:.3f} -> {after[0]:.3f}, exact_answer "
          f"{before[1]:.3f} -> {after[1]:.3f} (before -> after)")  # fmt: skip
    print(f"run directory: {result.run_dir.resolve()}  (metrics.jsonl, PEFT adapter)")
    print(f"total time:    {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
