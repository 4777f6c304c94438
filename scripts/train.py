"""Fine-tune a model: `python scripts/train.py --model NAME_OR_PATH --data FILE_OR_DIR --out DIR`.

Every field of fnlm.train.TrainConfig is a flag (--lr 1e-4, --mode full, --no-packing,
--targets q k v o ...); `--config run.toml` (or .yaml / .yml with PyYAML installed) supplies
them from a file, flags given on the command line win. `--model` left out trains the embedded
SmolLM2-135M-Instruct. Ctrl-C writes a checkpoint; `--resume` continues from the newest one.

    python scripts/train.py --data data/demo.jsonl --out runs/demo --mode lora --lr 1e-3
    python scripts/train.py --config examples/qlora.toml --max-steps 100
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
import types
import typing
from pathlib import Path

try:
    import fnlm  # noqa: F401  (makes the checkout importable before `from fnlm import ...`)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fnlm  # noqa: F401  (makes the checkout importable before `from fnlm import ...`)

from fnlm import train as train_lib
from fnlm.errors import ArgumentError, FnlmError


def read_config_file(path: str) -> dict:
    """A TOML or YAML file as a dict (a [train] table / train: key is used when present)."""
    file = Path(path)
    if not file.is_file():
        raise ArgumentError(f"config file {file} does not exist")
    if file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ArgumentError(
                f"{file} is YAML, which needs PyYAML (`pip install pyyaml`); or write it as TOML"
            ) from None
        values = yaml.safe_load(file.read_text()) or {}
    elif file.suffix == ".toml":
        try:
            values = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ArgumentError(f"{file} is not valid TOML: {e}") from None
    else:
        raise ArgumentError(f"config file {file}: expected a .toml, .yaml or .yml file")
    if not isinstance(values, dict):
        raise ArgumentError(f"{file} must hold a table of options, got {type(values).__name__}")
    return values.get("train", values)


def _bool_or_str(text: str):
    lowered = text.lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    return text


def _flag_type(hint):
    """(argparse kwargs) for a TrainConfig field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if bool in inner and str in inner:  # --resume [CHECKPOINT], --compile [BACKEND]
            return {"nargs": "?", "const": True, "type": _bool_or_str}
        if bool in inner:  # compile: --compile / --no-compile, default auto
            return {"action": argparse.BooleanOptionalAction}
        return _flag_type(inner[0])
    if origin is tuple:
        return {"nargs": "+", "type": args[0]}
    return {"type": hint}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="TOML or YAML file of options (flags override it)")
    hints = typing.get_type_hints(train_lib.TrainConfig)
    for f in dataclasses.fields(train_lib.TrainConfig):
        kwargs = _flag_type(hints[f.name])
        p.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
            help=f"(default: {f.default!r})", **kwargs,
        )  # fmt: skip
    return p


def main(argv=None) -> int:
    args = vars(parser().parse_args(argv))
    try:
        values = read_config_file(args.pop("config")) if args.get("config") else {}
        args.pop("config", None)
        values.update(args)
        config = train_lib.TrainConfig.from_dict(values)
        result = train_lib.train(config)
    except FnlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if result.status == "interrupted":
        print(f"interrupted at step {result.step}; continue with --resume --out {result.run_dir}")
        return 130
    print(
        f"done: {result.step} steps, final loss {result.losses[-1]:.4f}"
        if result.losses
        else "done"
    )
    print(
        f"run directory {result.run_dir}; loss curve {result.plot}; checkpoint {result.checkpoint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
