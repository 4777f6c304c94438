"""Serve a model, and LoRA adapters chosen per request by model name, over OpenAI's HTTP API:
`fnlm serve` (see `fnlm serve --help`), runnable from a checkout. Needs the `serve` extra.

    python scripts/serve.py                                   # embedded SmolLM2-135M-Instruct
    python scripts/serve.py --model Qwen/Qwen2.5-0.5B-Instruct --adapter pirate=runs/demo
    curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "pirate", "messages": [{"role": "user", "content": "Hi"}]}'
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout not pip-installed
from fnlm import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """`fnlm serve ARGS`, ARGS from `argv` or else the command line; returns the exit status."""
    return cli.main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
