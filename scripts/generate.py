"""Generate text, or chat, with a model: a thin command line over `fnlm.generate`.

    python scripts/generate.py "What is the capital of France?"   # embedded SmolLM2-135M-Instruct
    python scripts/generate.py --model Qwen/Qwen2.5-0.5B-Instruct "Hi" "Tell me a joke"
    python scripts/generate.py --adapter runs/my-lora --chat       # interactive, with history
    printf 'Hi\\nAnd in French?\\n' | python scripts/generate.py --chat

Prompts are rendered with the model's chat template when it has one (--raw sends them as they
are). One prompt, and every chat turn, is printed as it is generated. In --chat, an empty line or
end of input quits and "/reset" forgets the conversation.
"""

from __future__ import annotations

import argparse
import sys

import fnlm


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="*", help="prompts to complete (a batch)")
    parser.add_argument(
        "--model", default=None, help="hub id, local dir or .gguf (default: embedded)"
    )
    parser.add_argument("--adapter", default=None, help="a PEFT/fnlm LoRA adapter directory")
    parser.add_argument("--quant", choices=["nf4", "int8", "fp8", "none"], default="nf4")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: by device)")
    parser.add_argument("--chat", action="store_true", help="interactive chat with history")
    parser.add_argument("--system", default=None, help="a system message for chat prompts")
    parser.add_argument("--raw", action="store_true", help="no chat template for the prompts")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    args = parser.parse_args(argv)
    if not args.prompts and not args.chat:
        parser.error("give prompts, or --chat")
    return args


def conversation(args, tok, text: str):
    """A prompt as the model expects it: a one-turn conversation when it has a chat template."""
    if args.raw or getattr(tok, "chat_template", None) is None:
        return text
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": text}]


def print_piece(_index: int, piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def chat(args, params, tok, lora, sampling: dict) -> None:
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
        reply = fnlm.generate(
            params, tok, system + history, lora=lora, stream=print_piece, **sampling
        )
        print()
        history.append({"role": "assistant", "content": reply})


def main(argv=None) -> None:
    args = parse_args(argv)
    params, tok = fnlm.load(
        args.model, quant=None if args.quant == "none" else args.quant, dtype=args.dtype
    )
    if tok is None:
        sys.exit(f"{args.model}: the checkpoint has no tokenizer.json; cannot generate text")
    lora = None
    if args.adapter:
        from fnlm.lora import load as load_adapter

        lora = load_adapter(args.adapter, params, trainable=False)
    sampling = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=args.stop,
    )  # fmt: skip
    if args.chat:
        chat(args, params, tok, lora, sampling)
        return
    prompts = [conversation(args, tok, p) for p in args.prompts]
    if len(prompts) == 1:
        fnlm.generate(params, tok, prompts[0], lora=lora, stream=print_piece, **sampling)
        print()
        return
    for prompt, text in zip(
        args.prompts, fnlm.generate(params, tok, prompts, lora=lora, **sampling)
    ):
        print(f"### {prompt}\n{text}\n")


if __name__ == "__main__":
    main()
