"""Load time and peak memory: fnlm.load(quant="nf4") vs transformers + bitsandbytes NF4, same process.

    python scripts/bench_load.py --model llama-3.1-8b [--dir /tmp/fnlm-bench] [--out $OUT]

Writes a random-init checkpoint of the real config once (bf16 safetensors, 5 GB shards), then loads
it with transformers `from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4, double
quant))` and with `fnlm.load(..., quant="nf4")`, each after dropping nothing from the page cache (both
read warm files), and prints seconds, device bytes of the loaded weights, peak device memory during
the load and peak host RSS growth, with the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_configs import REAL_CONFIGS, write_checkpoint  # noqa: E402


def host_peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) for this process


def host_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status: "VmRSS" (now), "VmHWM" (peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(load_fn) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_device = torch.cuda.memory_allocated()
    base_host = host_bytes("VmRSS")
    host_peak_reset()
    start = time.perf_counter()
    obj = load_fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "weights_bytes": torch.cuda.memory_allocated() - base_device,
        "peak_device_bytes": torch.cuda.max_memory_allocated() - base_device,
        "peak_host_growth_bytes": host_bytes("VmHWM") - base_host,
    }
    del obj
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-3.1-8b", choices=sorted(REAL_CONFIGS))
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "fnlm-bench")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()

    import transformers

    import fnlm

    directory = args.dir / args.model
    write_checkpoint(args.model, directory)

    def reference():
        q = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        return transformers.AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=q, dtype=torch.bfloat16, device_map="cuda"
        )

    def ours():
        return fnlm.load(directory, quant="nf4", dtype=torch.bfloat16, device="cuda")

    measure(ours)  # warm the page cache and CUDA context for both contenders alike
    rows = {"transformers+bnb": measure(reference), "fnlm": measure(ours)}
    gib = 1024**3
    print(f"\n{args.model} NF4 load, {torch.cuda.get_device_name()}")
    print(
        f"{'loader':18} {'seconds':>8} {'weights GiB':>12} {'peak dev GiB':>13} {'peak host GiB':>14}"
    )
    for name, r in rows.items():
        print(
            f"{name:18} {r['seconds']:8.2f} {r['weights_bytes'] / gib:12.3f} "
            f"{r['peak_device_bytes'] / gib:13.3f} {r['peak_host_growth_bytes'] / gib:14.3f}"
        )
    ref, us = rows["transformers+bnb"], rows["fnlm"]
    print(
        f"speed-up {ref['seconds'] / us['seconds']:.2f}x; fnlm weights {us['weights_bytes'] / 1e9:.3f} GB"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_load_{args.model}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
