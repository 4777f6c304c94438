"""Training speed and memory: fnlm QLoRA vs transformers + peft + bitsandbytes, same GPU, same process.

    python scripts/bench_train.py --model llama-3.2-1b --model llama-3.1-8b [--trainer] [--longest] [--out $OUT]

For each model: a random-init checkpoint of the real config (scripts/bench_configs.py's
REAL_CONFIGS: Llama 3.x, Qwen3, Gemma 2, Qwen3.5-9B, Gemma 4 E4B, gpt-oss-20B), LoRA r=16,
alpha=16 on the same modules on both sides (bench_configs.lora_targets: q, k, v, o, gate, up, down;
Qwen3.5 adds the DeltaNet projections; gpt-oss adapts attention and the expert stacks, peft
through target_parameters; the LoRA parameter counts of the two sides are compared and a
difference noted), random token batches of batch x seq (default 2 x 2048) whose labels are the
tokens, fused AdamW, median of --steps steps after --warmup steps. Notes say what differs from
that (gpt-oss: transformers' eager attention, bitsandbytes leaving the expert stacks 16-bit;
--fnlm-experts bf16 keeps fnlm's 16-bit too; --deltanet-scan triton / torch runs Qwen3.5's
scan as the fused Triton kernels or torch's loop instead of the split scan's loops). --tiny: the
same code path on a CPU (shrunk configs, fnlm NF4, the reference without bitsandbytes).
- fnlm: fnlm.load(quant="nf4", bf16), fnlm.lora.init, fnlm.train.train_step with
  fnlm.train.layer_function (per-layer activation checkpointing, torch.compile of the layer).
- reference: transformers from_pretrained with BitsAndBytesConfig (NF4, double quant, bf16
  compute), SDPA attention, peft get_peft_model, gradient checkpointing (non-reentrant),
  model(input_ids, labels).loss.
--trainer also times `fnlm.train.train` as a user runs it: a packed synthetic dataset (random
token documents of 400-2,000 tokens, as text of 300-1,500 words tokenizes), batch x seq packed
rows, tokens per wall second over the steps after the warm-up (data, logging and the optimizer
included), and its ratio to the step benchmark above; --packing-strategy wrapped fills every row
(TrainConfig.packing_strategy) where the default packs whole documents.
Reported: tokens/s, peak GiB (torch.cuda.max_memory_allocated over the warm-up and timed steps,
weights included; the warm-up holds the CUDA graphs' capture, whose allocations are the step's),
MFU = 4 N T / (time x 790e12) (GPU.md; N = the parameters a token's matmuls read: k / E of an
expert stack, no per-layer embedding table), fnlm / reference ratios, and the GPU-busy fraction
of two profiled steps (kernel time, overlaps merged, over the span from the first kernel to the
last). --longest: the longest sequence (batch 1) one training step fits in --cap-gib of memory
(torch.cuda.set_per_process_memory_fraction) for fnlm (activation offload to CPU, MLP tiled) and
the reference. Prints a table and writes bench_train.json (to --out, default $OUT or .).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench_common import (  # noqa: E402
    compute_dtype,
    count,
    peak_gib,
    peft_model,
    reference_model,
    reset_peak,
    sync,
    sync_time,
)
from bench_configs import (  # noqa: E402
    REAL_CONFIGS,
    active_parameters,
    clear,
    lora_targets,
    parameter_count,
    vocab_size,
    write_checkpoint,
)

PEAK_FLOPS = 790e12  # bf16 matmul 8192^3 measured on the H200 (GPU.md)
fnlm_targets_default = lora_targets("llama-3.2-1b").fnlm

# --longest tries the goal (12x the reference's 4,096), then the stretch goal if it fits, else
# shorter lengths until one fits; the reference goes up from 4,096 until one fails.
GOAL, STRETCH, FALLBACKS = 49152, 65536, (32768, 16384, 8192)
REFERENCE_LENGTHS = (4096, 6144, 8192)


def batch_of(
    vocab: int, batch: int, seq: int, seed: int = 0, docs: int = 0, device: str = "cuda"
) -> dict:
    """Random tokens [batch, seq]; docs > 0: each row packed with that many equal documents
    (positions restart, segments 1..docs), as fnlm.batches packs them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    out = {"tokens": tokens, "labels": tokens.clone()}
    if docs:
        doc = torch.arange(seq, device=device) * docs // seq  # document index of each slot
        start = (doc * seq + docs - 1) // docs  # first slot of each slot's document
        out["positions"] = (torch.arange(seq, device=device) - start).expand(batch, seq)
        out["segments"] = (doc + 1).expand(batch, seq)
    return out


def timed_steps(step, steps: int, warmup: int, device: str = "cuda") -> list[float]:
    """Seconds of each timed step. The peak memory counts the warm-up too: a CUDA graph's tensors
    are allocated when it is captured (in the warm-up), its replays allocate nothing."""
    sync(device)
    reset_peak(device)
    for _ in range(warmup):
        step()
    return [sync_time(step, device) for _ in range(steps)]


class FnlmRun:
    """fnlm QLoRA: params, adapters on `targets` (fnlm names; default q, k, v, o, gate, up, down),
    optimizer and a step function for one batch. skip: names fnlm.load keeps 16-bit."""

    def __init__(
        self,
        directory: Path,
        *,
        checkpointing: str,
        compile: bool,
        mlp_chunk: int = 0,
        graphs: bool = False,
        targets: tuple[str, ...] = fnlm_targets_default,
        device: str = "cuda",
        skip: tuple[str, ...] = (),
    ):
        import fnlm
        from fnlm import train as train_lib

        self.params, _ = fnlm.load(
            directory, quant="nf4", dtype=compute_dtype(device), device=device, skip=skip
        )
        self.lora = fnlm.lora.init(self.params, r=16, alpha=16, targets=targets)
        named = [(str(i), t) for i, t in enumerate(fnlm.lora.parameters(self.lora))]
        self.tensors = [t for _, t in named]
        self.optimizer = train_lib.build_optimizer(named, lr=1e-5)
        self.scheduler = train_lib.build_scheduler(
            self.optimizer, schedule="constant", total_steps=1
        )
        self.layer_fn = train_lib.layer_function(
            checkpointing, compile=compile, mlp_chunk=mlp_chunk, preserve_rng=False
        )
        self.lora_train = fnlm.lora.train_mode(self.lora)
        self.graphs = None
        if graphs:
            vocab = self.params.config.vocab_size
            self.graphs = train_lib.StepGraphs(self.tensors, vocab_size=vocab)

    def step(self, batch: dict) -> float:
        import fnlm
        from fnlm import train as train_lib

        loss_fn = lambda b: fnlm.loss(
            self.params, b, lora=self.lora_train, reduction="sum", layer_fn=self.layer_fn
        )
        result = train_lib.train_step(
            loss_fn, [batch], self.optimizer, self.scheduler, self.tensors, max_grad_norm=1.0,
            graphs=self.graphs,
        )  # fmt: skip
        return result["loss"]


class ReferenceRun:
    """transformers + peft + bitsandbytes QLoRA with non-reentrant gradient checkpointing (on a
    CPU: no bitsandbytes, see bench_common.reference_model; `notes` gathers what was done)."""

    def __init__(self, directory: Path, targets=None, device: str = "cuda", notes=None):
        notes = [] if notes is None else notes
        model = reference_model(directory, device, nf4=True, notes=notes)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        targets = targets or lora_targets("llama-3.2-1b")
        self.model = peft_model(model, targets).train()
        self.tensors = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.tensors, lr=1e-5, fused=device == "cuda")

    def step(self, batch: dict) -> float:
        loss = self.model(input_ids=batch["tokens"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.tensors, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def throughput(run, vocab: int, args, n_params: int) -> dict:
    batch = batch_of(vocab, args.batch, args.seq, device=args.device)
    losses = []
    times = timed_steps(
        lambda: losses.append(run.step(batch)), args.steps, args.warmup, args.device
    )
    seconds = statistics.median(times)
    tokens = args.batch * args.seq
    return {
        "tokens_per_s": tokens / seconds,
        "step_s": seconds,
        "lora_parameters": count(run.tensors),
        "peak_gib": peak_gib(args.device),
        "mfu": 4 * n_params * tokens / (seconds * PEAK_FLOPS),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def profile(run, vocab: int, args, title: str) -> None:
    """The 25 CUDA kernels with the most self time over two steps, after the timed ones."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batch = batch_of(vocab, args.batch, args.seq)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            run.step(batch)
        torch.cuda.synchronize()
    print(f"\n{title}: two steps")
    print(
        prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70
        )
    )


def gpu_busy(run, vocab: int, args) -> float:
    """Fraction of two steps' GPU timeline with a kernel running (overlapping kernels merged),
    from the first kernel's start to the last one's end; the host gaps between steps count."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batch = batch_of(vocab, args.batch, args.seq)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            run.step(batch)
        torch.cuda.synchronize()
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    if not spans:
        return float("nan")
    busy, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy, start = busy + end - start, s
        end = max(end, e)
    busy += end - start
    return busy / (spans[-1][1] - spans[0][0]) if len(spans) > 1 else 1.0


def synthetic_documents(vocab: int, count: int, seed: int = 0):
    """Token documents of 400-2,000 tokens (what text of 300-1,500 words becomes), every token
    learned: the packed dataset the trainer benchmark runs on."""
    from fnlm import data as data_lib

    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        n = int(torch.randint(400, 2001, (1,), generator=g))
        tokens = torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32)
        examples.append(data_lib.Example(tokens=tokens, labels=tokens.clone()))
    return data_lib.TokenizedData(examples, "synthetic", {"examples": count})


def trainer(name: str, directory: Path, args, n_params: int) -> dict:
    """`fnlm.train.train` end to end on packed synthetic documents: tokens per wall second
    between the end of the warm-up and the end of the last step (callback timestamps)."""
    import tempfile

    import fnlm
    from fnlm import train as train_lib

    vocab = REAL_CONFIGS[name]["vocab_size"]
    steps = args.warmup + args.trainer_steps
    # ~1,200 tokens a document, at least 600 documents (as the file): packed into batch x seq rows
    data = synthetic_documents(vocab, max(600, int(steps * args.batch * args.seq / 1200 * 1.3)))
    params, _ = fnlm.load(directory, quant="nf4", dtype=torch.bfloat16, device="cuda")
    marks: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as out:
        config = train_lib.TrainConfig(
            mode="qlora", out=out, batch_size=args.batch, grad_accum=1,
            max_seq_length=args.seq, max_steps=steps, checkpointing=args.checkpointing,
            lr=1e-5, progress=False, save_total_limit=1, targets=lora_targets(name).fnlm,
            packing_strategy=args.packing_strategy,
        )  # fmt: skip
        peaks: list[float] = []

        def callback(entry):
            marks.append((time.perf_counter(), entry["tokens"]))
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)  # whole run: graphs' capture

        train_lib.train(config, params=params, data=data, callback=callback)
    timed = marks[args.warmup :]
    seconds = timed[-1][0] - marks[args.warmup - 1][0]
    tokens = sum(n for _, n in timed)
    return {
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / len(timed),
        "real_tokens_per_step": tokens / len(timed),
        # every position of the packed rows, padding included: the bare step's tokens
        "row_tokens_per_s": args.batch * args.seq * len(timed) / seconds,
        "peak_gib": peaks[-1],
        "mfu": 4 * n_params * tokens / (seconds * PEAK_FLOPS),
    }


def try_lengths(run, vocab: int, lengths, docs: int = 0) -> dict:
    """Whether one training step at batch 1 x seq fits, for each length (one loaded run); docs:
    the row packed with that many documents."""
    out = {}
    for seq in lengths:
        try:
            batch = batch_of(vocab, 1, seq, docs=docs)
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            run.step(batch)
            torch.cuda.synchronize()
            out[seq] = {"fits": True, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                        "tokens_per_s": seq / (time.perf_counter() - start)}  # fmt: skip
        except torch.OutOfMemoryError as e:
            out[seq] = {"fits": False, "error": str(e).split("\n")[0][:200]}
        finally:
            run.optimizer.zero_grad(set_to_none=True)
            clear()
        print(f"  {seq}: {out[seq]}", flush=True)
    return out


def longest(name: str, directory: Path, args) -> dict:
    vocab = REAL_CONFIGS[name]["vocab_size"]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total)
    out: dict = {"cap_gib": args.cap_gib, "fnlm": {}, "reference": {}}
    try:
        run = FnlmRun(
            directory, checkpointing="offload", compile=args.compile, mlp_chunk=args.mlp_chunk,
            targets=lora_targets(name).fnlm,
        )  # fmt: skip
        print(
            f"fnlm loaded under the cap: {torch.cuda.memory_allocated() / 2**30:.2f} GiB",
            flush=True,
        )
        docs = args.packed_docs
        out["fnlm"] = try_lengths(run, vocab, [GOAL], docs)
        if out["fnlm"][GOAL]["fits"]:
            out["fnlm"].update(try_lengths(run, vocab, [STRETCH], docs))
        else:
            for seq in FALLBACKS:
                out["fnlm"].update(try_lengths(run, vocab, [seq], docs))
                if out["fnlm"][seq]["fits"]:
                    break
        del run
        clear()
        if not args.skip_reference:
            run = ReferenceRun(directory, lora_targets(name))
            for seq in REFERENCE_LENGTHS:
                out["reference"].update(try_lengths(run, vocab, [seq]))
                if not out["reference"][seq]["fits"]:
                    break
            del run
    finally:
        clear()
        torch.cuda.set_per_process_memory_fraction(1.0)
    best = lambda d: max((s for s, e in d.items() if e["fits"]), default=None)
    out["fnlm_longest"], out["reference_longest"] = best(out["fnlm"]), best(out["reference"])
    return out


def launch_of(parser, text: str) -> tuple[int, int]:
    """--deltanet-launch "16x8" -> (16, 8): value columns (16, 32 or 64) and warps (1-16)."""
    try:
        bv, warps = (int(x) for x in text.lower().split("x"))
    except ValueError:
        parser.error(f"--deltanet-launch takes BVxWARPS such as 16x8, got {text!r}")
    if bv not in (16, 32, 64) or warps not in (1, 2, 4, 8, 16):
        parser.error(f"--deltanet-launch: BV must be 16, 32 or 64 and WARPS 1-16 (a power of 2), "
                     f"got {text!r}")  # fmt: skip
    return bv, warps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(REAL_CONFIGS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", default="layer", choices=["none", "layer", "offload"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
        help="replay forward + backward as CUDA graphs (what fnlm.train.train does on CUDA)",
    )  # fmt: skip
    parser.add_argument("--mlp-chunk", type=int, default=8192, help="MLP tile for --longest")
    parser.add_argument("--longest", action="store_true", help="only the longest-sequence search")
    parser.add_argument("--longest-model", default="llama-3.1-8b", choices=sorted(REAL_CONFIGS))
    parser.add_argument("--cap-gib", type=float, default=16.0)
    parser.add_argument(
        "--packed-docs", type=int, default=0,
        help="--longest: fnlm's row packed with this many equal documents (0: one document)",
    )  # fmt: skip
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--trainer", action="store_true", help="also time fnlm.train.train on packed documents"
    )
    parser.add_argument("--trainer-steps", type=int, default=12)
    parser.add_argument(
        "--packing-strategy", default="bfd", choices=("bfd", "wrapped"),
        help="--trainer: how the documents are packed into rows (TrainConfig.packing_strategy)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true", help="print the top CUDA kernels of two timed steps"
    )
    parser.add_argument(
        "--checkpoints", default=".cache/bench", help="where the random checkpoints go"
    )
    parser.add_argument(
        "--deltanet-scan", choices=["triton", "split", "torch"],
        help="fnlm's gated delta-rule scan on CUDA (Qwen3.5): the split scan's Triton loops "
        "(default, or FNLM_DELTANET_SCAN), the fused Triton kernels, or torch's loop",
    )  # fmt: skip
    parser.add_argument(
        "--deltanet-launch", metavar="BVxWARPS",
        help="the fused Triton scan's launch past 64-wide keys, e.g. 32x4 (default 16x8)",
    )  # fmt: skip
    parser.add_argument(
        "--deltanet-precision", choices=["ieee", "tf32x3", "tf32"],
        help="the Triton scans' dot precision (default ieee: full fp32)",
    )  # fmt: skip
    parser.add_argument(
        "--fnlm-experts", default="nf4", choices=["nf4", "bf16"],
        help="fnlm's MoE expert stacks: NF4, or 16-bit as bitsandbytes leaves the reference's",
    )  # fmt: skip
    parser.add_argument(
        "--tiny", action="store_true",
        help="CPU check: each model shrunk (bench_configs.TINY_SIZES), 1 x 64 tokens, 1 + 2 steps, "
        "no compile, no CUDA graphs; the reference without bitsandbytes",
    )  # fmt: skip
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    args.device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        if args.trainer or args.longest or args.profile:
            parser.error(
                "--tiny times the step benchmark only (no --trainer, --longest, --profile)"
            )
        args.batch, args.seq = min(args.batch, 1), min(args.seq, 64)
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.compile = args.cuda_graphs = False

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (--tiny)"
    results: dict = {"device": device_name, "args": vars(args), "models": {}}
    from fnlm.kernels import deltanet, deltanet_split

    if args.deltanet_scan:
        deltanet.SCAN_BACKEND = args.deltanet_scan
    if args.deltanet_precision:
        deltanet.SCAN_PRECISION = deltanet_split.SPLIT_PRECISION = args.deltanet_precision
    if args.deltanet_launch:
        deltanet.SCAN_WIDE_BV, deltanet.SCAN_WARPS = launch_of(parser, args.deltanet_launch)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "bench_train.json"
    save = lambda: out.write_text(json.dumps(results, indent=2, default=str))
    models = [] if args.longest else (args.model or ["llama-3.2-1b", "llama-3.1-8b"])
    for name in models:
        directory = Path(args.checkpoints) / (f"{name}-tiny" if args.tiny else name)
        started = time.perf_counter()
        write_checkpoint(name, directory, args.device, args.tiny)
        print(f"{name}: checkpoint ready in {time.perf_counter() - started:.0f} s", flush=True)
        n_params, vocab = parameter_count(name, args.tiny), vocab_size(name, args.tiny)
        active = active_parameters(name, args.tiny)
        targets, notes = lora_targets(name), []
        skip = ("experts.gate_up", "experts.down") if args.fnlm_experts == "bf16" else ()
        if skip and REAL_CONFIGS[name]["model_type"] == "gpt_oss":
            notes.append("fnlm: expert stacks kept 16-bit (--fnlm-experts bf16)")
        print(f"{name}: LoRA r=16 on {targets.note}: fnlm {list(targets.fnlm)}; peft "
              f"target_modules {list(targets.peft_modules)}, target_parameters "
              f"{list(targets.peft_parameters)}", flush=True)  # fmt: skip
        entry = results["models"][name] = {"params": n_params, "active_params": active}
        entry["notes"] = notes
        fnlm_run = functools.partial(
            FnlmRun, directory, checkpointing=args.checkpointing, compile=args.compile,
            graphs=args.cuda_graphs, targets=targets.fnlm, device=args.device, skip=skip,
        )  # fmt: skip
        for who, make in (
            ("fnlm", fnlm_run),
            ("reference", functools.partial(ReferenceRun, directory, targets, args.device, notes)),
        ):
            if who == "reference" and args.skip_reference:
                continue
            run = None
            try:
                started = time.perf_counter()
                run = make()
                entry[who] = throughput(run, vocab, args, active)
                entry[who]["wall_s"] = time.perf_counter() - started
                if args.device == "cuda":
                    entry[who]["gpu_busy"] = gpu_busy(run, vocab, args)
                if args.profile:
                    profile(run, vocab, args, f"{name} {who}")
            except Exception as e:  # keep the other figures when one side fails
                entry[who] = {"error": f"{type(e).__name__}: {e}"[:500]}
                traceback.print_exc()
                if who == "fnlm" and args.compile:  # measure eager rather than nothing
                    run = None
                    clear()
                    try:
                        run = fnlm_run(compile=False, graphs=False)
                        entry[who] = dict(
                            throughput(run, vocab, args, active),
                            compile_error=entry[who]["error"],
                        )
                    except Exception as e2:
                        entry[who]["eager_error"] = f"{type(e2).__name__}: {e2}"[:500]
            finally:
                del run
                clear()
            print(f"  {who}: {entry[who]}", flush=True)
            save()
        if args.trainer:
            try:
                entry["trainer"] = trainer(name, directory, args, active)
            except Exception as e:
                entry["trainer"] = {"error": f"{type(e).__name__}: {e}"[:500]}
                traceback.print_exc()
            finally:
                clear()
            print(f"  trainer: {entry['trainer']}", flush=True)
        if "tokens_per_s" in entry.get("fnlm", {}) and "tokens_per_s" in entry.get("reference", {}):
            entry["speedup"] = entry["fnlm"]["tokens_per_s"] / entry["reference"]["tokens_per_s"]
            entry["memory_ratio"] = entry["fnlm"]["peak_gib"] / entry["reference"]["peak_gib"]
            ours, theirs = entry["fnlm"]["lora_parameters"], entry["reference"]["lora_parameters"]
            if ours != theirs:  # the targets of the two sides are meant to be the same modules
                notes.append(f"LoRA parameters differ: fnlm {ours:,}, reference {theirs:,}")
        for note in notes:
            print(f"  note: {note}", flush=True)
        save()
    if args.longest:
        name = args.longest_model
        directory = Path(args.checkpoints) / name
        write_checkpoint(name, directory)
        results["longest"] = longest(name, directory, args)
        save()

    print(f"\n{'model':14} {'who':10} {'tokens/s':>10} {'peak GiB':>9} {'MFU':>6} {'GPU busy':>9}")
    for name, entry in results["models"].items():
        for who in ("fnlm", "reference", "trainer"):
            e = entry.get(who, {})
            if "tokens_per_s" in e:
                busy = f"{e['gpu_busy']:9.1%}" if "gpu_busy" in e else f"{'':9}"
                print(
                    f"{name:14} {who:10} {e['tokens_per_s']:10,.0f} {e['peak_gib']:9.2f} {e['mfu']:6.1%} {busy}"
                )
            elif e:
                print(f"{name:14} {who:10} failed: {e['error'][:80]}")
        if "speedup" in entry:
            print(f"{name:14} {'ratio':10} {entry['speedup']:9.2f}x {entry['memory_ratio']:8.2f}x")
        for note in entry["notes"]:
            print(f"{name:14} note: {note}")
        if "tokens_per_s" in entry.get("trainer", {}) and "tokens_per_s" in entry.get("fnlm", {}):
            trained, step = entry["trainer"], entry["fnlm"]["tokens_per_s"]
            full = trained["real_tokens_per_step"] / (args.batch * args.seq)
            print(f"{name:14} {'trainer/step':12} {trained['tokens_per_s'] / step:7.2f}x real tokens"
                  f", {trained['row_tokens_per_s'] / step:.2f}x row tokens (rows {full:.1%} full)")  # fmt: skip
    if "longest" in results:
        r = results["longest"]
        print(
            f"\nlongest sequence, batch 1, {r['cap_gib']} GiB cap: fnlm {r['fnlm_longest']}, reference {r['reference_longest']}"
        )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
