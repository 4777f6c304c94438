"""Registers, local-memory stack and shared memory of the gated delta-rule scans on sm_90, from
cubins cross-compiled here (no GPU needed: Triton compiles for a named target, and the cuobjdump
bundled with Triton reads the cubin's resource usage).

    python scripts/deltanet_resources.py                                   # Qwen3.5's tiles
    python scripts/deltanet_resources.py --precision ieee --warps 4,8 --bv 16,32

A per-thread STACK of kilobytes means the kernel keeps tiles in local memory (spills): every
chunk of the scan then round-trips them through the memory hierarchy. Tiles: a chunk of --chunk
tokens, keys padded to --dk's power of two (BK), value blocks of --bv (BV), dots at --precision
(fnlm.kernels.deltanet.SCAN_PRECISION is what fnlm runs).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

from fnlm.kernels import deltanet, deltanet_split

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# the fused scans (SCAN_BACKEND "triton") and the split scan's loops ("split")
POINTERS = {
    "forward": "U W QD KD A GAMMA S0 OUT STATES S_FINAL",
    "backward": "U W QD KD A GAMMA STATES D_O D_S_FINAL D_U D_W D_QD D_KD D_A D_GAMMA D_S0",
    "split-forward": "U W KD GAMMA S0 V_NEW STATES S_FINAL",
    "split-backward": "W KD GAMMA D_V_NEW D_STATES D_S_FINAL DVN G_NEXT D_S0",
}
SCALARS = {
    "forward": ("n_chunks", "dk", "dv"),
    "backward": ("n_bh", "n_chunks", "dk", "dv"),
    "split-forward": ("n_chunks", "dk", "dv"),
    "split-backward": ("n_chunks", "dk", "dv"),
}
KERNELS = {
    "forward": deltanet._scan_fwd_kernel,
    "backward": deltanet._scan_bwd_kernel,
    "split-forward": deltanet_split._state_fwd_kernel,
    "split-backward": deltanet_split._state_bwd_kernel,
}


def usage(which: str, constants: dict, warps: int, arch: int) -> tuple[str, int]:
    """(cuobjdump's resource line, Triton's shared-memory bytes) of one scan kernel."""
    signature = {name: "*fp32" for name in POINTERS[which].split()}
    signature.update({name: "i32" for name in SCALARS[which]})
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=KERNELS[which], signature=signature, constexprs=constants)
    options = {"num_warps": warps, "num_stages": deltanet.SCAN_STAGES}
    kernel = triton_compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "scan.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        dump = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    line = next(line.strip() for line in dump.splitlines() if "REG:" in line)
    return " ".join(line.split()[:3]), kernel.metadata.shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="ieee,tf32x3,tf32")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--bv", default="32", help="value block widths")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--dk", type=int, default=128, help="key head dim (Qwen3.5: 128)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10")
    args = parser.parse_args()
    if not os.path.isfile(CUOBJDUMP):
        parser.error(
            f"needs the cuobjdump that Triton's NVIDIA backend ships, not found at {CUOBJDUMP}"
        )
    bk = max(16, triton.next_power_of_2(args.dk))
    print(f"sm_{args.arch}, triton {triton.__version__}, chunk {args.chunk}, BK {bk}; fnlm runs "
          f"the {deltanet.SCAN_BACKEND!r} scan; the split one at BV {deltanet_split.SPLIT_BV}, "
          f"{deltanet_split.SPLIT_WARPS} warps")  # fmt: skip
    for precision in args.precision.split(","):
        for bv in map(int, args.bv.split(",")):
            for warps in map(int, args.warps.split(",")):
                constants = {"C": args.chunk, "BK": bk, "BV": bv, "P": precision}
                for which in KERNELS:
                    resources, shared = usage(which, constants, warps, args.arch)
                    print(f"{which:14} {precision:6} BV={bv:<3} warps={warps:<2} {resources}  "
                          f"shared {shared:,} B", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
