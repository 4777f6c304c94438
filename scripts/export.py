"""Export a model or adapter for transformers, peft or llama.cpp: `fnlm export` (see
`fnlm export --help`), runnable from a checkout.

    python scripts/export.py --adapter runs/demo --out exports/merged
    python scripts/export.py --adapter runs/demo --format gguf --gguf-type q8_0 --out exports/demo.gguf
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout not pip-installed
from fnlm import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """`fnlm export ARGS`, ARGS from `argv` or else the command line; returns the exit status."""
    return cli.main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
