"""`fnlm export`: a model, with a trained LoRA adapter, written for transformers, peft or
llama.cpp, over `fnlm.save`."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Write a model (with a LoRA adapter merged in, or the adapter alone) for transformers, peft or
llama.cpp. The base is loaded 16-bit in its own dtype, on the CPU unless --device says otherwise;
the adapter is merged tensor by tensor in fp32 and written in --dtype (default: the base's).
--adapter alone uses the base model its adapter_config.json names.

  fnlm export --adapter runs/demo --out exports/merged                      # transformers
  fnlm export --adapter runs/demo --format gguf --gguf-type q8_0 --out exports/demo.gguf
      (and exports/demo.Modelfile, for `ollama create demo -f exports/demo.Modelfile`)
  fnlm export --model Qwen/Qwen2.5-0.5B-Instruct --adapter runs/q --format adapter --out q-adapter"""


def add(commands, name: str) -> None:
    from fnlm import export
    from fnlm.cli import HelpFormatter

    p = commands.add_parser(
        name, help="export a model or adapter (transformers, peft, GGUF)",
        description=DESCRIPTION, formatter_class=HelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "--model", default=None, metavar="NAME",
        help="hub id, local checkpoint directory or .gguf file (default: the base named by "
        "--adapter, else the embedded SmolLM2-135M-Instruct)",
    )  # fmt: skip
    p.add_argument(
        "--adapter", default=None, metavar="DIR", help="a LoRA adapter directory (peft's format)"
    )
    p.add_argument("--out", required=True, help="target directory (or a .gguf file)")
    p.add_argument(
        "--format", choices=export.FORMATS, default="merged",
        help="merged: a transformers checkpoint with the adapter folded in; adapter: the PEFT "
        "adapter and tokenizer; gguf: one llama.cpp file (default: merged)",
    )  # fmt: skip
    p.add_argument(
        "--gguf-type", choices=export.GGUF_TYPES, default="f16",
        help="GGUF weight type (default: f16); q4_k_m, q5_k_m and q6_k are made by llama.cpp's "
        "llama-quantize from fnlm's f16 file (on PATH, $FNLM_LLAMA_QUANTIZE, or the build of "
        "scripts/build_llamacpp.sh)",
    )  # fmt: skip
    p.add_argument(
        "--no-modelfile", action="store_true",
        help="with --format gguf: do not write the Ollama Modelfile beside the file (written by "
        "default: FROM the file, the chat template as its TEMPLATE, the stop tokens; then "
        "`ollama create NAME -f Modelfile`)",
    )  # fmt: skip
    p.add_argument(
        "--shard-size", default=export.DEFAULT_SHARD_SIZE,
        help=f"largest safetensors shard, e.g. 2GB or 500MB (default: {export.DEFAULT_SHARD_SIZE})",
    )  # fmt: skip
    p.add_argument(
        "--dtype", default=None, metavar="{bfloat16,float16,float32}",
        help="dtype of the written weights (default: the base checkpoint's)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="where to load and merge (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(run=run)


def base_dtype(model: str | None, dtype: str | None) -> str:
    """The dtype to load the base in: --dtype, else the checkpoint's own, else fp32."""
    if dtype:
        return dtype
    from fnlm.hub import resolve
    from fnlm.load import read_config

    return read_config(resolve(model)).torch_dtype or "float32"


def run(args: argparse.Namespace) -> int:
    import sys

    from fnlm import lora as lora_lib
    from fnlm.errors import ArgumentError
    from fnlm.export import save
    from fnlm.load import adapter_base
    from fnlm.load import load as load_model

    if args.format == "adapter" and not args.adapter:
        raise ArgumentError("--format adapter needs --adapter DIR")
    model = args.model
    if args.adapter and model is None:
        model = adapter_base(args.adapter)
        print(f"fnlm: loading {model}, the base model of {args.adapter}", file=sys.stderr)
    dtype = base_dtype(model, args.dtype)
    params, tok = load_model(model, quant=None, dtype=dtype, device=args.device)
    lora = lora_lib.load(args.adapter, params, trainable=False) if args.adapter else None
    written = save(
        args.out, params, tok, lora=lora, format=args.format, dtype=args.dtype,
        gguf_type=args.gguf_type, shard_size=args.shard_size, overwrite=args.overwrite,
        ollama=not args.no_modelfile,
    )  # fmt: skip
    print(f"wrote {written}")
    return 0
