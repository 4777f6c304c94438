"""`fnlm serve`: an OpenAI-compatible HTTP server over `fnlm.serve` (the `serve` extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Serve a model, and LoRA adapters chosen per request by model name, over OpenAI's HTTP API
(/v1/chat/completions, /v1/completions, /v1/models, streaming). Any OpenAI client works with
base_url http://HOST:PORT/v1 (the API key is not checked). Needs the `serve` extra.

  fnlm serve                                              # embedded SmolLM2-135M-Instruct
  fnlm serve --adapter pirate=runs/demo                   # base from the adapter's config
  curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"model": "pirate", "messages": [{"role": "user", "content": "Hi"}]}'"""


def add(commands, name: str) -> None:
    from fnlm.cli import HelpFormatter
    from fnlm.cli.generate import QUANTS

    p = commands.add_parser(
        name, help="serve a model over OpenAI's HTTP API", description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "--model", default=None, metavar="NAME",
        help="hub id, local checkpoint directory or .gguf file (default: the base named by the "
        "first --adapter, else the embedded SmolLM2-135M-Instruct)",
    )  # fmt: skip
    p.add_argument(
        "--name", default=None,
        help="the base model's name in the API (default: --model's last path part, or "
        "smollm2-135m-instruct)",
    )  # fmt: skip
    p.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR",
        help="a LoRA adapter directory served as model NAME (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--quant", choices=QUANTS, default="auto", metavar="{" + ",".join(QUANTS) + "}",
        help="weights of the linear layers: auto is NF4 on a GPU, 16-bit on CPU (default: auto)",
    )  # fmt: skip
    p.add_argument("--dtype", default=None, metavar="{bfloat16,float16,float32}",
                   help="compute dtype (default: by device)")  # fmt: skip
    p.add_argument("--slots", type=int, default=32, help="requests decoded together (default: 32)")
    p.add_argument("--context", type=int, default=4096,
                   help="tokens per request, prompt included, at most the model's (default: 4096)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fnlm import lora as lora_lib
    from fnlm.errors import ArgumentError, TokenizerError
    from fnlm.load import adapter_base
    from fnlm.load import load as load_model
    from fnlm.serve import Engine, serve

    pairs = []
    for item in args.adapter:
        name, eq, directory = item.partition("=")
        if not eq or not name or not directory:
            raise ArgumentError(f"--adapter takes NAME=DIR, got {item!r}")
        pairs.append((name, directory))
    model = args.model
    if model is None and pairs:
        model = adapter_base(pairs[0][1])
        print(f"fnlm: loading {model}, the base model of {pairs[0][1]}", file=sys.stderr)
    quant = None if args.quant == "none" else args.quant
    params, tok = load_model(model, quant=quant, dtype=args.dtype)
    if tok is None:
        raise TokenizerError(f"{model}: the checkpoint has no tokenizer.json; cannot serve text")
    adapters = {name: lora_lib.load(d, params, trainable=False) for name, d in pairs}
    name = args.name or (Path(model).name if model else "smollm2-135m-instruct")
    context = min(args.context, params.config.max_position_embeddings)
    engine = Engine(params, tok, adapters, slots=args.slots, context=context)
    print(f"serving {[name, *adapters]} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        serve(engine, name, host=args.host, port=args.port)
    finally:
        engine.close()
    return 0
