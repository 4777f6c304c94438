"""`fnlm generate` and `fnlm chat`: text from a model, with or without a LoRA adapter, over
`fnlm.generate`. An adapter directory alone loads the base model its adapter_config.json names."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GENERATE = """\
Complete prompts with a model (the model's chat template applied when it has one; --raw sends
them as they are). One prompt is printed as it is generated; several run as one batch.

  fnlm generate "What is the capital of France?"              # embedded SmolLM2-135M-Instruct
  fnlm generate --model Qwen/Qwen2.5-0.5B-Instruct "Hi" "Tell me a joke"
  fnlm generate --adapter runs/demo "What is the capital of Spain?"   # base from the adapter"""

CHAT = """\
Chat with a model, the conversation kept between turns. An empty line or end of input quits;
"/reset" forgets the conversation. Input that is not a terminal is read line by line.

  fnlm chat --adapter runs/demo
  printf 'Hi\\nAnd in French?\\n' | fnlm chat"""

QUANTS = ("auto", "nf4", "int8", "fp8", "none")


def add(commands, name: str) -> None:
    from fnlm.cli import HelpFormatter

    chat = name == "chat"
    p = commands.add_parser(
        name, help="chat with a model" if chat else "complete prompts with a model",
        description=CHAT if chat else GENERATE, formatter_class=HelpFormatter,
    )  # fmt: skip
    if not chat:
        p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompts to complete (a batch)")
    add_model_options(p)
    p.add_argument("--system", default=None, help="a system message before the prompts")
    if not chat:
        p.add_argument("--raw", action="store_true", help="no chat template for the prompts")
    s = p.add_argument_group("sampling")
    s.add_argument(
        "--max-new-tokens", type=int, default=256, help="tokens to generate at most (default: 256)"
    )
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default: 0)")
    s.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1, off)"
    )
    s.add_argument(
        "--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: 0, off)"
    )
    s.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens below min_p times the likeliest one's probability (default: 0, off)",
    )
    s.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide the logits of tokens already seen (default: 1, off)",
    )
    s.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this string (repeatable)")  # fmt: skip
    p.set_defaults(run=run_chat if chat else run_generate)


def add_model_options(p: argparse.ArgumentParser, *, quant_default: str = "auto") -> None:
    """--model, --adapter, --quant, --dtype, --device: what load_model reads."""
    m = p.add_argument_group("model")
    m.add_argument(
        "--model", default=None, metavar="NAME",
        help="hub id, local checkpoint directory or .gguf file (default: the base named by "
        "--adapter, else the embedded SmolLM2-135M-Instruct)",
    )  # fmt: skip
    m.add_argument(
        "--adapter", default=None, metavar="DIR",
        help="a LoRA adapter directory (peft's format: a run directory of `fnlm train`, or one "
        "of its checkpoint-N)",
    )  # fmt: skip
    m.add_argument(
        "--quant", choices=QUANTS, default=quant_default, metavar="{" + ",".join(QUANTS) + "}",
        help="weights of the decoder's linear layers: auto is NF4 on a GPU and 16-bit on CPU; "
        f"none is 16-bit (default: {quant_default})",
    )  # fmt: skip
    m.add_argument(
        "--dtype", default=None, metavar="{bfloat16,float16,float32}",
        help="compute dtype (default: bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU)",
    )  # fmt: skip
    m.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if any)")


def load_model(args: argparse.Namespace, *, trainable: bool = False):
    """(params, tokenizer, lora or None) for --model / --adapter / --quant / --dtype / --device.

    --adapter without --model loads the base its adapter_config.json names (for a run on the
    embedded model, the embedded model), as peft's AutoPeftModel does."""
    from fnlm import lora as lora_lib
    from fnlm.load import adapter_base
    from fnlm.load import load as load_weights

    model = args.model
    if args.adapter and model is None:
        model = adapter_base(args.adapter)
        print(f"fnlm: loading {model}, the base model of {args.adapter}", file=sys.stderr)
    quant = None if args.quant == "none" else args.quant
    params, tok = load_weights(model, quant=quant, dtype=args.dtype, device=args.device)
    lora = None
    if args.adapter:
        lora = lora_lib.load(args.adapter, params, trainable=trainable)
        if (Path(args.adapter) / "tokenizer.json").is_file():  # saved with the adapter
            from fnlm.load import load_tokenizer

            tok = load_tokenizer(Path(args.adapter))
    return params, tok, lora


def sampling(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=args.stop,
    )  # fmt: skip


def _needs_tokenizer(args, tok) -> None:
    if tok is None:
        from fnlm.errors import TokenizerError

        raise TokenizerError(
            f"{args.model or args.adapter}: the checkpoint has no tokenizer.json; cannot generate text"
        )


def print_piece(_index: int, piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def run_generate(args: argparse.Namespace) -> int:
    from fnlm.generate import generate

    params, tok, lora = load_model(args)
    _needs_tokenizer(args, tok)
    templated = not args.raw and getattr(tok, "chat_template", None) is not None
    system = [{"role": "system", "content": args.system}] if args.system else []
    prompts = [[*system, {"role": "user", "content": p}] if templated else p for p in args.prompts]
    if len(prompts) == 1:
        generate(params, tok, prompts[0], lora=lora, stream=print_piece, **sampling(args))
        print()
        return 0
    for prompt, text in zip(
        args.prompts, generate(params, tok, prompts, lora=lora, **sampling(args))
    ):
        print(f"### {prompt}\n{text}\n")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from fnlm.generate import generate

    params, tok, lora = load_model(args)
    _needs_tokenizer(args, tok)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        line = line.strip()
        if not line:
            break
        if line == "/reset":
            history = []
            continue
        if not interactive:
            print(f"> {line}")
        history.append({"role": "user", "content": line})
        reply = generate(
            params, tok, system + history, lora=lora, stream=print_piece, **sampling(args)
        )
        print()
        history.append({"role": "assistant", "content": reply})
    return 0
