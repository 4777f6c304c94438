"""The NF4 decode GEMV's launch configurations: which variant runs and with which tile and
splits (rows per program, quantization blocks per step, warps, splits of the input), for
`fnlm.kernels.nf4_gemv` (the kernel and its launcher).

Three variants (FNLM_NF4_GEMV, read at each launch, or the launcher's `variant`):
- "fixup" (default): the input features are split until the SMs hold as many programs as fit
  at once (RESIDENT_PROGRAMS; the sweep's tiles ran one program, 4 warps, per SM on the 8B's
  shapes: one warp per scheduler cannot issue every cycle, hence "instruction-bound"), and the
  last program of each tile to finish sums the splits' fp32 partials in split order and writes
  the rounded result (deterministic; no second kernel, which cost more than a split gained);
- "sweep": the tiles of the 2026-12-03 H200 sweep, splits summed by torch after the kernel;
- "tuned": the "fixup" kernel with the tile and split timed on the device at the first launch of
  each shape (outside CUDA-graph capture; ~40 candidates, CUDA-graph timings), kept for the
  process (`tuned_configs`). Opt-in: the choice, and so the last bits of the sums, can differ
  between processes.
"""

import os

import torch
import triton

from fnlm.errors import ArgumentError

# Rows of x the GEMV kernel takes in one launch (it is meant for decode batches).
GEMV_MAX_BATCH = 8

GEMV_VARIANTS = ("fixup", "sweep", "tuned")  # see the module docstring; FNLM_NF4_GEMV picks one

# "fixup": programs of the sweep's tiles (4 warps) that fit on one SM at once, by their registers
# per thread (ptxas for sm_90 through Triton 3.9: 161 at one row of x, 180-254 at 2-8 rows; an
# SM has 65,536). The input is split until the programs fill the SMs that many times over.
RESIDENT_PROGRAMS = {1: 3}  # rows of x -> programs per SM; 2 for more rows


def gemv_variant(variant: str | None = None) -> str:
    """`variant`, or FNLM_NF4_GEMV (default "fixup"); ArgumentError for an unknown one."""
    chosen = variant or os.environ.get("FNLM_NF4_GEMV") or "fixup"
    if chosen not in GEMV_VARIANTS:
        where = "variant" if variant else "the environment variable FNLM_NF4_GEMV"
        raise ArgumentError(f"nf4_gemv: {where} is {chosen!r}; expected one of {GEMV_VARIANTS}")
    return chosen


def _gemv_config(
    n_out: int, n_in: int, batch: int, device: torch.device, blocksize: int = 64
) -> tuple[int, int, int, int]:
    """(rows per program, quantization blocks of each row per step, warps, splits of the input)."""
    row_blocks = n_in // blocksize
    if device.type != "cuda":  # the interpreter pays per program: few, large ones
        return 64, min(16, triton.next_power_of_2(row_blocks)), 4, 1
    # From the H200 sweep (scripts/bench_quant.py --sweep; us at batch 1 / 4 / 8): a warp's lanes
    # along rows, 256 quantization blocks per step; 64 rows x 4 blocks where that still gives a
    # program per SM (14336x4096: 23.4 / 51.5 / 83.7 vs 25.9 / 63.3 / 92.2 for 32 x 8), 128 x 2
    # at batch >= 4 on the largest (lm_head 128256x2048 b4: 155 vs 201 for 64 x 4), else 32 x 8
    # (4096x4096: 10.2 / 20.3 / 28.7). Splits of the input add two kernels (sum, cast): worth
    # it for long rows on few programs (4096x14336 b1: 28.1 split in 2 vs 29.8), not for 4096x4096
    # (12.2 vs 10.2), and where most SMs would idle.
    num_warps = 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if triton.cdiv(n_out, 128) >= sms and batch >= 4:
        block_n = 128
    elif triton.cdiv(n_out, 64) >= sms:
        block_n = 64
    else:
        block_n = 32
    block_blocks = min(256 // block_n, triton.next_power_of_2(row_blocks))
    programs = triton.cdiv(n_out, block_n)
    split_k = 1
    while split_k < 8 and programs * split_k < sms:
        per_split = row_blocks // (2 * split_k)
        if per_split >= 8 * block_blocks or (
            programs * split_k < sms // 4 and per_split >= 2 * block_blocks
        ):
            split_k *= 2
        else:
            break
    return block_n, block_blocks, num_warps, split_k


def _fixup_config(
    n_out: int, n_in: int, batch: int, device: torch.device, blocksize: int = 64
) -> tuple[int, int, int, int]:
    """The "fixup" variant's (rows per program, blocks per step, warps, splits): the sweep's
    tiles, the input split into as many parts as keep every program resident at once
    (RESIDENT_PROGRAMS per SM: one wave, no tail), each part a step of blocks or more. On the
    H200 at one row: 8B q/o 4096x4096 and down 4096x14336 in 3, k/v 1024x4096 in 8, gate/up
    14336x4096 and the lm_head whole."""
    block_n, block_blocks, num_warps, _ = _gemv_config(n_out, n_in, batch, device, blocksize)
    if device.type != "cuda":
        return block_n, block_blocks, num_warps, 1
    row_blocks = n_in // blocksize
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = triton.cdiv(n_out, block_n) * triton.cdiv(batch, GEMV_MAX_BATCH)
    resident = RESIDENT_PROGRAMS.get(min(batch, GEMV_MAX_BATCH), 2) * sms
    split_k = 1
    while programs * (split_k + 1) <= resident and row_blocks // (split_k + 1) >= block_blocks:
        split_k += 1
    return block_n, block_blocks, num_warps, split_k


# "tuned": (n_out, n_in, rows of x, dtype, double quantization, device) -> config
_TUNED: dict[tuple, tuple[int, int, int, int]] = {}


def tuned_configs() -> dict[tuple, tuple[int, int, int, int]]:
    """The "tuned" variant's choices so far: (n_out, n_in, rows of x (at most GEMV_MAX_BATCH),
    dtype, double quantization, device) -> (rows per program, blocks per step, warps, splits)."""
    return dict(_TUNED)


# "tuned" tiles (rows per program, blocks per step): the sweep's 256 blocks per step, and 128
# (half the registers: 80 per thread at one row, so twice the programs per SM)
TUNED_TILES = ((32, 8), (64, 4), (128, 2), (16, 8), (32, 4), (64, 2))
TUNED_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)


def _candidates(n_out: int, n_in: int, batch: int, device: torch.device, blocksize: int):
    """The "tuned" variant's configs: the "fixup" one first, then every tile of TUNED_TILES at
    every split of TUNED_SPLITS that leaves each part a step of blocks or more."""
    row_blocks = n_in // blocksize
    configs = [_fixup_config(n_out, n_in, batch, device, blocksize)]
    for block_n, block_blocks in TUNED_TILES:
        block_blocks = min(block_blocks, triton.next_power_of_2(row_blocks))
        for split_k in TUNED_SPLITS:
            config = (block_n, block_blocks, 4, split_k)
            if (split_k == 1 or row_blocks // split_k >= block_blocks) and config not in configs:
                configs.append(config)
    return configs


def _time_on_device(launch, calls: int = 10, replays: int = 3) -> float:
    """Milliseconds per `launch()` on the GPU alone: `calls` launches captured in a CUDA graph
    (the host's launch cost left out), replayed. Warmed up twice on a side stream first (compiles,
    lazy cuBLAS / library setup), as CUDA graph capture wants; scripts/bench_generate.py times
    its linears with it too."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launch()
        launch()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            launch()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (calls * replays)


def _tuned_choice(
    n_out: int, n_in: int, batch: int, dtype, nested: bool, device, blocksize: int, launch
) -> tuple[int, int, int, int]:
    """The "tuned" variant's config for one launch (`launch(config)`): the one kept for its shape,
    else the fastest of `_candidates`, built only then (not on every launch of a kept shape)."""
    key = (n_out, n_in, min(batch, GEMV_MAX_BATCH), dtype, nested, device)
    if key in _TUNED:
        return _TUNED[key]
    return _tuned_config(key, launch, _candidates(n_out, n_in, batch, device, blocksize))


def _tuned_config(key: tuple, launch, candidates) -> tuple[int, int, int, int]:
    """The fastest of `candidates` for `key`, timed once (`launch(config)`); while a CUDA graph
    is being captured (no timing possible) an untimed shape gets the first candidate, unkept."""
    if key in _TUNED:
        return _TUNED[key]
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]
    times = {config: _time_on_device(lambda c=config: launch(c)) for config in candidates}
    _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]
