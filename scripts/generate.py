"""Generate text, or chat: `fnlm generate` / `fnlm chat` (see their --help), runnable from a
checkout; `--chat` selects `fnlm chat`.

    python scripts/generate.py "What is the capital of France?"
    python scripts/generate.py --adapter runs/demo --chat
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout not pip-installed
from fnlm import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """`fnlm generate ARGS` (`fnlm chat` with --chat), ARGS from `argv` or else the command line;
    returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "chat" if "--chat" in argv else "generate"
    return cli.main([command, *(a for a in argv if a != "--chat")])


if __name__ == "__main__":
    sys.exit(main())
