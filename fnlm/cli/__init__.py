"""The `fnlm` command: train, generate, chat, export, serve and info, each a thin layer of
argument parsing over the library (one module per subcommand, each with `add(subparsers)` and
`run(args) -> exit status`).

    fnlm train --data data/demo.jsonl --out runs/demo --mode lora --lr 1e-3
    fnlm generate --adapter runs/demo "What is the capital of Spain?"
    fnlm chat --adapter runs/demo
    fnlm export --adapter runs/demo --format merged --out exports/merged
    fnlm info Qwen/Qwen2.5-0.5B-Instruct

fnlm errors are printed as one line (`fnlm train: error: ...`, exit status 1), not tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from fnlm.errors import FnlmError

# Subcommand -> module of this package; `serve` only where fnlm.serve is installed.
COMMANDS = {
    "train": "train",
    "generate": "generate",
    "chat": "generate",
    "export": "export",
    "serve": "serve",
    "info": "info",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks (examples stay examples); option help is wrapped."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32, width=100)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="fnlm",
        description="Load, fine-tune and run open language models (fnlm "
        f"{_version()}). `fnlm COMMAND --help` describes each command's options.",
        formatter_class=HelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"fnlm {_version()}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if name == "serve" and importlib.util.find_spec("fnlm.serve") is None:
            continue
        importlib.import_module(f"fnlm.cli.{module}").add(commands, name)
    return top


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fnlm")
    except PackageNotFoundError:  # a checkout that is not installed
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run `fnlm ARGS...`; returns the exit status (0 ok, 1 an fnlm error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(normalize(argv))
    try:
        return args.run(args)
    except FnlmError as e:
        print(f"fnlm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nfnlm {args.command}: interrupted", file=sys.stderr)
        return 130


def normalize(argv: list[str]) -> list[str]:
    """`--max_seq_length` as `--max-seq-length`: the underscore spelling transformers' and TRL's
    parsers accept is accepted too (up to the first `=`)."""
    out = []
    for arg in argv:
        if arg == "--":
            out.extend(argv[len(out) :])
            break
        if arg.startswith("--") and "_" in arg.partition("=")[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out
