"""Mixture-of-experts MLP speed: fnlm's grouped GEMM vs its per-expert loop vs transformers (GPU).

    python scripts/bench_moe.py [--out DIR] [--reps 20] [--shapes qwen3-30b-a3b,mixtral-8x7b]

One MoE block (router + experts) of a real config, random bf16 weights, random inputs, in one
process: fnlm's `mixture_of_experts` as it dispatches ("fnlm": bf16 stacks through
`torch._grouped_mm`), the same forced onto the per-expert loop ("fnlm loop", what fnlm did
before), fnlm with NF4 stacks ("fnlm nf4": the expert GEMV for few rows without grad, else
dequantize + grouped GEMM; at decode sizes both are also timed forced, "gemv" / "dequant"), and transformers' block for the same config with its default experts
implementation ("transformers": grouped_mm) and with "eager". Token counts: 1 and 8 (decode;
fnlm also as a captured CUDA graph, as `fnlm.generate` runs it) and 4096 (prefill / training,
forward and forward+backward to the input). The reference has no NF4 for fused experts, so NF4
ratios are against transformers in bf16. Times are wall-clock medians per call including host work (the loop's
cost is on the host), in ms. Writes bench_moe.json to --out (default $OUT or the cwd).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import statistics
import time

import torch
import transformers

from fnlm import quant
from fnlm.config import ModelConfig
from fnlm.models import decoder, moe

DEVICE = "cuda"  # --device cpu: a smoke run of the script itself (tiny shape, no graphs)

SHAPES = {
    "tiny": ("Qwen3MoeConfig", 4, 2, 64, 32, True),
    # name: (transformers config class, experts, per token, hidden, expert width, renormalize)
    "qwen3-30b-a3b": ("Qwen3MoeConfig", 128, 8, 2048, 768, True),
    "mixtral-8x7b": ("MixtralConfig", 8, 2, 4096, 14336, True),
}


def wall_ms(fn, reps: int) -> float:
    """Median wall time of one call (synchronized), after two warm-up calls."""
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def graphed(fn):
    """fn captured in a CUDA graph (static inputs), as fnlm.generate replays its decode step."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def build(shape: str):
    class_name, experts, k, hidden, width, renorm = SHAPES[shape]
    fields = dict(
        hidden_size=hidden, num_attention_heads=16, num_key_value_heads=4, vocab_size=1024,
        num_hidden_layers=1, num_experts_per_tok=k,
    )  # fmt: skip
    if class_name == "MixtralConfig":
        fields |= dict(num_local_experts=experts, intermediate_size=width)
    else:
        fields |= dict(num_experts=experts, moe_intermediate_size=width, norm_topk_prob=renorm)
    hf = getattr(transformers, class_name)(**fields)
    block_class = (
        transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock
        if class_name == "MixtralConfig"
        else transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock
    )
    references = {}
    for implementation in ("grouped_mm", "eager"):  # transformers' default first, then its loop
        hf._experts_implementation = implementation
        references[implementation] = block_class(copy.deepcopy(hf)).to(DEVICE, torch.bfloat16)
    reference = references["grouped_mm"]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device=DEVICE) * 0.02)
    references["eager"].load_state_dict(reference.state_dict())
    config = ModelConfig(
        model_type="qwen3_moe", vocab_size=1024, hidden_size=hidden, intermediate_size=width,
        num_layers=1, num_heads=16, num_kv_heads=4, head_dim=hidden // 16, num_experts=experts,
        experts_per_token=k, moe_layers=(0,), moe_renormalize=renorm,
    )  # fmt: skip
    params = {
        "router": reference.gate.weight.detach(),
        "experts": {
            "gate_up": reference.experts.gate_up_proj.detach(),
            "down": reference.experts.down_proj.detach(),
        },
    }
    return config, params, references


def nf4(params: dict) -> dict:
    dtype = params["router"].dtype
    to_nf4 = lambda m: quant.quantize(m, "nf4", compute_dtype=dtype)  # noqa: E731
    stacks = {name: moe.quantize_stack(w, to_nf4) for name, w in params["experts"].items()}
    return {**params, "experts": stacks}


def with_loop(fn):
    """fn run with every expert matmul forced onto the per-expert loop."""

    def run():
        original = moe.grouped_available
        moe.grouped_available = lambda *a: False
        try:
            return fn()
        finally:
            moe.grouped_available = original

    return run


@contextlib.contextmanager
def gemv_rows(limit: int):
    """Rows up to which NF4 stacks take the expert GEMV, overriding both of moe's limits."""
    saved = moe.EXPERT_GEMV_MAX_ROWS, moe.EXPERT_GEMV_MAX_ROWS_PER_EXPERT
    moe.EXPERT_GEMV_MAX_ROWS, moe.EXPERT_GEMV_MAX_ROWS_PER_EXPERT = limit, limit
    try:
        yield
    finally:
        moe.EXPERT_GEMV_MAX_ROWS, moe.EXPERT_GEMV_MAX_ROWS_PER_EXPERT = saved


def measure(config, variants: dict, references, tokens: int, reps: int) -> dict[str, float]:
    """Wall ms per call of each implementation at one token count."""
    x = torch.randn(1, tokens, config.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    reference = references["grouped_mm"]
    forward = {
        "transformers": lambda x: reference(x),
        "transformers eager": lambda x: references["eager"](x),
        "fnlm": lambda x: decoder.mixture_of_experts(config, variants["bf16"], x),
        "fnlm nf4": lambda x: decoder.mixture_of_experts(config, variants["nf4"], x),
    }
    forward["fnlm loop"] = lambda x: with_loop(lambda: forward["fnlm"](x))()
    times = {}
    with torch.no_grad():
        for name, fn in forward.items():
            times[name] = wall_ms(lambda fn=fn: fn(x), reps)
            if tokens <= 8 and name in ("fnlm", "fnlm nf4") and DEVICE == "cuda":
                times[name + " graph"] = wall_ms(graphed(lambda fn=fn: fn(x)), reps)
        if tokens <= 8 and DEVICE == "cuda":  # NF4 decode: the expert GEMV vs dequantize + grouped
            nf4_step = lambda: forward["fnlm nf4"](x)  # noqa: E731
            for name, rows in (("gemv", 10**9), ("dequant", 0)):
                with gemv_rows(rows):
                    replay = graphed(nf4_step)
                times[f"fnlm nf4 {name} graph"] = wall_ms(replay, reps)
    if tokens >= 1024:  # training: forward + backward to the input
        xg, grad = x.detach().requires_grad_(), torch.randn_like(x)
        for name, fn in forward.items():
            step = lambda fn=fn: torch.autograd.backward(fn(xg), grad)  # noqa: E731
            times[name + " fwd+bwd"] = wall_ms(step, reps)
    with torch.no_grad():
        ours, ref = forward["fnlm"](x).float(), reference(x).float()
    times["rel_error"] = float((ours - ref).abs().max() / ref.abs().max())
    return times


def run(shape: str, reps: int) -> list[dict]:
    config, params, references = build(shape)
    variants = {"bf16": params, "nf4": nf4(params)}
    rows = []
    for tokens in (1, 8, 4096 if DEVICE == "cuda" else 1024):
        times = measure(config, variants, references, tokens, reps)
        error = times.pop("rel_error")
        rows.append(dict(shape=shape, tokens=tokens, rel_error=error, ms=times))
        print(
            f"{shape} T={tokens} (transformers: experts_implementation grouped_mm) rel error {error:.1e}"
        )
        for name, ms in times.items():
            base = times["transformers fwd+bwd" if "fwd+bwd" in name else "transformers"]
            print(f"    {name:24s} {ms:9.3f} ms   {base / ms:6.2f}x transformers", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(name, torch.__version__, transformers.__version__)
    rows = [r for shape in args.shapes.split(",") for r in run(shape, args.reps)]
    result = dict(
        date=datetime.date.today().isoformat(),
        device=name,
        torch=torch.__version__,
        transformers=transformers.__version__,
        rows=rows,
    )
    with open(os.path.join(args.out, "bench_moe.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
