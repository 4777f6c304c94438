"""GPU micro-benchmark of the NF4 kernels against bitsandbytes, at Llama-3.1-8B shapes.

    python3 -u scripts/bench_quant.py [--sweep] [--out DIR]

- dequantize: fnlm's Triton kernel vs bitsandbytes' CUDA dequantize_4bit (bf16 out), with GB/s
  counting the packed bytes + absmax read once and the 16-bit weight written once;
- decode GEMV (batch 1, 2, 4, 8; + Llama-3.2-1B's lm_head 128256x2048): fnlm's fused NF4 GEMV vs
  bitsandbytes (gemv_4bit for one row; matmul_4bit, i.e. dequantize + matmul, beyond) vs fnlm's
  dequantize + matmul; GB/s counts the NF4 weight (+ x, y) read once, the quantity that bounds
  decode, and is compared with the H200's 4.8 TB/s HBM peak;
- --small-gemm (batch 16, 32, 64, 128, Llama-3.1-8B's shapes): fnlm's fused small-batch NF4 GEMM
  (fnlm/kernels/nf4_gemm.py, off by default: FNLM_NF4_SMALL_GEMM) vs fnlm's dequantize + matmul
  (what batched decode and GRPO rollouts run today), with GB/s of the NF4 weight read once and
  the tensor cores' share (2 x rows x out x in FLOP at 790 TFLOP/s bf16 dense).
Times are medians of CUDA-graph replays (`triton.testing.do_bench_cudagraph`), so launch overhead
is excluded as in a graph-captured decode step. --sweep also times other block shapes of the two
kernels, to choose the launchers' defaults. Writes bench_quant.json to --out (default $OUT or .).
"""

# ruff: noqa: B023  (the closures are timed at once, inside their loop iteration)

from __future__ import annotations

import argparse
import itertools
import json
import os

import bitsandbytes as bnb_module
import bitsandbytes.functional as bnb
import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

import fnlm.quant as Q
from fnlm.kernels import nf4_gemv, nf4_small_gemm
from fnlm.kernels.nf4 import _TRITON_DTYPES, _dequantize_nf4_kernel
from fnlm.kernels.nf4_gemv import _gemv_config, nf4_gemv_fwd

COPY_BANDWIDTH = 4.3e12  # bytes/s, device-to-device copy on the H200 (GPU.md)
HBM_BANDWIDTH = 4.8e12  # bytes/s, the H200's HBM3e peak (the GEMV reads each weight once)
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
GEMV_SHAPES = [*SHAPES, (128256, 2048)]  # + Llama-3.2-1B's lm_head
BATCHES = [1, 2, 4, 8]
SMALL_GEMM_BATCHES = [16, 32, 64, 128]
BF16_FLOPS = 790e12  # H200 dense bf16 (GPU.md)


def bench(fn) -> float:
    """Median seconds per call, replayed from a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e-3


def weight_bytes(w: Q.NF4Weight) -> int:
    return w.nbytes


def dequantize_rows(args, rows):
    for shape in SHAPES[:2]:
        w16 = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        w = Q.quantize(w16, "nf4", compute_dtype=torch.bfloat16)
        packed, state = w.to_bnb()
        assert torch.equal(w.dequantize(), bnb.dequantize_4bit(packed, state)), "not bit-exact"
        moved = weight_bytes(w) + w16.nbytes
        t_ours = bench(lambda: w.dequantize())
        t_bnb = bench(lambda: bnb.dequantize_4bit(packed, state))
        rows.append(
            {
                "bench": "dequantize",
                "shape": list(shape),
                "fnlm_us": t_ours * 1e6,
                "bnb_us": t_bnb * 1e6,
                "fnlm_GBps": moved / t_ours / 1e9,
                "bnb_GBps": moved / t_bnb / 1e9,
                "fnlm_frac_copy": moved / t_ours / COPY_BANDWIDTH,
                "speedup_vs_bnb": t_bnb / t_ours,
            }
        )
        print_table(rows[-1:])
        if args.sweep:
            n = shape[0] * shape[1]
            out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
            expected = w.dequantize()
            for block_bytes, warps, table, hw_round in itertools.product(
                (512, 1024, 2048, 4096, 8192), (4, 8), (False, True), (False, True)
            ):

                def run(block_bytes=block_bytes, warps=warps, table=table, hw_round=hw_round):
                    _dequantize_nf4_kernel[(triton.cdiv(n // 2, block_bytes),)](
                        w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, out, n,
                        w.code, NESTED=True, OUT_DTYPE=_TRITON_DTYPES[torch.bfloat16],
                        BLOCKSIZE=64, NESTED_BLOCKSIZE=256, BLOCK_BYTES=block_bytes,
                        TABLE=table, HW_ROUND=hw_round, num_warps=warps, enable_fp_fusion=False,
                    )  # fmt: skip

                t = bench(run)
                rows.append(
                    {
                        "bench": "dequantize_sweep",
                        "shape": list(shape),
                        "block_bytes": block_bytes,
                        "warps": warps,
                        "table": table,
                        "hw_round": hw_round,
                        "exact": torch.equal(out, expected),
                        "us": t * 1e6,
                        "GBps": moved / t / 1e9,
                    }
                )


def lora_rows(args, rows):
    """One LoRA linear's matmuls at 4,096 tokens (dense bf16 W, r=16): the adapter's output added
    by a separate thin addmm after the base GEMM (reads and writes [tokens, out] again) against the
    thin product written first and the base GEMM accumulating into it (beta=1 epilogue)."""
    tokens, r = 4096, 16
    for out_f, in_f in [(4096, 4096), (1024, 4096), *SHAPES[1:]]:
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(r, in_f, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(out_f, r, device="cuda", dtype=torch.bfloat16)
        xa, gxa = x @ a.t(), grad @ b
        variants = {
            "fwd_after": lambda: torch.addmm(x @ w.t(), xa, b.t()),
            "fwd_first": lambda: (xa @ b.t()).addmm_(x, w.t()),
            "bwd_after": lambda: (grad @ w).addmm_(gxa, a),
            "bwd_first": lambda: (gxa @ a).addmm_(grad, w),
            "gemm_only_fwd": lambda: x @ w.t(),
            "gemm_only_bwd": lambda: grad @ w,
        }
        times = {name: bench(fn) * 1e6 for name, fn in variants.items()}
        row = {"bench": "lora", "shape": [out_f, in_f], **{f"{k}_us": v for k, v in times.items()}}
        rows.append(row)
        print(
            f"lora {row['shape']}: fwd after {times['fwd_after']:.1f} / first {times['fwd_first']:.1f}"
            f" / GEMM alone {times['gemm_only_fwd']:.1f} us; bwd after {times['bwd_after']:.1f} /"
            f" first {times['bwd_first']:.1f} / GEMM alone {times['gemm_only_bwd']:.1f} us",
            flush=True,
        )


def gemv_rows(args, rows):
    for shape in GEMV_SHAPES:
        w16 = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        w = Q.quantize(w16, "nf4", compute_dtype=torch.bfloat16)
        packed, state = w.to_bnb()
        del w16
        for batch in BATCHES:
            x = torch.randn(batch, shape[1], device="cuda", dtype=torch.bfloat16)
            moved = weight_bytes(w) + x.nbytes + batch * shape[0] * 2
            times = {
                "fnlm_gemv": bench(lambda: nf4_gemv(x, w)),
                "fnlm_dequant_matmul": bench(lambda: F.linear(x, w.dequantize())),
                # bnb.matmul_4bit: its gemv_4bit kernel for one row, dequantize + matmul beyond
                "bnb": bench(lambda: bnb_module.matmul_4bit(x, packed.t(), quant_state=state)),
            }
            reference = F.linear(x.float(), w.dequantize().float())
            error = (nf4_gemv(x, w).float() - reference).abs().max().item()
            rows.append(
                {
                    "bench": "gemv",
                    "shape": list(shape),
                    "batch": batch,
                    **{f"{k}_us": v * 1e6 for k, v in times.items()},
                    "fnlm_gemv_GBps": moved / times["fnlm_gemv"] / 1e9,
                    "bnb_GBps": moved / times["bnb"] / 1e9,
                    "fnlm_gemv_frac_peak": moved / times["fnlm_gemv"] / HBM_BANDWIDTH,
                    "speedup_vs_dequant_matmul": times["fnlm_dequant_matmul"] / times["fnlm_gemv"],
                    "speedup_vs_bnb": times["bnb"] / times["fnlm_gemv"],
                    "max_abs_err_vs_fp32": error,
                    "config": list(_gemv_config(shape[0], shape[1], batch, x.device)),
                }
            )
            print_table(rows[-1:])
            if args.sweep and batch in (1, 4, 8):
                gemv_sweep(rows, w, x, shape, batch, moved)
        save(rows, args.out)


def small_gemm_rows(args, rows):
    for shape in SHAPES:
        w16 = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        w = Q.quantize(w16, "nf4", compute_dtype=torch.bfloat16)
        del w16
        for batch in SMALL_GEMM_BATCHES:
            x = torch.randn(batch, shape[1], device="cuda", dtype=torch.bfloat16)
            times = {
                "fnlm_small_gemm": bench(lambda: nf4_small_gemm(x, w)),
                "fnlm_dequant_matmul": bench(lambda: F.linear(x, w.dequantize())),
            }
            reference = F.linear(x.float(), w.dequantize().float())
            error = (nf4_small_gemm(x, w).float() - reference).abs().max().item()
            moved = weight_bytes(w) + x.nbytes + batch * shape[0] * 2
            flops = 2 * batch * shape[0] * shape[1]
            rows.append({
                "bench": "small_gemm", "shape": list(shape), "batch": batch,
                **{f"{k}_us": v * 1e6 for k, v in times.items()},
                "fnlm_small_gemm_GBps": moved / times["fnlm_small_gemm"] / 1e9,
                "fnlm_small_gemm_frac_hbm": moved / times["fnlm_small_gemm"] / HBM_BANDWIDTH,
                "fnlm_small_gemm_frac_flops": flops / times["fnlm_small_gemm"] / BF16_FLOPS,
                "speedup_vs_dequant_matmul": times["fnlm_dequant_matmul"] / times["fnlm_small_gemm"],
                "max_abs_err_vs_fp32": error,
            })  # fmt: skip
            print_table(rows[-1:])
        save(rows, args.out)


def gemv_sweep(rows, w, x, shape, batch, moved):
    """Time (rows per program, blocks of each row per step, warps, splits) around the default."""
    parts = (
        w.packed,
        w.absmax,
        w.code,
        w.nested_absmax,
        w.nested_code,
        w.offset,
        list(shape),
        64,
        256,
    )
    configs = [(32, 8, 4, 1), (32, 4, 4, 1), (64, 4, 4, 1), (64, 8, 4, 1), (32, 16, 4, 1)]
    configs += [(32, 8, 8, 1), (128, 2, 4, 1), (16, 8, 4, 1), (32, 8, 4, 2), (32, 4, 4, 2)]
    for config in configs:
        try:
            t = bench(lambda config=config: nf4_gemv_fwd(x, *parts, None, config=config))
        except Exception as error:  # e.g. out of registers / shared memory
            rows.append({"bench": "gemv_sweep", "config": list(config), "error": str(error)[:200]})
            continue
        rows.append(
            {
                "bench": "gemv_sweep",
                "shape": list(shape),
                "batch": batch,
                "config": list(config),
                "us": t * 1e6,
                "GBps": moved / t / 1e9,
            }
        )


def save(rows, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_quant.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


def print_table(rows):
    """Print the main rows, and the three best configurations of each sweep."""
    for row in rows:
        if row["bench"] == "dequantize":
            print(
                f"dequantize {row['shape']}: fnlm {row['fnlm_us']:.1f} us ({row['fnlm_GBps']:.0f} GB/s, "
                f"{row['fnlm_frac_copy']:.0%} of copy) | bnb {row['bnb_us']:.1f} us ({row['bnb_GBps']:.0f} GB/s) "
                f"| {row['speedup_vs_bnb']:.2f}x"
            )
        elif row["bench"] == "gemv":
            print(
                f"gemv {row['shape']} b={row['batch']}: fnlm {row['fnlm_gemv_us']:.1f} us "
                f"({row['fnlm_gemv_GBps']:.0f} GB/s, {row['fnlm_gemv_frac_peak']:.0%} of HBM) | bnb "
                f"{row['bnb_us']:.1f} us ({row['bnb_GBps']:.0f} GB/s, {row['speedup_vs_bnb']:.2f}x) | "
                f"dequant+matmul {row['fnlm_dequant_matmul_us']:.1f} us "
                f"({row['speedup_vs_dequant_matmul']:.2f}x) | err {row['max_abs_err_vs_fp32']:.2g} "
                f"| config {row['config']}",
                flush=True,
            )
        elif row["bench"] == "small_gemm":
            print(
                f"small gemm {row['shape']} b={row['batch']}: fnlm {row['fnlm_small_gemm_us']:.1f} "
                f"us ({row['fnlm_small_gemm_GBps']:.0f} GB/s, {row['fnlm_small_gemm_frac_hbm']:.0%} "
                f"of HBM, {row['fnlm_small_gemm_frac_flops']:.0%} of bf16 FLOP/s) | dequant+matmul "
                f"{row['fnlm_dequant_matmul_us']:.1f} us ({row['speedup_vs_dequant_matmul']:.2f}x) "
                f"| err {row['max_abs_err_vs_fp32']:.2g}",
                flush=True,
            )
    for kind, keys in (
        ("dequantize_sweep", ("shape",)),
        ("gemv_sweep", ("shape", "batch")),
    ):
        groups = {}
        for row in rows:
            if row["bench"] == kind and "us" in row:
                groups.setdefault(tuple(str(row[k]) for k in keys), []).append(row)
        for key, group in groups.items():
            best = sorted(group, key=lambda r: r["us"])[:3]
            print(
                kind,
                key,
                "best:",
                [{k: v for k, v in r.items() if k not in ("bench", *keys)} for r in best],
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other block shapes")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--gemv-only", action="store_true", help="skip the dequantize rows")
    parser.add_argument("--no-gemv", action="store_true", help="skip the GEMV rows")
    parser.add_argument(
        "--lora", action="store_true", help="also time a LoRA linear's matmul orders (training)"
    )
    parser.add_argument(
        "--small-gemm", action="store_true",
        help="also time the fused small-batch NF4 GEMM against dequantize + matmul (16-128 rows)",
    )  # fmt: skip
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_quant.py needs a CUDA device")
    torch.manual_seed(0)
    rows = []
    if not args.gemv_only:
        dequantize_rows(args, rows)
    if args.lora:
        lora_rows(args, rows)
    if not args.no_gemv:
        gemv_rows(args, rows)
    if args.small_gemm:
        small_gemm_rows(args, rows)
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    )
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_quant.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
