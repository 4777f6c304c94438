"""Decode speed: fnlm.generate vs transformers `generate`, same checkpoint, same GPU, same process.

    python scripts/bench_generate.py --model llama-3.2-1b [--model llama-3.1-8b] [--out $OUT]

For each model: a random-init checkpoint of the real config (transformers from_config on the GPU in
bf16, save_pretrained to local disk), loaded by fnlm (NF4 double quant and bf16) and by
transformers (BitsAndBytesConfig NF4 double quant with bf16 compute, and bf16; SDPA). Greedy, a
128-token random prompt, 256 new tokens (eos disabled so every run makes all of them). Reported:
- tokens/s at batch 1 (new tokens / wall time of the whole generate call, prefill included), and
  the ratio to transformers;
- batch 8 and 32 throughput (batch x new tokens / wall time) for fnlm;
- time to first token (a generate of one new token: prefill + first choice);
- step time (decode only: (T(256) - T(1)) / 255) and the fraction of the weight-reading limit:
  bytes of weights read per step / step time / 4.3 TB/s (the H200's measured copy bandwidth;
  an untied embedding table is not counted: a step reads one row of it).
With --linears: the decode linears alone (CUDA-graph timings), fnlm's NF4 GEMV in each variant
of --gemv-variants (fixup, sweep, tuned; the tuned choices printed) beside dequantize + matmul,
bitsandbytes (when installed) and bf16, in µs, GB/s and % of the 4.8 TB/s HBM peak. --gemv-variants fixup,sweep also runs every other part once per
NF4 GEMV variant (FNLM_NF4_GEMV; kept graphs dropped between), keyed "<model> <quant> <variant>".
With --parts first-call (issue 19): a repeat call's time against the first call at a new prompt
length in the same prompt and cache-length buckets, at a new prompt bucket and at a new cache
bucket (nothing compiles after the process's first call: the compiled layer takes the lengths as
dynamic dimensions; a new prompt bucket captures a prefill graph, a new cache bucket a prefill
and a decode-step graph). With --parts serve: fnlm.serve's Engine (continuous batching, no HTTP),
one stream alone vs --serve-streams concurrent streams of the same length, aggregate tokens/s.
--tiny: fnlm and transformers generate on a CPU (shrunk configs, NF4 for fnlm, the reference
32-bit: no bitsandbytes there). Models: scripts/bench_configs.py's REAL_CONFIGS (gpt-oss's
reference runs eager attention: transformers has no SDPA path for it; noted).
Prints a table and writes bench_generate.json (to --out, default $OUT or .).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import compute_dtype, peak_gib, reference_model, sync_time  # noqa: E402
from bench_configs import REAL_CONFIGS, clear, vocab_size, write_checkpoint  # noqa: E402

COPY_BANDWIDTH = 4.3e12  # bytes/s, device-to-device copy measured on the H200 (GPU.md)
HBM_PEAK = 4.8e12  # bytes/s, the H200's specified HBM3e bandwidth


def median_time(fn, args) -> float:
    return statistics.median(sync_time(fn, args.device) for _ in range(args.repeats))


def weight_bytes(params) -> int:
    """Bytes a decode step reads: every distinct weight tensor, minus an untied embedding table
    and Gemma 4's per-layer embedding table (a step reads one row of each)."""
    import torch.utils._pytree as pytree

    skip = {id(t) for t in pytree.tree_leaves(params.get("embed_per_layer"))}
    if params["embed"] is not params["lm_head"]:
        skip |= {id(t) for t in pytree.tree_leaves(params["embed"])}
    seen, total = set(), 0
    for t in pytree.tree_leaves(params):
        if isinstance(t, torch.Tensor) and id(t) not in seen and id(t) not in skip:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def bench_fnlm(directory: Path, quant, prompts, args) -> dict:
    import fnlm
    from fnlm.generate import generate_tokens

    params, _ = fnlm.load(
        directory, quant=quant, dtype=compute_dtype(args.device), device=args.device
    )
    result = {"weight_bytes": weight_bytes(params)}
    for batch in args.batches:
        rows = [prompts[i % len(prompts)] for i in range(batch)]
        out = generate_tokens(params, rows, max_new_tokens=args.new_tokens)  # compile + capture
        assert all(len(r) == args.new_tokens for r in out), "a row stopped early"
        generate_tokens(params, rows, max_new_tokens=1)  # its own cache bucket: capture it
        full, first = (
            median_time(
                lambda n=n, rows=rows: generate_tokens(params, rows, max_new_tokens=n), args
            )
            for n in (args.new_tokens, 1)
        )
        step = (full - first) / (args.new_tokens - 1)
        entry = {
            "tokens_per_s": batch * args.new_tokens / full,
            "seconds": full,
            "ttft_ms": first * 1e3,
            "step_ms": step * 1e3,
        }
        if batch == 1 and args.device == "cuda":
            entry["weight_limit_fraction"] = result["weight_bytes"] / step / COPY_BANDWIDTH
        result[f"batch{batch}"] = entry
        print(f"  fnlm {quant or 'bf16'} batch {batch}: {entry}", flush=True)
    result["peak_gib"] = peak_gib(args.device)
    if args.profile:
        profile(lambda: generate_tokens(params, prompts[:1], max_new_tokens=1), "prefill (TTFT)")
        profile(lambda: generate_tokens(params, prompts[:1], max_new_tokens=64), "64 new tokens")
    return result


def bench_first_call(directory: Path, quant, prompts, args) -> dict:
    """Seconds of a repeat call vs the first call at a new prompt length: in the same prompt and
    cache buckets (replays only), at a new prompt bucket (captures a prefill), and at a new
    cache bucket (captures a prefill and a decode step); batch 1, args.new_tokens new tokens."""
    import fnlm
    from fnlm.generate import cache_length, generate_tokens
    from fnlm.generate.step import prompt_length

    params, _ = fnlm.load(directory, quant=quant, dtype=torch.bfloat16, device="cuda")
    vocab, n = params.config.vocab_size, args.new_tokens
    g = torch.Generator().manual_seed(1)
    prompt = lambda length: torch.randint(0, vocab, (1, length), generator=g).tolist()  # noqa: E731
    call = lambda p: lambda: generate_tokens(params, p, max_new_tokens=n)  # noqa: E731
    buckets = lambda length: (prompt_length(length), cache_length(prompt_length(length) + n))  # noqa: E731
    base = prompts[:1]
    t_process_first = sync_time(call(base), args.device)  # compiles once for the process
    repeat = median_time(call(base), args)
    result = {
        "process_first_call_s": t_process_first,
        "repeat_s": repeat, "repeat_tokens_per_s": n / repeat,
    }  # fmt: skip
    cases = {
        "same_buckets": max(1, prompt_length(args.prompt_tokens) - 17),
        "new_prompt_bucket": prompt_length(args.prompt_tokens) + 7,
        "new_cache_bucket": args.prompt_tokens + 472,
    }
    mine = buckets(args.prompt_tokens)
    assert buckets(cases["same_buckets"]) == mine
    assert buckets(cases["new_prompt_bucket"])[0] != mine[0]
    assert buckets(cases["new_prompt_bucket"])[1] == mine[1]
    assert buckets(cases["new_cache_bucket"])[1] != mine[1]
    for label, length in cases.items():
        fresh = prompt(length)
        first = sync_time(call(fresh), args.device)
        again = median_time(call(fresh), args)
        result[label] = {"prompt": length, "first_s": first, "repeat_s": again,
                         "first_over_repeat": first / again, "first_tokens_per_s": n / first}  # fmt: skip
    print(f"  fnlm {quant or 'bf16'} first call vs repeat: {result}", flush=True)
    return result


def bench_serve(directory: Path, quant, prompts, args) -> dict:
    """fnlm.serve's Engine: one stream alone vs args.serve_streams streams submitted together,
    each args.new_tokens greedy tokens after a args.prompt_tokens prompt; aggregate tokens/s."""
    import threading

    import fnlm
    from fnlm.serve import Engine, Request

    params, _ = fnlm.load(directory, quant=quant, dtype=torch.bfloat16, device="cuda")
    streams, n = args.serve_streams, args.new_tokens
    engine = Engine(params, None, slots=streams, context=args.prompt_tokens + n)
    widths = engine.steps_by_width

    def run(count: int) -> float:
        done = threading.Semaphore(0)
        lengths = []
        start = time.perf_counter()
        for i in range(count):
            on_event = lambda kind, data: (  # noqa: E731
                lengths.append(len(data.token_ids) if kind == "done" else data),
                kind == "piece" or done.release(),
            )
            engine.submit(
                Request(prompt=prompts[i % len(prompts)], max_tokens=n, on_event=on_event)
            )
        for _ in range(count):
            assert done.acquire(timeout=60), "a request did not finish"
        assert lengths == [n] * count, lengths
        return time.perf_counter() - start

    try:
        run(2)  # compile and capture
        single = statistics.median(run(1) for _ in range(args.repeats))
        single_widths = dict(widths)
        widths.clear()
        many = statistics.median(run(streams) for _ in range(args.repeats))
    finally:
        engine.close()
    result = {
        "streams": streams, "single_tokens_per_s": n / single,
        "aggregate_tokens_per_s": streams * n / many, "ratio": streams * single / many,
        "most_rows": engine.most_rows,
        "steps_by_width": {"single": single_widths, "streams": dict(widths)},
    }  # fmt: skip
    print(f"  fnlm.serve {quant or 'bf16'}: {result}", flush=True)
    return result


def profile(fn, what: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"  profile of {what}:")
    for key in ("self_cpu_time_total", "self_cuda_time_total"):
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
        except Exception as e:  # the column's name differs across torch versions
            print(f"  ({key}: {e})")


def bench_reference(directory: Path, quant, prompts, args) -> dict:
    notes: list[str] = []
    model = reference_model(directory, args.device, nf4=quant == "nf4", notes=notes).eval()
    for note in notes:
        print(f"  note: {note}", flush=True)
    model.generation_config.eos_token_id = None  # random weights: always make all tokens
    model.generation_config.pad_token_id = 0
    ids = torch.tensor(prompts[:1], device=args.device)

    def run(n):
        with torch.no_grad():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
            )

    run(8)
    full = sync_time(lambda: run(args.ref_new_tokens), args.device)
    first = median_time(lambda: run(1), args)
    entry = {
        "tokens_per_s": args.ref_new_tokens / full,
        "seconds": full,
        "new_tokens": args.ref_new_tokens,
        "ttft_ms": first * 1e3,
        "step_ms": (full - first) / (args.ref_new_tokens - 1) * 1e3,
        "peak_gib": peak_gib(args.device),
    }
    print(f"  transformers {quant or 'bf16'} batch 1: {entry}", flush=True)
    return {"batch1": entry, "notes": notes}


def time_on_device(fn) -> float:
    """Seconds per call of `fn` on the GPU alone (the library's timing of the "tuned" GEMV:
    20 calls captured in a CUDA graph, replayed 5 times)."""
    from fnlm.kernels._nf4_gemv_config import _time_on_device

    return _time_on_device(fn, calls=20, replays=5) / 1e3


def bench_linears(name: str, variants: list[str]) -> dict:
    """The decode linears of one model alone: fnlm's NF4 linear (the fused GEMV up to 8 rows) in
    each GEMV variant, dequantize + matmul, bitsandbytes' matmul_4bit (its own GEMV at one row;
    skipped when bitsandbytes is not installed) and bf16, in microseconds, GB/s of weight bytes
    read and % of the HBM peak."""
    import torch.nn.functional as F

    from fnlm import quant

    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
        print("  (bitsandbytes not installed: no bnb column)", flush=True)
    c = REAL_CONFIGS[name]
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * c.get("head_dim", hidden // c["num_attention_heads"])
    shapes = {"q/o": (hidden, hidden), "k/v": (kv, hidden), "gate/up": (inter, hidden),
              "down": (hidden, inter), "lm_head": (c["vocab_size"], hidden)}  # fmt: skip
    results = {}
    for label, (n_out, n_in) in shapes.items():
        w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) * 0.02
        q = quant.quantize(w, "nf4", compute_dtype=torch.bfloat16)
        nbytes = sum(t.numel() * t.element_size() for t in q.tensors())
        if bnb is not None:
            packed, state = bnb.functional.quantize_4bit(
                w, quant_type="nf4", compress_statistics=True, blocksize=64
            )
        for batch in (1, 2, 4, 8):
            x = torch.randn(batch, n_in, device="cuda", dtype=torch.bfloat16)
            times = {}
            for variant in variants:  # read when the graph of time_on_device is captured
                with gemv_variant(variant):
                    times[f"fnlm {variant}"] = time_on_device(lambda x=x, q=q: quant.linear(x, q))
            times["dequant+matmul"] = time_on_device(lambda x=x, q=q: F.linear(x, q.dequantize()))
            if bnb is not None:
                times["bnb"] = time_on_device(
                    lambda x=x, p=packed, s=state: bnb.matmul_4bit(x, p.t(), quant_state=s)
                )
            times["bf16"] = time_on_device(lambda x=x, w=w: F.linear(x, w))
            row = {}
            for k, t in times.items():
                read = (nbytes if k != "bf16" else w.numel() * 2) + 2 * batch * (n_in + n_out)
                row[k] = {"us": t * 1e6, "GB/s": read / t / 1e9, "hbm": read / t / HBM_PEAK}
            results[f"{label} {n_out}x{n_in} b{batch}"] = row
            print(f"  {label} {n_out}x{n_in} batch {batch}: " + ", ".join(
                f"{k} {v['us']:.1f}us {v['GB/s']:.0f}GB/s {100 * v['hbm']:.0f}%"
                for k, v in row.items()), flush=True)  # fmt: skip
    if "tuned" in variants:  # what the timed choice picked, per shape and rows
        from fnlm.kernels._nf4_gemv_config import tuned_configs

        for (n_out, n_in, rows, *_), config in tuned_configs().items():
            results[f"tuned {n_out}x{n_in} b{rows}"] = list(config)
            print(f"  tuned {n_out}x{n_in} batch {rows}: (rows, blocks/step, warps, splits) "
                  f"{config}", flush=True)  # fmt: skip
    # the GEMV kernel's own tile sweep: scripts/bench_quant.py --gemv-only --sweep
    return results


def gemv_variants(text: str) -> list[str]:
    """--gemv-variants: a comma list of fnlm's NF4 GEMV variants, refused at parsing (before any
    checkpoint is written) when one is unknown."""
    from fnlm.kernels._nf4_gemv_config import GEMV_VARIANTS

    variants = text.split(",")
    unknown = [v for v in variants if v not in GEMV_VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; expected some of {GEMV_VARIANTS}")
    return variants


@contextlib.contextmanager
def gemv_variant(variant: str | None):
    """FNLM_NF4_GEMV set to `variant` inside (None: left as it is), kept decode graphs dropped
    on the way in and out (they hold the variant they were captured with)."""
    from fnlm.generate import release_graphs

    if variant is None:
        yield
        return
    before = os.environ.get("FNLM_NF4_GEMV")
    os.environ["FNLM_NF4_GEMV"] = variant
    release_graphs()
    try:
        yield
    finally:
        release_graphs()
        if before is None:
            del os.environ["FNLM_NF4_GEMV"]
        else:
            os.environ["FNLM_NF4_GEMV"] = before


def route_nf4_through_bitsandbytes() -> None:
    """Experiment (--nf4-route bnb): NF4 linears with one row go to bitsandbytes' own GEMV
    (gemv_4bit, on fnlm's NF4 bytes, which are bitsandbytes' layout), 2-8 rows to dequantize +
    cuBLAS; shows what the decode loop reaches with a fast 4-bit GEMV."""
    import bitsandbytes as bnb
    import torch.nn.functional as F

    from fnlm import quant

    original = quant.linear

    def state_of(w):
        if not hasattr(w, "_bnb_state"):
            nested = bnb.functional.QuantState(
                absmax=w.nested_absmax, code=w.nested_code, blocksize=w.nested_blocksize,
                dtype=torch.float32,
            )  # fmt: skip
            w._bnb_state = bnb.functional.QuantState(
                absmax=w.absmax, shape=w.shape, code=w.code, blocksize=w.blocksize,
                quant_type="nf4", dtype=w.dtype, offset=w.offset, state2=nested,
            )  # fmt: skip
        return w._bnb_state

    def linear(x, w, bias=None):
        if not isinstance(w, quant.NF4Weight) or not x.is_cuda or x.numel() // x.shape[-1] > 8:
            return original(x, w, bias)
        if x.numel() == x.shape[-1]:
            return bnb.matmul_4bit(x, w.packed.t(), quant_state=state_of(w), bias=bias)
        return F.linear(x, w.dequantize(), bias)

    quant.linear = linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(REAL_CONFIGS))
    parser.add_argument("--quant", action="append", choices=["nf4", "bf16"])
    parser.add_argument(
        "--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8, 32]
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--ref-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--linears", action="store_true", help="also time the decode linears alone")
    parser.add_argument("--nf4-route", choices=["fnlm", "bnb"], default="fnlm",
                        help="bnb: experiment, NF4 decode linears through bitsandbytes' GEMV")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="profile one prefill and one step")
    parser.add_argument(
        "--parts",
        type=lambda s: [part for part in s.split(",") if part],
        default=["fnlm", "transformers"],
        help="comma list of fnlm, transformers, first-call, serve (empty: --linears alone)",
    )
    parser.add_argument("--serve-streams", type=int, default=32)
    parser.add_argument(
        "--gemv-variants",
        type=gemv_variants,
        default=None,
        help="comma list of NF4 GEMV variants (fixup, sweep, tuned) to run each part with; default: "
        "FNLM_NF4_GEMV or fixup, one run",
    )
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "fnlm-bench")
    parser.add_argument(
        "--tiny", action="store_true",
        help="CPU check: each model shrunk (bench_configs.TINY_SIZES), NF4, batch 1, 16-token "
        "prompt, 8 new tokens, one repeat; the reference without bitsandbytes",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    args.device = "cpu" if args.tiny else "cuda"
    models = args.model or ["llama-3.2-1b", "llama-3.1-8b"]
    quants = args.quant or ["nf4", "bf16"]
    if args.tiny:
        if args.linears or args.profile or {"first-call", "serve"} & set(args.parts):
            parser.error("--tiny times fnlm and transformers generate only")
        quants, args.batches, args.repeats = args.quant or ["nf4"], [1], 1
        args.prompt_tokens, args.new_tokens, args.ref_new_tokens = 16, 8, 8
    # One compiled layer per (model, quant, batch, cache length): more than dynamo's default 8.
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)

    results: dict = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (--tiny)",
        "nf4_route": args.nf4_route,
    }  # fmt: skip
    if args.nf4_route == "bnb":
        route_nf4_through_bitsandbytes()
    out_file = args.out / "bench_generate.json"
    variants = args.gemv_variants or [os.environ.get("FNLM_NF4_GEMV") or "fixup"]
    for name in models:
        if args.linears:
            results[f"{name} linears"] = bench_linears(name, variants)
        if not args.parts:
            continue
        directory = args.dir / (f"{name}-tiny" if args.tiny else name)
        t = time.perf_counter()
        write_checkpoint(name, directory, args.device, args.tiny)
        print(f"{name}: checkpoint in {time.perf_counter() - t:.0f}s", flush=True)
        vocab = vocab_size(name, args.tiny)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, vocab, (32, args.prompt_tokens), generator=g).tolist()
        for quant, variant in [(q, v) for q in quants for v in variants]:
            if quant == "bf16" and variant != variants[0]:
                continue  # the GEMV variant is NF4's alone
            key = f"{name} {quant}" + (f" {variant}" if len(variants) > 1 else "")
            results[key] = {}
            parts = {"fnlm": bench_fnlm, "transformers": bench_reference,
                     "first-call": bench_first_call, "serve": bench_serve}  # fmt: skip
            for who in args.parts:
                fn = parts[who]
                if who == "transformers" and name == "llama-3.1-8b" and quant == "bf16":
                    continue  # no goal for it, and it costs a minute
                if who == "transformers" and variant != variants[0]:
                    continue  # the reference does not use fnlm's GEMV
                clear()
                print(f"{key}: {who}", flush=True)
                try:
                    with gemv_variant(variant if len(variants) > 1 else None):
                        results[key][who] = fn(
                            directory, None if quant == "bf16" else quant, prompts, args
                        )
                except Exception as e:  # keep the other rows of the table
                    traceback.print_exc()
                    results[key][who] = {"error": f"{type(e).__name__}: {e}"}
                args.out.mkdir(parents=True, exist_ok=True)
                out_file.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"wrote {out_file}")


def print_table(results: dict) -> None:
    header = (
        "| model | weights | fnlm tok/s b1 | transformers tok/s b1 | ratio | fnlm tok/s b8 | "
        "fnlm tok/s b32 | TTFT ms | step ms | weight-read limit |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for key, entry in results.items():
        if not isinstance(entry, dict) or "fnlm" not in entry:
            continue
        name, quant, *variant = key.split()
        # the reference runs once per model and weights, under the first GEMV variant's key
        ref = next(
            (e["transformers"] for k, e in results.items()
             if k.split()[:2] == [name, quant] and isinstance(e, dict) and "transformers" in e),
            {},
        )  # fmt: skip
        ours = entry["fnlm"]
        b1 = ours.get("batch1", {})
        get = lambda d, k: d.get(k, float("nan"))  # noqa: E731
        ratio = get(b1, "tokens_per_s") / get(ref.get("batch1", {}), "tokens_per_s")
        print(
            f"| {name} | {' '.join([quant, *variant])} | {get(b1, 'tokens_per_s'):.1f} | "
            f"{get(ref.get('batch1', {}), 'tokens_per_s'):.1f} | {ratio:.1f}x | "
            f"{get(ours.get('batch8', {}), 'tokens_per_s'):.0f} | "
            f"{get(ours.get('batch32', {}), 'tokens_per_s'):.0f} | {get(b1, 'ttft_ms'):.1f} | "
            f"{get(b1, 'step_ms'):.2f} | {100 * get(b1, 'weight_limit_fraction'):.0f}% |"
        )
    for key, entry in results.items():
        reference = entry.get("transformers", {}) if isinstance(entry, dict) else {}
        for note in reference.get("notes", []):
            print(f"{key}: note: {note}")


if __name__ == "__main__":
    main()
