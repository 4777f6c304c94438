"""What scripts/bench_train.py and scripts/bench_generate.py share: the device they run on (CUDA,
or the CPU for --tiny), and the reference model (transformers, bitsandbytes NF4, peft LoRA).

On a CPU the reference runs without bitsandbytes (its NF4 path is the GPU's): `reference_model`
loads it 32-bit and says so in the notes it returns, which the scripts print and record.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from bench_configs import LoraTargets


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sync_time(fn, device: str) -> float:
    """Seconds of one call of fn, the device's queue drained on both sides."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    """Peak device memory since the last reset, GiB (nan on a CPU: not measured there)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def compute_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def reference_model(directory: Path, device: str, *, nf4: bool, notes: list[str]):
    """transformers from_pretrained on `device`, SDPA attention (eager where transformers has no
    SDPA path, noted); nf4: bitsandbytes NF4 (double
    quant, bf16 compute) on CUDA, 32-bit on a CPU (a line in `notes` says so). bitsandbytes
    quantizes nn.Linear modules only: 3-D expert stacks (gpt-oss) stay 16-bit (noted)."""
    import transformers

    kwargs = {"dtype": compute_dtype(device), "attn_implementation": "sdpa"}
    kwargs["device_map"] = {"": 0} if device == "cuda" else "cpu"
    if nf4 and device == "cuda":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
    elif nf4:
        notes.append("reference on CPU: bitsandbytes NF4 skipped, the reference runs 32-bit")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except ValueError as e:  # gpt-oss: transformers has no SDPA path for its attention sinks
        if "scaled_dot_product_attention" not in str(e):
            raise
        notes.append("reference: eager attention (transformers has no SDPA path for this model)")
        kwargs["attn_implementation"] = "eager"
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if nf4 and device == "cuda":
        unquantized = sum(
            p.numel() * p.element_size()
            for name, p in model.named_parameters()
            if ".experts." in name and p.dim() == 3
        )
        if unquantized:
            notes.append(
                f"reference: bitsandbytes leaves the 3-D expert stacks 16-bit "
                f"({unquantized / 2**30:.1f} GiB; it quantizes nn.Linear only)"
            )
    return model


def peft_model(model, targets: LoraTargets, r: int = 16, alpha: int = 16):
    """peft get_peft_model with LoRA r/alpha on `targets`' modules and parameters (experts)."""
    import peft

    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets.peft_modules),
        target_parameters=list(targets.peft_parameters) or None, task_type="CAUSAL_LM",
    )  # fmt: skip
    return peft.get_peft_model(model, config)


def count(tensors) -> int:
    return sum(t.numel() for t in tensors)
