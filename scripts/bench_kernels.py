"""Benchmark fnlm's Triton kernels against eager torch and torch.compile of their references (GPU).

    python scripts/bench_kernels.py [--out DIR] [--reps 20] [--only rmsnorm,rope,swiglu,ce]

Shapes are training-sized: RMSNorm 8192 x 4096, RoPE 8192 tokens x (32 q + 8 kv heads) x 128,
SwiGLU 8192 x 14336, fused linear cross-entropy 16384 x 4096 x vocab 128256, all bf16.
Times are CUDA-event medians over batches of back-to-back calls queued while the GPU sleeps
(GPU time, without the Python overhead of each call). GB/s counts each input read once
and each output written once (the same bytes for every implementation), so it is the effective
bandwidth; fractions are of the H100's measured 3.0 TB/s copy rate and 790 TFLOP/s bf16 matmul.
Our kernels are timed as their custom-op calls (forward op, backward op), the references through
autograd. Prints a table and writes bench_kernels.json to --out (default $OUT or the cwd).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics

import torch
import torch.nn.functional as F
import triton

from fnlm.kernels import (
    apply_rope_reference,
    rms_norm_reference,
    swiglu_reference,
)
from fnlm.kernels.cross_entropy import fused_linear_cross_entropy_op
from fnlm.kernels.glu import glu_backward_op, glu_op
from fnlm.kernels.rmsnorm import rms_norm_backward_op, rms_norm_op
from fnlm.kernels.rope import rope_op

COPY_BYTES_PER_S = 3.0e12  # H100 device-to-device copy, bytes read + written (GPU.md)
MATMUL_FLOP_PER_S = 790e12  # H100 bf16 matmul 8192^3 (GPU.md)
GiB = 2**30


# GPU cycles (~10 ms on an H100) of torch.cuda._sleep before each timed batch: the GPU waits while
# the CPU queues the whole batch, so the Python overhead of a call is not what is measured.
SLEEP_CYCLES = 20_000_000


def cuda_time_ms(fn, reps: int, batches: int = 5) -> float:
    """GPU time: median over `batches` of the mean time of `reps` back-to-back calls, in ms."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def reference_timings(fn, inputs, grad_outs, reps):
    """(forward ms, backward ms) of fn through autograd; inputs require grad."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff_inputs = [t for t in inputs if t.requires_grad]

    def forward():
        fn(*inputs)

    def backward():
        torch.autograd.grad(outs, diff_inputs, grad_outs, retain_graph=True)

    return cuda_time_ms(forward, reps), cuda_time_ms(backward, reps)


def elementwise_rows(
    name, ours_fwd, ours_bwd, reference, inputs, grad_outs, fwd_bytes, bwd_bytes, reps
):
    """Rows for one bandwidth-bound kernel: ours, eager reference, compiled reference."""
    rows = []
    with torch.no_grad():
        fwd_ms = cuda_time_ms(ours_fwd, reps)
        bwd_ms = cuda_time_ms(ours_bwd, reps)
    rows.append(("fnlm triton", fwd_ms, bwd_ms))
    rows.append(("eager torch", *reference_timings(reference, inputs, grad_outs, reps)))
    torch._dynamo.reset()
    compiled = torch.compile(reference)
    rows.append(("torch.compile", *reference_timings(compiled, inputs, grad_outs, reps)))
    result = []
    for impl, fwd_ms, bwd_ms in rows:
        total_gbs = (fwd_bytes + bwd_bytes) / ((fwd_ms + bwd_ms) * 1e-3) / 1e9
        result.append(
            {
                "kernel": name,
                "impl": impl,
                "fwd_ms": fwd_ms,
                "bwd_ms": bwd_ms,
                "fwd_GBps": fwd_bytes / (fwd_ms * 1e-3) / 1e9,
                "bwd_GBps": bwd_bytes / (bwd_ms * 1e-3) / 1e9,
                "fwd_bwd_GBps": total_gbs,
                "fraction_of_copy": total_gbs * 1e9 / COPY_BYTES_PER_S,
            }
        )
    return result


def bench_rmsnorm(reps):
    n, h = 8192, 4096
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(h, device="cuda")).bfloat16().requires_grad_()
    dy = torch.randn_like(x)
    y, rstd = rms_norm_op(x, w, 1e-5, 0.0)
    fwd_bytes = nbytes(x, w, y, rstd)
    bwd_bytes = nbytes(dy, x, w, rstd) + nbytes(x, w)  # reads; writes dx, dw
    return elementwise_rows(
        "rmsnorm 8192x4096",
        lambda: rms_norm_op(x, w, 1e-5, 0.0),
        lambda: rms_norm_backward_op(dy, x, w, rstd, 0.0, True),
        lambda x, w: rms_norm_reference(x, w, 1e-5),
        (x, w),
        (dy,),
        fwd_bytes,
        bwd_bytes,
        reps,
    )


def bench_rope(reps):
    tokens, hq, hk, d = 8192, 32, 8, 128
    q = torch.randn(1, tokens, hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, tokens, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    angles = torch.arange(tokens, device="cuda")[None, :, None] * torch.rand(
        1, 1, d // 2, device="cuda"
    )
    cos, sin = angles.cos(), angles.sin()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    io = nbytes(q, k, cos, sin) + nbytes(q, k)
    return elementwise_rows(
        "rope 8192 tok x (32+8) x 128",
        lambda: rope_op(q, k, cos, sin, False, False),
        lambda: rope_op(dq, dk, cos, sin, False, True),
        lambda q, k: apply_rope_reference(q, k, cos, sin),
        (q, k),
        (dq, dk),
        io,
        io,
        reps,
    )


def bench_swiglu(reps):
    n, inter = 8192, 14336
    gate = torch.randn(n, inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(n, inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(gate)
    return elementwise_rows(
        "swiglu 8192x14336",
        lambda: glu_op(gate, up, "silu"),
        lambda: glu_backward_op(dout, gate, up, "silu"),
        swiglu_reference,
        (gate, up),
        (dout,),
        nbytes(gate, up, gate),
        nbytes(dout, gate, up, gate, up),
        reps,
    )


def peak_extra_bytes(fn) -> int:
    """Peak memory allocated by fn beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_cross_entropy(reps, n=16384, h=4096, vocab=128256):
    hidden = (torch.randn(n, h, device="cuda") * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, h, device="cuda") * h**-0.5).bfloat16()
    labels = torch.randint(0, vocab, (n,), device="cuda")
    labels[::7] = -100
    flop_two = 2 * 2 * n * h * vocab  # logits and grad_hidden matmuls

    # the two lm_head-sized matmuls no implementation can avoid (frozen lm_head)
    buffer = [hidden.detach() @ weight.T]

    def two_matmuls():
        torch.mm(hidden.detach(), weight.T, out=buffer[0])
        return buffer[0] @ weight

    two_ms = cuda_time_ms(two_matmuls, reps)
    buffer.clear()
    torch.cuda.empty_cache()

    rows = []

    def ours(weight_trainable: bool):
        return lambda: fused_linear_cross_entropy_op(
            hidden,
            weight,
            None,
            labels,
            -100,
            "mean",
            None,
            1.0,
            True,
            weight_trainable,
            False,
            True,
            0,
        )

    def loss_fn(hidden, weight):
        logits = (hidden @ weight.T).float()  # transformers upcasts the logits before its loss
        return F.cross_entropy(logits, labels, ignore_index=-100)

    def autograd_step(fn, weight):
        def step():
            loss = fn(hidden, weight)
            return torch.autograd.grad(loss, [t for t in (hidden, weight) if t.requires_grad])

        return step

    for trainable in (False, True):
        w = weight.detach().requires_grad_(trainable)
        flop = flop_two * (1.5 if trainable else 1.0)
        label = "lm_head trainable" if trainable else "lm_head frozen"
        torch._dynamo.reset()
        impls = [
            ("fnlm chunked+triton", ours(trainable)),
            ("eager matmul+F.cross_entropy", autograd_step(loss_fn, w)),
            ("torch.compile(eager)", autograd_step(torch.compile(loss_fn), w)),
        ]
        for impl, fn in impls:
            try:
                ms = cuda_time_ms(fn, max(1, reps // 4), batches=3)
                extra = peak_extra_bytes(fn)
            except torch.OutOfMemoryError:
                rows.append({"kernel": f"fused CE {label}", "impl": impl, "error": "out of memory"})
                torch.cuda.empty_cache()
                continue
            rows.append(
                {
                    "kernel": f"fused CE {n}x{h}x{vocab} {label}",
                    "impl": impl,
                    "ms": ms,
                    "TFLOPps": flop / (ms * 1e-3) / 1e12,
                    "fraction_of_matmul": flop / (ms * 1e-3) / MATMUL_FLOP_PER_S,
                    "x_two_matmuls": ms / two_ms,
                    "extra_GiB": extra / GiB,
                }
            )
    rows.append(
        {
            "kernel": f"fused CE {n}x{h}x{vocab}",
            "impl": "two lm_head matmuls (bound)",
            "ms": two_ms,
            "TFLOPps": flop_two / (two_ms * 1e-3) / 1e12,
            "fraction_of_matmul": flop_two / (two_ms * 1e-3) / MATMUL_FLOP_PER_S,
            "x_two_matmuls": 1.0,
        }
    )
    return rows


def print_table(rows):
    bw = [r for r in rows if "fwd_ms" in r]
    ce = [r for r in rows if "fwd_ms" not in r]
    if bw:
        print(
            "| kernel | impl | fwd ms | bwd ms | fwd GB/s | bwd GB/s | fwd+bwd GB/s | of 3.0 TB/s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in bw:
            print(
                f"| {r['kernel']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {r['fwd_GBps']:.0f} | "
                f"{r['bwd_GBps']:.0f} | {r['fwd_bwd_GBps']:.0f} | {100 * r['fraction_of_copy']:.0f}% |"
            )
    if ce:
        print("\n| kernel | impl | fwd+bwd ms | TFLOP/s | of 790 | x two matmuls | extra GiB |")
        print("|---|---|---|---|---|---|---|")
        for r in ce:
            if "error" in r:
                print(f"| {r['kernel']} | {r['impl']} | {r['error']} | | | | |")
                continue
            extra = f"{r['extra_GiB']:.2f}" if "extra_GiB" in r else ""
            print(
                f"| {r['kernel']} | {r['impl']} | {r['ms']:.2f} | {r['TFLOPps']:.0f} | "
                f"{100 * r['fraction_of_matmul']:.0f}% | {r['x_two_matmuls']:.2f} | {extra} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--only", default="rmsnorm,rope,swiglu,ce")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA device")
    torch.manual_seed(0)
    benches = {
        "rmsnorm": bench_rmsnorm,
        "rope": bench_rope,
        "swiglu": bench_swiglu,
        "ce": bench_cross_entropy,
    }
    rows = []
    for name in args.only.split(","):
        rows += benches[name](args.reps)
        torch.cuda.empty_cache()
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python scripts/bench_kernels.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
    }
    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}")
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
