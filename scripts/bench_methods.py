"""GRPO and DPO speed and memory: fnlm vs TRL (transformers + peft + bitsandbytes), same device, same run.

    python scripts/bench_methods.py --model llama-3.2-1b --method grpo --out $OUT     # GPU, QLoRA
    python scripts/bench_methods.py --device cpu --tiny                              # CPU check, LoRA

Models: random-init checkpoints of the real configs of scripts/bench_train.py (its REAL_CONFIGS
and TARGETS; --tiny: a 2-layer Llama of the same shape family), and a word-level tokenizer whose
tokens are "w0" ... "w<vocab-1>" (so text and ids map one to one on both sides).
- GRPO: --prompts prompts (default 8) of --prompt-length random tokens, --generations completions
  each (default 8), exactly --completion-length new tokens (default 256; the stand-in tokenizer
  has no eos for fnlm, `min_new_tokens` for transformers' generate), temperature 1, one optimizer
  step per batch of rollouts, beta 0, reward = share of even token ids (cheap, non-constant).
  fnlm: `fnlm.train.train(TrainConfig(method="grpo"))`, rollouts by fnlm's KV-cache decoder on
  the trained adapters. Reference: TRL's GRPOTrainer (transformers generate, use_vllm=False).
  "rollout" = sampling, scoring and the log-probs taken at sampling time (fnlm's
  `GrpoMethod.rollout`, TRL's `_generate_and_score_completions`); "update" = the rest of the step.
- DPO: --dpo-batch pairs (default 4) of --prompt-length + --completion-length tokens for chosen
  and for rejected; the reference model is the base with the adapters off on both sides.
  fnlm: `train(TrainConfig(method="dpo"))`; reference: TRL's DPOTrainer. tokens/s counts every
  token of both sequences of each pair.
Both sides: LoRA r=16 alpha=16 on q, k, v, o, gate, up, down; on CUDA an NF4 base (double quant,
bf16 compute; TRL through BitsAndBytesConfig and peft) with gradient checkpointing; on CPU fp32
LoRA. Times are medians of --steps steps after --warmup; peak memory is
torch.cuda.max_memory_allocated over a side's whole run (CUDA only). Prints a table with the
fnlm / TRL ratios and writes bench_methods.json to --out (default $OUT or .). Each (method, side)
runs in a fresh process of its own (this script with --part), so no run inherits another's state
(`--in-process` runs them all in this one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench_common import sync  # noqa: E402
from bench_configs import REAL_CONFIGS, TARGETS, clear, save_random  # noqa: E402

TINY = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
    max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
CONFIGS = dict(REAL_CONFIGS, tiny=TINY)
PAD, EOS = 0, 1  # "w0" pads, "w1" is TRL's eos; random tokens are drawn from 2 ... vocab - 1


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, data
# ---------------------------------------------------------------------------------------------


def write_checkpoint(name: str, directory: Path, device: str) -> None:
    """A random-init checkpoint of a config (bf16 on CUDA, fp32 on CPU) and its word tokenizer."""
    import transformers

    if (directory / "config.json").is_file():
        return
    values = dict(CONFIGS[name])
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    save_random(config, directory, device)
    word_tokenizer(config.vocab_size).save_pretrained(directory)


def word_tokenizer(vocab: int):
    """A transformers tokenizer whose token i is the word "w<i>" (whitespace-split)."""
    import tokenizers
    import transformers

    model = tokenizers.models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0",
                                                eos_token="w1", unk_token="w0")  # fmt: skip


class WordTokenizer:
    """What fnlm's GRPO run reads of a tokenizer, for ids given as tokens: no eos (every completion
    has exactly max_completion_length tokens), decode to the same words as the reference's."""

    eos_token_ids = ()
    eos_token_id = EOS
    pad_token_id = PAD

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)

    def save(self, directory):
        pass


def random_ids(g: torch.Generator, vocab: int, n: int) -> torch.Tensor:
    return torch.randint(2, vocab, (n,), generator=g, dtype=torch.int32)


def words(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def even_share(completion_ids, **_) -> list[float]:
    """The reward of both sides: the share of even token ids in each completion."""
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


class Timer:
    """Wraps a function to add up the seconds spent in it (device synchronized) per call."""

    def __init__(self, function, device: str):
        self.function, self.device, self.seconds = function, device, []

    def __call__(self, *args, **kwargs):
        sync(self.device)
        start = time.perf_counter()
        out = self.function(*args, **kwargs)
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)
        return out


def summary(step_s: list[float], rollout_s: list[float] | None, args, tokens: int) -> dict:
    timed = step_s[args.warmup :]
    out = {"step_s": statistics.median(timed), "tokens_per_s": tokens / statistics.median(timed),
           "steps": step_s}  # fmt: skip
    if rollout_s is not None:
        rollouts = rollout_s[args.warmup : args.warmup + len(timed)]
        out["rollout_s"] = statistics.median(rollouts)
        out["update_s"] = statistics.median(s - r for s, r in zip(timed, rollouts))
    return out


# ---------------------------------------------------------------------------------------------
# fnlm
# ---------------------------------------------------------------------------------------------


def fnlm_run(method: str, directory: Path, args, data) -> dict:
    from fnlm import train as train_lib
    from fnlm.train import methods

    cuda = args.device == "cuda"
    steps = args.warmup + args.steps
    extra = (
        dict(rewards=(f"{Path(__file__).resolve()}:even_share",), num_generations=args.generations,
             max_completion_length=args.completion_length, max_prompt_length=args.prompt_length,
             batch_size=args.prompts // args.grad_accum, grad_accum=args.grad_accum,
             rollout_dequantized=args.rollout_dequantized)
        if method == "grpo" else dict(batch_size=args.dpo_batch, grad_accum=1, pad_to_multiple=1)
    )  # fmt: skip
    marks: list[float] = []
    rollout = Timer(methods.GrpoMethod.rollout, args.device)
    methods.GrpoMethod.rollout = lambda self, *a, **k: rollout(self, *a, **k)
    try:
        with tempfile.TemporaryDirectory() as out:
            config = train_lib.TrainConfig(
                model=str(directory), out=out, method=method, mode="qlora" if cuda else "lora",
                dtype="bfloat16" if cuda else "float32", r=16, alpha=16, lr=1e-5,
                max_steps=steps, max_seq_length=args.prompt_length + args.completion_length,
                checkpointing="layer" if cuda else "none", progress=False, save_total_limit=1,
                **extra,
            )  # fmt: skip
            clear()
            sync(args.device)
            marks.append(time.perf_counter())

            def callback(_):
                sync(args.device)
                marks.append(time.perf_counter())

            result = train_lib.train(config, tokenizer=WordTokenizer(), data=data,
                                     callback=callback)  # fmt: skip
            lengths = [json.loads(line).get("completion_length")
                       for line in result.metrics.read_text().splitlines()]  # fmt: skip
    finally:
        methods.GrpoMethod.rollout = rollout.function
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    out = summary(
        step_s, rollout.seconds if method == "grpo" else None, args, tokens_of(method, args)
    )
    out["peak_gib"] = peak_gib(args.device)
    if method == "grpo":
        out["completion_length"] = statistics.mean(x for x in lengths if x is not None)
    return out


def tokens_of(method: str, args) -> int:
    if method == "grpo":
        return args.prompts * args.generations * (args.prompt_length + args.completion_length)
    return args.dpo_batch * 2 * (args.prompt_length + args.completion_length)


def fnlm_data(method: str, vocab: int, args):
    from fnlm.train import methods
    from fnlm.train.methods.data import Pair, Prompt

    g = torch.Generator().manual_seed(0)
    steps = args.warmup + args.steps
    if method == "grpo":
        rows = [Prompt(random_ids(g, vocab, args.prompt_length), "", {})
                for _ in range(args.prompts * steps)]  # fmt: skip
    else:
        rows = [Pair(random_ids(g, vocab, args.prompt_length),
                     random_ids(g, vocab, args.completion_length),
                     random_ids(g, vocab, args.completion_length))
                for _ in range(args.dpo_batch * steps)]  # fmt: skip
    return methods.MethodData(rows, "random")


# ---------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------


def reference_run(method: str, directory: Path, args, data) -> dict:
    import datasets
    import peft
    import transformers
    import trl

    cuda = args.device == "cuda"
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ) if cuda else None  # fmt: skip
    lora = peft.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
    common = dict(
        learning_rate=1e-5, max_steps=args.warmup + args.steps, bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=cuda, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
        model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32,
                           "attn_implementation": "sdpa"},
        lr_scheduler_type="constant", warmup_steps=0, seed=0,
    )  # fmt: skip
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    with tempfile.TemporaryDirectory() as out:
        if method == "grpo":
            ga = args.grad_accum
            config = trl.GRPOConfig(
                out, per_device_train_batch_size=args.prompts * args.generations // ga,
                gradient_accumulation_steps=ga, num_generations=args.generations,
                max_completion_length=args.completion_length, temperature=1.0, beta=0.0,
                generation_kwargs={"min_new_tokens": args.completion_length}, **common,
            )  # fmt: skip
            dataset = datasets.Dataset.from_dict(
                {"prompt": [words(p.tokens) for p in data.examples]}
            )
            trainer = trl.GRPOTrainer(
                str(directory), reward_funcs=even_share, args=config, train_dataset=dataset,
                processing_class=tok, peft_config=lora, quantization_config=quantization,
            )  # fmt: skip
            rollout = Timer(trainer._generate_and_score_completions, args.device)
            trainer._generate_and_score_completions = rollout
        else:
            config = trl.DPOConfig(
                out, per_device_train_batch_size=args.dpo_batch, gradient_accumulation_steps=1,
                max_length=None, precompute_ref_log_probs=False, **common,
            )  # fmt: skip
            # TRL appends eos to standard completions: one word fewer gives the same lengths
            dataset = datasets.Dataset.from_dict({
                "prompt": [words(p.prompt) for p in data.examples],
                "chosen": [" " + words(p.chosen[:-1]) for p in data.examples],
                "rejected": [" " + words(p.rejected[:-1]) for p in data.examples],
            })  # fmt: skip
            trainer = trl.DPOTrainer(
                str(directory), args=config, train_dataset=dataset, processing_class=tok,
                peft_config=lora, quantization_config=quantization,
            )  # fmt: skip
            rollout = None
        marks: list[float] = []

        class Steps(transformers.TrainerCallback):
            def on_step_begin(self, *_, **__):
                sync(args.device)
                marks.append(time.perf_counter())

            def on_step_end(self, *_, **__):
                sync(args.device)
                marks.append(time.perf_counter())

        trainer.add_callback(Steps())
        clear()
        trainer.train()
        lengths = [e["completions/mean_length"] for e in trainer.state.log_history
                   if "completions/mean_length" in e]  # fmt: skip
    step_s = [marks[i + 1] - marks[i] for i in range(0, len(marks) - 1, 2)]
    out = summary(step_s, rollout.seconds if rollout else None, args, tokens_of(method, args))
    out["peak_gib"] = peak_gib(args.device)
    if method == "grpo":
        out["completion_length"] = statistics.mean(lengths) if lengths else None
    del trainer
    clear()
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(REAL_CONFIGS))
    parser.add_argument("--tiny", action="store_true", help="the tiny config only (CPU check)")
    parser.add_argument("--method", action="append", choices=["grpo", "dpo"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--grad-accum", type=int, default=1, help="GRPO micro-batches per step")
    parser.add_argument("--dpo-batch", type=int, default=4, help="DPO pairs per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--rollout-dequantized", action="store_true",
        help="fnlm's GRPO rollouts from the base dequantized once per rollout "
        "(TrainConfig.rollout_dequantized)",
    )  # fmt: skip
    parser.add_argument("--checkpoints", default=".cache/bench")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument(
        "--in-process", action="store_true", help="every part in this process, not one each"
    )
    parser.add_argument("--part", nargs=4, help=argparse.SUPPRESS)  # model method side result.json
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.prompts % args.grad_accum:
        parser.error("--prompts must be a multiple of --grad-accum")
    if args.device == "cpu":  # TRL's log-prob kernel is Triton: its interpreter runs it on CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")  # (read when triton is first imported)

    if args.part:
        return run_part(args, *args.part)
    models = ["tiny"] if args.tiny else (args.model or ["llama-3.2-1b", "llama-3.1-8b"])
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    results: dict = {"device": device_name, "args": vars(args), "models": {}}
    out = Path(args.out) / "bench_methods.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: out.write_text(json.dumps(results, indent=2, default=str))  # noqa: E731
    for name in models:
        directory = Path(args.checkpoints) / f"{name}-{args.device}"
        write_checkpoint(name, directory, args.device)
        methods = args.method or ["grpo", "dpo"]
        sides = ["fnlm"] + ([] if args.skip_reference else ["trl"])
        # one process per part: in one process, fnlm's DPO run after the GRPO runs (fnlm's and
        # TRL's) stopped with a NaN loss at its first step on the H200 (2026-12-03); alone it did not
        for who in sides:
            for method in methods:
                entry = results["models"].setdefault(name, {}).setdefault(method, {})
                if args.in_process:
                    entry[who] = part(args, name, method, who)
                else:
                    entry[who] = part_in_a_process(argv, name, method, who)
                print(f"{name} {method} {who}: {entry[who]}", flush=True)
                save()
        for method in methods:
            entry = results["models"][name][method]
            ours, ref = entry.get("fnlm", {}), entry.get("trl", {})
            if "step_s" in ours and "step_s" in ref:
                entry["speedup"] = ref["step_s"] / ours["step_s"]
                if ours["peak_gib"] and ref["peak_gib"]:
                    entry["memory_ratio"] = ours["peak_gib"] / ref["peak_gib"]
            save()
    print_table(results)
    print(f"\nwrote {out}")
    return results


def part(args, name: str, method: str, who: str) -> dict:
    """One side's figures for one method (an "error" entry when it fails)."""
    directory = Path(args.checkpoints) / f"{name}-{args.device}"
    data = fnlm_data(method, CONFIGS[name]["vocab_size"], args)
    run = fnlm_run if who == "fnlm" else reference_run
    try:
        return run(method, directory, args, data)
    except Exception as e:  # keep the other side's figures
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        clear()


def run_part(args, name: str, method: str, who: str, result: str) -> dict:
    """--part: run one part here and write its figures to `result` (JSON)."""
    figures = part(args, name, method, who)
    Path(result).write_text(json.dumps(figures, default=str))
    return figures


def part_in_a_process(argv: list[str], name: str, method: str, who: str) -> dict:
    """One part in a fresh Python process (this script with --part); its output goes to ours."""
    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "part.json"
        command = [sys.executable, __file__, *argv, "--part", name, method, who, str(result)]
        done = subprocess.run(command, check=False)
        if not result.is_file():
            return {"error": f"the part's process exited with status {done.returncode}"}
        return json.loads(result.read_text())


def print_table(results: dict) -> None:
    fmt = lambda v, spec: format(v, spec) if isinstance(v, int | float) else "-"  # noqa: E731
    print(f"\n{'model':14} {'method':6} {'who':5} {'step s':>8} {'rollout s':>9} {'update s':>9} "
          f"{'tokens/s':>10} {'peak GiB':>9} {'compl len':>9}")  # fmt: skip
    for name, by_method in results["models"].items():
        for method, entry in by_method.items():
            for who in ("fnlm", "trl"):
                e = entry.get(who)
                if not e:
                    continue
                if "error" in e:
                    print(f"{name:14} {method:6} {who:5} failed: {e['error'][:80]}")
                    continue
                print(f"{name:14} {method:6} {who:5} {e['step_s']:8.2f} "
                      f"{fmt(e.get('rollout_s'), '9.2f')} {fmt(e.get('update_s'), '9.2f')} "
                      f"{e['tokens_per_s']:10,.0f} {fmt(e.get('peak_gib'), '9.2f')} "
                      f"{fmt(e.get('completion_length'), '9.1f')}")  # fmt: skip
            if "speedup" in entry:
                memory = entry.get("memory_ratio")
                rollout = update = ""
                if "rollout_s" in entry["fnlm"]:
                    rollout = (
                        f", rollout {entry['trl']['rollout_s'] / entry['fnlm']['rollout_s']:.2f}x"
                    )
                    update = f", update {entry['trl']['update_s'] / entry['fnlm']['update_s']:.2f}x"
                print(f"{name:14} {method:6} ratio: fnlm {entry['speedup']:.2f}x TRL's speed"
                      f"{rollout}{update}; peak memory "
                      f"{fmt(memory, '.2f')}x TRL's")  # fmt: skip


if __name__ == "__main__":
    main()
