"""Fine-tune a model: `fnlm train` (see `fnlm train --help`), runnable from a checkout.

python scripts/train.py --data data/demo.jsonl --out runs/demo --mode lora --lr 1e-3
python scripts/train.py --config examples/qlora-sft-qwen.toml --max-steps 100
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout not pip-installed
from fnlm import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """`fnlm train ARGS`, ARGS from `argv` or else the command line; returns the exit status."""
    return cli.main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
