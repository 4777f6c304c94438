"""Export a model, with a trained LoRA adapter, for transformers, peft or llama.cpp: a thin command
line over `fnlm.save`.

    python scripts/export.py --adapter runs/pirate/adapter --out pirate-merged       # transformers
    python scripts/export.py --adapter runs/pirate/adapter --out pirate.gguf --format gguf --gguf-type q8_0
    python scripts/export.py --model Qwen/Qwen2.5-0.5B-Instruct --adapter runs/q --out q-adapter --format adapter

The base model is loaded 16-bit (its own dtype, on the CPU unless --device says otherwise); the
adapter is merged into it tensor by tensor in fp32 and written in --dtype (default: the base's).
"""

from __future__ import annotations

import argparse
import sys

import fnlm
from fnlm.errors import FnlmError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="hub id, local dir or .gguf (default: embedded)"
    )
    parser.add_argument("--adapter", default=None, help="a PEFT/fnlm LoRA adapter directory")
    parser.add_argument("--out", required=True, help="target directory (or a .gguf file)")
    parser.add_argument("--format", choices=fnlm.export.FORMATS, default="merged")
    parser.add_argument("--gguf-type", choices=fnlm.export.GGUF_TYPES, default="f16")
    parser.add_argument(
        "--shard-size", default=fnlm.export.DEFAULT_SHARD_SIZE, help="largest safetensors shard"
    )
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: the base's)")
    parser.add_argument("--device", default="cpu", help="where to load and merge (default: cpu)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args = parser.parse_args(argv)
    if args.format == "adapter" and not args.adapter:
        parser.error("--format adapter needs --adapter")
    return args


def load_dtype(model: str | None, dtype: str | None) -> str:
    """The dtype to load the base in: --dtype, else the checkpoint's own, else fp32."""
    if dtype:
        return dtype
    from fnlm.hub import resolve
    from fnlm.load import read_config

    return read_config(resolve(model)).torch_dtype or "float32"


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        dtype = load_dtype(args.model, args.dtype)
        params, tok = fnlm.load(args.model, quant=None, dtype=dtype, device=args.device)
        lora = None
        if args.adapter:
            lora = fnlm.lora.load(args.adapter, params, trainable=False)
        written = fnlm.save(
            args.out, params, tok, lora=lora, format=args.format, dtype=args.dtype,
            gguf_type=args.gguf_type, shard_size=args.shard_size, overwrite=args.overwrite,
        )  # fmt: skip
    except FnlmError as e:
        sys.exit(f"export: {e}")
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
