"""Time the gated delta rule's scan backends and launches at a real model's shapes (GPU).

    python scripts/bench_deltanet.py [--batch 2 --seq 2048 --key-heads 16 --value-heads 32
                                      --dk 128 --dv 128] [--reps 5] [--out DIR]

`fnlm.kernels.gated_delta_rule` forward, and forward + backward, on bf16 inputs (Qwen3.5-9B's
DeltaNet layer by default), once per variant: the fused Triton scan at launches (value columns x
warps) and dot precisions, the split scan, and torch's loop of fp32 matmuls (the reference here:
TF32 off). Each variant's output and input gradients are compared with the reference's (largest
absolute difference over the reference's largest magnitude). Times are CUDA-event medians (ms);
the bandwidth floor is what a forward must read and write once (q, k, v, g, beta in, o out) at
the H200's 4.3 TB/s copy rate. Writes bench_deltanet.json to --out (default $OUT or the cwd).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics

import torch

from fnlm.kernels import deltanet, deltanet_split, gated_delta_rule

COPY_BYTES_PER_S = 4.3e12  # H200 device-to-device copy (GPU.md)

# (name, backend, fused launch (value columns, warps), dot precision)
VARIANTS = [
    ("torch loop (reference)", "torch", None, None),
    ("fused 32x4 ieee", "triton", (32, 4), "ieee"),
    ("fused 16x8 ieee", "triton", (16, 8), "ieee"),
    ("fused 32x8 ieee", "triton", (32, 8), "ieee"),
    ("fused 16x4 tf32", "triton", (16, 4), "tf32"),
    ("split 16x8 ieee", "split", None, "ieee"),
    # last: on an H200 (2026-12-04) "fused 16x8 tf32x3" hit an illegal memory access, which
    # leaves the process's CUDA context unusable for any variant after it
    ("split 16x8 tf32x3", "split", None, "tf32x3"),
    ("fused 16x8 tf32x3", "triton", (16, 8), "tf32x3"),
    ("fused 32x4 tf32x3", "triton", (32, 4), "tf32x3"),
]


def cuda_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def configure(backend: str, launch, precision) -> None:
    deltanet.SCAN_BACKEND = backend
    if launch is not None:
        deltanet.SCAN_WIDE_BV, deltanet.SCAN_WARPS = launch
    if precision is not None:
        deltanet.SCAN_PRECISION = deltanet_split.SPLIT_PRECISION = precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("batch", 2), ("seq", 2048), ("key-heads", 16), ("value-heads", 32),
                          ("dk", 128), ("dv", 128), ("reps", 5)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument(
        "--only",
        help="comma list of variant names or their first words, e.g. 'split,fused 16x4 tf32'",
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_deltanet.py needs a CUDA device")
    device = torch.cuda.get_device_name()  # read now: a failed variant can lose the context
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, t, hk, hv = args.batch, args.seq, args.key_heads, args.value_heads
    randn = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)  # noqa: E731
    q, k = randn(b, t, hk, args.dk).bfloat16(), randn(b, t, hk, args.dk).bfloat16()
    v = randn(b, t, hv, args.dv).bfloat16()
    g = -torch.nn.functional.softplus(randn(b, t, hv)).bfloat16()  # log decay <= 0
    beta = torch.sigmoid(randn(b, t, hv)).bfloat16()
    d_o = randn(b, t, hv, args.dv).bfloat16()
    inputs = (q, k, v, g, beta)
    floor_ms = 1e3 * sum(x.nbytes for x in (*inputs, d_o)) / COPY_BYTES_PER_S

    def run(backward: bool):
        leaves = [x.detach().requires_grad_(backward) for x in inputs]
        o, _ = gated_delta_rule(*leaves)
        if not backward:
            return o, []
        o.backward(d_o)
        return o, [x.grad for x in leaves]

    rows, reference = [], None
    only = args.only.split(",") if args.only else None
    chosen = (
        VARIANTS
        if only is None
        else [VARIANTS[0]] + [v for v in VARIANTS[1:] if v[0] in only or v[0].split()[0] in only]
    )  # the reference first: the others' errors are measured against it
    kept = (deltanet.SCAN_BACKEND, (deltanet.SCAN_WIDE_BV, deltanet.SCAN_WARPS),
            deltanet.SCAN_PRECISION)  # fmt: skip
    for name, backend, launch, precision in chosen:
        configure(backend, launch, precision)
        row = {"variant": name}
        try:
            o, grads = run(True)
            outs = [o.float(), *(x.float() for x in grads)]
            if reference is None:
                reference = outs
            row["error"] = max(
                float((a - r).abs().max() / r.abs().max()) for a, r in zip(outs, reference)
            )
            row["forward_ms"] = cuda_ms(lambda: run(False), args.reps)
            row["forward_backward_ms"] = cuda_ms(lambda: run(True), args.reps)
        except Exception as e:  # a launch that does not fit: say so, time the others
            row["failed"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(row, flush=True)
        if "illegal memory access" in row.get("failed", ""):
            print("the CUDA context is lost: the variants after this one are not run", flush=True)
            break
        torch.cuda.empty_cache()
    configure(*kept)

    print(f"\n{device}, shapes q/k {tuple(q.shape)} v {tuple(v.shape)} "
          f"bf16; forward bandwidth floor {floor_ms:.3f} ms")  # fmt: skip
    print(
        "| variant | forward ms | forward + backward ms | x reference (f+b) | error vs reference |"
    )
    print("|---|---|---|---|---|")
    base = next((r["forward_backward_ms"] for r in rows if "failed" not in r), None)
    for r in rows:
        if "failed" in r:
            print(f"| {r['variant']} | failed: {r['failed'][:80]} | | | |")
            continue
        print(f"| {r['variant']} | {r['forward_ms']:.2f} | {r['forward_backward_ms']:.2f} | "
              f"{base / r['forward_backward_ms']:.2f}x | {r['error']:.1e} |")  # fmt: skip
    meta = {
        "device": device,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "forward_floor_ms": floor_ms,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_deltanet.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
