"""K-quant GGUF files (q4_k_m, q5_k_m, q6_k) made by llama.cpp's own quantizer.

The K-quants' block search is llama.cpp's (importance-weighted scales, per-tensor type mixes for
the _m variants); rather than re-implement it, fnlm writes the f16 GGUF and hands it to
`llama-quantize`, as llama.cpp's own workflow does. The tool is looked up in
$FNLM_LLAMA_QUANTIZE, then on PATH, then in the build `scripts/build_llamacpp.sh` makes
($FNLM_LLAMACPP_DIR, default ~/.cache/fnlm/llamacpp, its bin/).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from fnlm.errors import ExportError

# fnlm's name -> llama-quantize's type argument
K_QUANTS = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}


def llama_quantize() -> Path:
    """The llama-quantize executable; ExportError saying where it was looked for and what to do."""
    given = os.environ.get("FNLM_LLAMA_QUANTIZE")
    build = Path(os.environ.get("FNLM_LLAMACPP_DIR") or Path.home() / ".cache/fnlm/llamacpp")
    candidates = [Path(given)] if given else []
    on_path = shutil.which("llama-quantize")
    candidates += [Path(on_path)] if on_path else []
    candidates.append(build / "bin" / "llama-quantize")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ExportError(
        f"K-quant GGUF types ({', '.join(K_QUANTS)}) are made by llama.cpp's llama-quantize, which "
        f"was not found ($FNLM_LLAMA_QUANTIZE{' = ' + given if given else ' unset'}, PATH, "
        f"{build / 'bin'}). Install llama.cpp, or build it with scripts/build_llamacpp.sh; or "
        "export q8_0 / q4_0, which fnlm writes itself"
    )


def requantize(f16: Path, out: Path, gguf_type: str, binary: Path) -> None:
    """`llama-quantize f16 out TYPE`; ExportError with the tool's last lines when it fails."""
    command = [str(binary), str(f16), str(out), K_QUANTS[gguf_type]]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise ExportError(f"could not run {binary}: {e}") from e
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise ExportError(
            f"{binary} failed to make {gguf_type} from {f16} (exit {done.returncode}):\n{tail}"
        )
