"""`fnlm train`: every field of fnlm.train.TrainConfig as a flag, described from the field's help
metadata; `--config FILE` (TOML / YAML) supplies options, flags on the command line win."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing

DESCRIPTION = """\
Fine-tune a model: QLoRA by default (LoRA adapters over an NF4 base), or --mode lora | full.

  fnlm train --data data/demo.jsonl --out runs/demo --mode lora --lr 1e-3
  fnlm train --config examples/qlora-sft-qwen.toml --max-steps 100
  fnlm train --model Qwen/Qwen2.5-0.5B-Instruct --data my.jsonl --learning_rate 2e-4 \\
      --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --report-to tensorboard
  fnlm train --data HuggingFaceH4/ultrachat_200k --data-split train_sft --eval-split test_sft \\
      --num-proc 4 --on-bad-row skip            (a hub dataset: `pip install 'fnlm[data]'`)

Options come from --config (a TOML file, or YAML with PyYAML; a [train] table or the whole file)
and from flags, which win. Flags also take the underscore spelling (--max_seq_length), and the
transformers / TRL / peft names listed at the end. Ctrl-C writes a checkpoint; --resume continues
from the newest one. The run directory holds train_config.json, metrics.jsonl, loss.png,
checkpoint-N/ and the final PEFT adapter (or, with --mode full, the model).

Several GPUs: torchrun --nproc_per_node N -m fnlm.cli train ... (the global batch is batch_size x
grad_accum x N); --distributed fsdp shards the model over them (FSDP2): a --mode full run's
weights, gradients and optimizer state, or a --mode lora run's frozen 16-bit base."""

# The first field of each group of flags in `--help`, in field order.
GROUPS = {
    "model": "what to train on",
    "mode": "model and adapters",
    "max_seq_length": "data",
    "optimizer": "optimization",
    "checkpointing": "speed and memory",
    "save_every": "checkpoints, logging, trackers",
    "method": "method: sft, or dpo / orpo (preference pairs), grpo (reward functions)",
}


def add(commands, name: str) -> None:
    from fnlm.train.config import ALIASES, TrainConfig

    p = commands.add_parser(
        name, help="fine-tune a model (QLoRA, LoRA or full)", description=DESCRIPTION,
        usage="fnlm train [--config FILE] [OPTION ...]",
        epilog=alias_epilog(ALIASES), formatter_class=_formatter(),
    )  # fmt: skip
    p.add_argument(
        "--config", metavar="FILE", help="TOML or YAML file of options (flags override it)"
    )
    hints = typing.get_type_hints(TrainConfig)
    group = p
    for f in dataclasses.fields(TrainConfig):
        if f.name in GROUPS:
            group = p.add_argument_group(GROUPS[f.name])
        kwargs = flag_type(hints[f.name])
        choices = f.metadata.get("choices")
        if choices:
            kwargs["metavar"] = "{" + ",".join(choices) + "}"
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
            help=f"{f.metadata.get('help', '')} (default: {describe(f.default)})", **kwargs,
        )  # fmt: skip
    for alias, target in ALIASES.items():  # accepted, listed in the epilog
        kwargs = alias_flag_type(alias, hints[target])
        p.add_argument(
            "--" + alias.replace("_", "-"), dest="alias:" + alias, default=argparse.SUPPRESS,
            help=argparse.SUPPRESS, **kwargs,
        )  # fmt: skip
    p.set_defaults(run=run)


def _formatter():
    from fnlm.cli import HelpFormatter

    return HelpFormatter


def describe(default) -> str:
    if default is None:
        return "unset"
    if isinstance(default, tuple):
        return " ".join(str(v) for v in default) or "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def alias_epilog(aliases: dict[str, str]) -> str:
    pairs = [f"--{a} (--{t.replace('_', '-')})" for a, t in aliases.items()]
    lines, line = [], ""
    for pair in pairs:
        if len(line) + len(pair) > 94:
            lines.append(line.rstrip(", "))
            line = ""
        line += pair + ", "
    lines.append(line.rstrip(", "))
    return (
        "transformers / TRL / peft / Unsloth spellings are accepted too, as flags and in --config\n"
        "files, with their values (optim=adamw_8bit, lr_scheduler_type=constant_with_warmup,\n"
        "gradient_checkpointing=unsloth); messages use fnlm's names (in parentheses):\n  "
        + "\n  ".join(lines)
    )


def _bool_or_str(text: str):
    lowered = text.lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    return text


def flag_type(hint) -> dict:
    """argparse keyword arguments for a TrainConfig field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if bool in inner and str in inner:  # --resume [CHECKPOINT], --compile [BACKEND]
            return {"nargs": "?", "const": True, "type": _bool_or_str}
        if bool in inner:  # --cuda-graphs / --no-cuda-graphs, default auto
            return {"action": argparse.BooleanOptionalAction}
        return flag_type(inner[0])
    if origin is tuple:
        return {"nargs": "+", "type": args[0], "metavar": "X"}
    return {"type": hint}


def alias_flag_type(alias: str, hint) -> dict:
    """As transformers' HfArgumentParser takes them: booleans as `--bf16` or `--bf16 true`."""
    if alias in ("adam_beta1", "adam_beta2"):
        return {"type": float}
    kwargs = flag_type(hint)
    if kwargs.get("action") is argparse.BooleanOptionalAction or alias in (
        "gradient_checkpointing", "use_gradient_checkpointing", "bf16", "fp16", "disable_tqdm",
    ):  # fmt: skip
        return {"nargs": "?", "const": True, "type": _bool_or_str}
    return kwargs


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of parsed arguments: the --config file's options, then the flags."""
    from fnlm.train.config import TrainConfig, read_config_file

    values = dict(vars(args))
    for key in ("run", "command"):
        values.pop(key, None)
    path = values.pop("config", None)
    options = read_config_file(path) if path else {}
    flags = {k.removeprefix("alias:"): v for k, v in values.items()}
    # A flag replaces the file's value, whichever of its names either one uses.
    from fnlm.train.config import ALIASES

    canonical = lambda k: ALIASES.get(k.replace("-", "_"), k.replace("-", "_"))
    given = {canonical(k) for k in flags}
    options = {k: v for k, v in options.items() if canonical(k) not in given}
    return TrainConfig.from_dict({**options, **flags})


def run(args: argparse.Namespace) -> int:
    from fnlm import train as train_lib

    config = config_from_args(args)
    result = train_lib.train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports for all
        return 130 if result.status == "interrupted" else 0
    if result.status == "interrupted":
        print(
            f"interrupted at step {result.step}; continue with: fnlm train --resume --out {result.run_dir}"
        )
        return 130
    if result.losses:
        print(f"done: {result.step} steps, final loss {result.losses[-1]:.4f}")
    print(
        f"run directory {result.run_dir}; loss curve {result.plot}; checkpoint {result.checkpoint}"
    )
    return 0
