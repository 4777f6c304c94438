"""Serve a model, and LoRA adapters chosen per request by model name, over OpenAI's HTTP API.

    python scripts/serve.py                                   # embedded SmolLM2-135M-Instruct
    python scripts/serve.py --model Qwen/Qwen2.5-0.5B-Instruct --adapter pirate=runs/demo/adapter
    curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "pirate", "messages": [{"role": "user", "content": "Hi"}]}'

Any OpenAI client works with base_url http://HOST:PORT/v1 (the API key is not checked).
Concurrent requests share the running decode, --slots at a time. Needs the `serve` extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import fnlm
from fnlm.serve import Engine, serve


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="hub id, local dir or .gguf (default: embedded)"
    )
    parser.add_argument("--name", default=None, help="the base model's name in the API "
                        "(default: the --model's last path part, or smollm2-135m-instruct)")  # fmt: skip
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="a PEFT/fnlm LoRA adapter served as model NAME (repeatable)")  # fmt: skip
    parser.add_argument("--quant", choices=["nf4", "int8", "fp8", "none"], default="nf4")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: by device)")
    parser.add_argument("--slots", type=int, default=32, help="requests decoded together")
    parser.add_argument("--context", type=int, default=4096,
                        help="tokens per request, prompt included (at most the model's)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    for item in args.adapter:
        if "=" not in item:
            parser.error(f"--adapter takes NAME=DIR, got {item!r}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    params, tok = fnlm.load(
        args.model, quant=None if args.quant == "none" else args.quant, dtype=args.dtype
    )
    if tok is None:
        raise SystemExit(f"{args.model}: the checkpoint has no tokenizer.json; cannot serve text")
    adapters = {}
    for item in args.adapter:
        name, directory = item.split("=", 1)
        adapters[name] = fnlm.lora.load(directory, params, trainable=False)
    name = args.name or (Path(args.model).name if args.model else "smollm2-135m-instruct")
    context = min(args.context, params.config.max_position_embeddings)
    engine = Engine(params, tok, adapters, slots=args.slots, context=context)
    print(f"serving {[name, *adapters]} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        serve(engine, name, host=args.host, port=args.port)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
