"""Generate text, or chat: `fnlm generate` / `fnlm chat` (see their --help), runnable from a
checkout; `--chat` selects `fnlm chat`.

    python scripts/generate.py "What is the capital of France?"
    python scripts/generate.py --adapter runs/demo --chat
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout not pip-installed
from fnlm.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    command = "chat" if "--chat" in argv else "generate"
    sys.exit(main([command, *(a for a in argv if a != "--chat")]))
