"""What a run is told (`TrainConfig`), the choices it accepts, and what it returns (`TrainResult`)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fnlm.batches import PACKING_STRATEGIES
from fnlm.data.tokenize import BAD_ROW_POLICIES
from fnlm.errors import ArgumentError, FnlmError
from fnlm.params import Params
from fnlm.train.aliases import (  # noqa: F401  (re-exported: cli and optim read them here)
    ALIASES,
    OPTIMIZER_ALIASES,
    SCHEDULE_ALIASES,
    translate_alias,
)

MODES = ("qlora", "lora", "full")
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "paged_adamw32bit")
CHECKPOINTING = ("auto", "none", "layer", "offload")
METHODS = ("sft", "dpo", "orpo", "grpo")  # fnlm.train.methods
DISTRIBUTED = ("ddp", "fsdp")  # fnlm.train.distributed, fnlm.train.fsdp
TRACKERS = ("tensorboard", "wandb", "mlflow")  # report_to also takes "none" and "all"
# The run directory, in transformers Trainer's shape: checkpoint-N/ (each loadable by peft), the
# options in train_config.json (config.json is the model's: a full fine-tune ends with the model
# there), the final adapter or model files at the top. Runs of earlier fnlm versions
# (checkpoints/step-NNNNNNNN/, config.json) are still read and resumed.
CHECKPOINT_PREFIX = "checkpoint-"
RUN_CONFIG = "train_config.json"
LEGACY_CHECKPOINT_PREFIX = "step-"
LEGACY_CHECKPOINT_DIR = "checkpoints"
LEGACY_RUN_CONFIG = "config.json"
TMP_PREFIX = ".tmp-"


def option(default, help: str, *, choices: tuple | None = None):
    """A TrainConfig field with its `--help` text (and allowed values) as metadata."""
    return field(default=default, metadata={"help": help, "choices": choices})


class NonFiniteLossError(FnlmError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything a run needs; `fnlm train` fills it from flags or a TOML / YAML file, whose
    `--help` shows each field's `help` metadata. transformers / TRL / peft spellings of the
    options are accepted by `from_dict` (see ALIASES)."""

    # what to train on
    model: str | None = option(
        None, "hub id, local checkpoint directory or .gguf file; unset: the embedded "
        "SmolLM2-135M-Instruct (offline)",
    )  # fmt: skip
    data: str | None = option(
        None, "training data: a JSONL / JSON / Parquet file, a directory of them, or a `datasets` "
        "name; rows in chat (messages), ShareGPT (conversations), Alpaca or text format",
    )  # fmt: skip
    out: str = option(
        "runs/fnlm", "the run directory: checkpoints, metrics, final adapter or model"
    )
    eval_data: str | None = option(None, "held-out data, as `data`; else eval_fraction of `data`")
    eval_fraction: float = option(0.0, "fraction of `data` held out for the eval loss, in [0, 1)")
    # model and adapters
    mode: str = option(
        "qlora", "qlora: LoRA over an NF4 base; lora: LoRA over a 16-bit base; full: every weight "
        "trained", choices=MODES,
    )  # fmt: skip
    dtype: str | None = option(
        None, "compute dtype (bfloat16, float16, float32); unset: bf16 on GPUs that have it, fp16 "
        "on older GPUs, fp32 on CPU",
    )  # fmt: skip
    device: str | None = option(None, "cuda, cuda:1, cpu ...; unset: cuda when available")
    fp32_master_weights: bool = option(
        False, "full mode on a 16-bit model: the optimizer updates fp32 copies of the weights"
    )
    distributed: str = option(
        "ddp", "under torchrun: ddp (each process holds the whole model; the trained tensors' "
        "gradients are all-reduced) or fsdp (sharded over the processes with FSDP2, one group "
        "per layer, also on one process: mode full its weights, gradients and optimizer state; "
        "mode lora its frozen 16-bit base, the adapters replicated)",
        choices=DISTRIBUTED,
    )  # fmt: skip
    fsdp_cpu_offload: bool = option(
        False, "distributed fsdp: keep the weight shards, gradients and optimizer state in host "
        "memory (FSDP2's CPUOffloadPolicy)",
    )  # fmt: skip
    r: int = option(16, "LoRA rank")
    alpha: float = option(
        16, "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rslora)"
    )
    lora_dropout: float = option(0.0, "dropout on the LoRA input, in [0, 1)")
    targets: tuple[str, ...] | str = option(
        ("q", "k", "v", "o", "gate", "up", "down"),
        "modules given adapters: fnlm names (q k v o gate up down), transformers names (q_proj ...), "
        "'all-linear', or one regex",
    )  # fmt: skip
    modules_to_save: tuple[str, ...] = option(
        (), "modules trained in full beside the adapters, e.g. embed lm_head"
    )
    rslora: bool = option(False, "rank-stabilized LoRA: scale by alpha / sqrt(r)")
    # data
    max_seq_length: int = option(
        2048, "tokens per row; longer chat examples are truncated (long text: text_blocks)"
    )
    packing: bool = option(True, "pack several examples into each row (attention kept within each)")
    packing_strategy: str = option(
        "bfd", "bfd: whole examples, best fit decreasing (TRL's bfd); wrapped: every row filled, "
        "an example cut at a row's end goes on in the next row as a piece of its own (no padding "
        "but the last row's; attention stays inside each piece, no target lost)",
        choices=PACKING_STRATEGIES,
    )  # fmt: skip
    train_on_responses_only: bool = option(
        True, "chat data: the loss counts only the assistant's tokens"
    )
    truncation: bool = option(True, "cut examples longer than max_seq_length (else an error)")
    pad_to_multiple: int = option(8, "pad each batch's length to a multiple of this")
    text_blocks: bool = option(
        True, "text rows longer than max_seq_length are split into blocks of max_seq_length "
        "tokens, each starting with the previous block's last token (no token lost as a "
        "target); off: cut as chats are",
    )  # fmt: skip
    data_split: str = option(
        "train", "the split of a `datasets` source (hub or saved), e.g. train_sft"
    )
    data_subset: str | None = option(None, "the configuration (subset) of a hub dataset")
    eval_split: str | None = option(
        None, "held-out data: this split of `data` (a `datasets` source), e.g. test_sft"
    )
    columns: tuple[str, ...] = option(
        (), "the data's own column names for fnlm's row keys, as KEY=COLUMN: text=body "
        "messages=dialog (keys: messages conversations instruction input output system prompt "
        "completion text)",
    )  # fmt: skip
    streaming: bool = option(
        False, "read the data as it arrives (a hub dataset is not downloaded whole); tokenized "
        "in this process and not cached",
    )  # fmt: skip
    num_proc: int | None = option(
        None, "processes that tokenize the data (through `datasets`, cached in cache_dir); "
        "unset: 1, in this process",
    )  # fmt: skip
    on_bad_row: str = option(
        "stop", "a row that cannot be read or tokenized: stop (an error naming the row and "
        "file) or skip (left out, counted and the first ones named in the log)",
        choices=BAD_ROW_POLICIES,
    )  # fmt: skip
    enable_thinking: bool | None = option(
        None, "chat templates with a thinking switch (Qwen3) render the data with this; off: "
        "the empty think block belongs to the prompt and is not learned; unset: the template's "
        "default",
    )  # fmt: skip
    # optimization
    optimizer: str = option(
        "adamw", "adamw (torch, fused on CUDA) or bitsandbytes' 8-bit / paged AdamW; transformers' "
        "names (adamw_torch, adamw_8bit, paged_adamw_8bit) are accepted too", choices=OPTIMIZERS,
    )  # fmt: skip
    lr: float = option(2e-4, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay, never applied to norms and biases")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas (two numbers)")
    eps: float = option(1e-8, "AdamW epsilon")
    schedule: str = option(
        "linear", "learning-rate decay after the warm-up, as transformers' schedules",
        choices=SCHEDULES,
    )  # fmt: skip
    warmup_steps: int = option(0, "steps of linear warm-up from 0 to lr")
    warmup_ratio: float = option(0.0, "warm-up as a fraction of the steps (when warmup_steps is 0)")
    min_lr_ratio: float = option(0.0, "floor of the linear / cosine decay, as a fraction of lr")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this (unset: no clipping)")
    batch_size: int = option(2, "rows per micro-batch (per process under torchrun)")
    grad_accum: int = option(
        4, "micro-batches per optimizer step and process: the global batch is batch_size x "
        "grad_accum x N under torchrun --nproc_per_node N"
    )  # fmt: skip
    epochs: float = option(1.0, "passes over the data (fractions allowed)")
    max_steps: int | None = option(None, "optimizer steps to run; overrides epochs")
    seed: int = option(3407, "seed of the adapters' initialization, the shuffling and dropout")
    # speed and memory
    checkpointing: str = option(
        "auto", "activation checkpointing: none, layer (recompute each layer in the backward), "
        "offload (also keep the saved inputs in pinned CPU memory); auto: layer on CUDA, none on CPU",
        choices=CHECKPOINTING,
    )  # fmt: skip
    compile: bool | str | None = option(
        None, "torch.compile each layer (a value names the backend); unset: on CUDA only"
    )
    mlp_chunk: int = option(
        0, "tile the MLP along the sequence in chunks of this many tokens (0: off)"
    )
    keep_layers: int = option(
        0, "with checkpointing layer/offload: the last this many layers keep their activations "
        "instead of recomputing them (memory for speed; 0: every layer recomputed)",
    )  # fmt: skip
    cuda_graphs: bool | None = option(
        None, "replay each micro-batch's forward + backward as a CUDA graph (one per batch shape); "
        "unset: on CUDA when possible (no LoRA dropout, not under FSDP)",
    )  # fmt: skip
    # bookkeeping
    save_every: int = option(0, "steps between checkpoints (0: only at the end)")
    save_total_limit: int = option(2, "checkpoints kept (the newest ones)")
    eval_every: int = option(0, "steps between eval-loss measurements (0: only at the end)")
    log_every: int = option(1, "steps between lines of metrics.jsonl (and tracker logs)")
    report_to: tuple[str, ...] = option(
        (), "experiment trackers that also get the metrics: tensorboard, wandb, mlflow (each its "
        "own optional package), none, or all (those installed)",
    )  # fmt: skip
    run_name: str | None = option(None, "the run's name in the trackers (default: out's name)")
    resume: bool | str = option(
        False, "continue the newest checkpoint of `out`, or the checkpoint directory given"
    )
    overwrite: bool = option(False, "start afresh in an `out` that already holds checkpoints")
    progress: bool = option(True, "show a progress bar")
    cache_dir: str | None = option(None, "where tokenized data is cached (default: fnlm's cache)")
    # method: supervised, preference (DPO, ORPO) or RL (GRPO) fine-tuning (fnlm.train.methods)
    method: str = option(
        "sft", "sft (supervised), dpo or orpo (prompt / chosen / rejected rows), grpo (prompt "
        "rows, completions sampled and scored by reward functions)", choices=METHODS,
    )  # fmt: skip
    beta: float | None = option(
        None, "dpo / orpo: weight of the preference term; grpo: KL coefficient to the "
        "reference (adapters off); unset: 0.1 for dpo / orpo, 0 (no KL, no reference) for grpo",
    )  # fmt: skip
    loss_type: str | None = option(
        None, "dpo: sigmoid, ipo, hinge, robust; grpo: grpo, dr_grpo, bnpo; unset: the first"
    )
    label_smoothing: float = option(
        0.0, "dpo: conservative-DPO smoothing (sigmoid) or label flip rate (robust), in [0, 0.5)"
    )
    precompute_ref_log_probs: bool = option(
        False, "dpo: reference log-probs of every pair computed once before training (always in "
        "full mode without ref_model)",
    )  # fmt: skip
    ref_model: str | None = option(
        None, "dpo / grpo: a reference checkpoint (default: adapters off, or in full mode the "
        "starting weights)",
    )  # fmt: skip
    rewards: tuple[str, ...] = option(
        (), "grpo: reward functions, 'package.module:function' or 'file.py:function'"
    )
    reward_weights: tuple[float, ...] = option((), "grpo: one weight per reward (none: 1 each)")
    num_generations: int = option(8, "grpo: completions sampled per prompt (one group)")
    max_prompt_length: int = option(512, "grpo: prompt tokens kept (the last ones)")
    max_completion_length: int = option(256, "grpo: new tokens per completion at most")
    temperature: float = option(
        1.0, "grpo: sampling temperature (the loss's log-probs use it too, as TRL's do)"
    )
    top_p: float = option(1.0, "grpo: nucleus sampling (1: off)")
    top_k: int = option(0, "grpo: top-k sampling (0: off)")
    num_iterations: int = option(1, "grpo: optimizer steps on each batch of rollouts")
    keep_rollout_graphs: bool = option(
        True, "grpo on CUDA: keep the rollouts' captured decode graph and its KV cache for the next "
        "rollout (no re-capture; the cache's memory stays held through the update); off: freed "
        "after each rollout (less peak memory, a capture per rollout)",
    )  # fmt: skip
    rollout_dequantized: bool = option(
        False, "grpo with a quantized base (qlora): the rollouts decode from a 16-bit copy of the "
        "base, dequantized once per batch of rollouts and freed after it, instead of dequantizing "
        "every weight again in each decode step (more than 8 rows); costs 2 bytes per base weight "
        "while the rollouts run (~13 GiB for an 8B model) and a decode graph capture per rollout",
    )  # fmt: skip
    epsilon: float = option(0.2, "grpo: clipping range of the probability ratio")
    epsilon_high: float | None = option(None, "grpo: upper clipping range (unset: epsilon)")
    scale_rewards: str = option(
        "group", "grpo: advantages divided by the group's reward std (group), the batch's "
        "(batch) or not at all (none)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        # a string is PEFT's "all-linear" or a regex, as fnlm.lora.init takes it
        self.targets = self.targets if isinstance(self.targets, str) else tuple(self.targets)
        self.report_to = report_targets(self.report_to)
        self.modules_to_save = tuple(self.modules_to_save)
        self.betas = tuple(self.betas)
        self.optimizer = OPTIMIZER_ALIASES.get(self.optimizer, self.optimizer)
        self.schedule = SCHEDULE_ALIASES.get(self.schedule, self.schedule)
        for f in dataclasses.fields(self):  # the options declared with choices=...
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise ArgumentError(
                    f"TrainConfig.{f.name} must be one of {allowed}, got {getattr(self, f.name)!r}"
                )
        check_numbers(self)
        check_data_options(self)
        if self.distributed == "fsdp" and self.mode == "qlora":
            raise ArgumentError(
                "distributed='fsdp' shards 16-bit weights; QLoRA's NF4 base is not sharded. Use "
                "mode='lora' (a 16-bit base sharded over the processes) or distributed='ddp' (the "
                "NF4 base replicated on every process)"
            )
        if self.distributed == "fsdp" and (self.method, self.optimizer) != ("sft", "adamw"):
            raise ArgumentError(
                "distributed='fsdp' shards supervised fine-tuning with AdamW (method='sft', "
                f"optimizer 'adamw'), got method {self.method!r}, optimizer {self.optimizer!r}; "
                "use distributed='ddp'"
            )
        from fnlm.train.methods.options import check_method  # the methods import fnlm.train

        check_method(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from a dict (a parsed TOML / YAML file, or flags). Keys may be spelled with
        dashes, and transformers / TRL / peft names are accepted for the options that have one
        (`ALIASES`: learning_rate, output_dir, per_device_train_batch_size, lora_r, optim, ...).
        Raises ArgumentError for unknown keys (naming the closest valid ones), for an option given
        under two names, and for invalid values (naming the fnlm option and the key it came as)."""
        known = {f.name for f in dataclasses.fields(cls)}
        given: dict[str, str] = {}  # fnlm name -> the key it was given as
        options: dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            name = key.replace("-", "_")
            if name in known:
                target = name
            elif name in ALIASES:
                target, value = translate_alias(name, value)
            else:
                unknown.append(key)
                continue
            if target in given and isinstance(value, dict) and isinstance(options[target], dict):
                options[target] = {**options[target], **value}  # adam_beta1 and adam_beta2
                continue
            if target in given:
                raise ArgumentError(
                    f"training option {target!r} given twice (as {given[target]!r} and {key!r}); "
                    "keep one"
                )
            given[target] = key
            options[target] = value
        if unknown:
            names = sorted(known | set(ALIASES))
            hints = {k: difflib.get_close_matches(k.replace("-", "_"), names, n=1) for k in unknown}
            text = ", ".join(
                f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items()
            )
            raise ArgumentError(f"unknown training option(s) {text}")
        if "betas" in options and isinstance(options["betas"], dict):  # adam_beta1 / adam_beta2
            options["betas"] = tuple(options["betas"].get(i, d) for i, d in ((0, 0.9), (1, 0.999)))
        try:
            return cls(**options)
        except ArgumentError as e:
            renamed = [f"{name} (given as {key!r})" for name, key in given.items()
                       if key.replace("-", "_") != name and f".{name} " in str(e)]  # fmt: skip
            if not renamed:
                raise
            raise ArgumentError(f"{e}; {', '.join(renamed)}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> TrainConfig:
        """A config from a TOML or YAML file (its [train] table / train: key when it has one),
        `overrides` winning; names as `from_dict` takes them.

        >>> TrainConfig.from_file("examples/qlora-sft-qwen.toml", max_steps=10)  # doctest: +SKIP
        """
        return cls.from_dict({**read_config_file(path), **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What `train` returns: the trained state and where everything was written."""

    run_dir: Path
    step: int
    status: str  # "completed" | "interrupted"
    losses: list[float]
    params: Params
    lora: Any  # fnlm.lora.Lora, or None in full mode
    tokenizer: Any
    checkpoint: Path | None
    metrics: Path
    plot: Path | None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)


def report_targets(value) -> tuple[str, ...]:
    """report_to as a tuple of tracker names: accepts a name, a comma-separated string, a list,
    "none" (or None / empty) and "all" (every tracker that is installed)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    if names == ["none"] or not names:
        return ()
    if names == ["all"]:
        import importlib.util

        return tuple(t for t in TRACKERS if importlib.util.find_spec(t) is not None)
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ArgumentError(
            f"TrainConfig.report_to: unknown tracker(s) {bad}; expected some of {TRACKERS}, "
            "'none' or 'all'"
        )
    return tuple(dict.fromkeys(names))


# The numeric options and the values they accept: (kind, low, high, low_open, high_open); kind
# "int" (bools refused) or "float"; None bounds are unbounded. Each mistake of sign or range
# (a negative max_grad_norm turns every step into gradient ascent) is refused up front.
NUMBER_RANGES = {
    "batch_size": ("int", 1, None),
    "grad_accum": ("int", 1, None),
    "max_seq_length": ("int", 1, None),
    "r": ("int", 1, None),
    "log_every": ("int", 1, None),
    "pad_to_multiple": ("int", 1, None),
    "warmup_steps": ("int", 0, None),
    "save_every": ("int", 0, None),
    "save_total_limit": ("int", 0, None),
    "eval_every": ("int", 0, None),
    "mlp_chunk": ("int", 0, None),
    "keep_layers": ("int", 0, None),
    "seed": ("int", None, None),
    "lr": ("float", 0.0, None, "open"),
    "alpha": ("float", 0.0, None, "open"),
    "eps": ("float", 0.0, None, "open"),
    "weight_decay": ("float", 0.0, None),
    "warmup_ratio": ("float", 0.0, 1.0),
    "min_lr_ratio": ("float", 0.0, 1.0),
    "lora_dropout": ("float", 0.0, 1.0, "high-open"),
    "eval_fraction": ("float", 0.0, 1.0, "high-open"),
}


def check_data_options(config: TrainConfig) -> None:
    """Normalize `columns` ({"text": "body"} or ["text=body"]) to KEY=COLUMN pairs; ArgumentError
    for an unknown row key, num_proc below 1, num_proc with streaming, or a packing_strategy
    without packing."""
    from fnlm.data.rows import ROW_KEYS

    pairs = config.columns
    if isinstance(pairs, dict):
        pairs = [f"{k}={v}" for k, v in pairs.items()]
    elif isinstance(pairs, str):
        pairs = [pairs]
    config.columns = tuple(pairs)
    seen: dict[str, str] = {}
    for pair in config.columns:
        key, _, column = str(pair).partition("=")
        if key not in ROW_KEYS or not column:
            raise ArgumentError(
                f"TrainConfig.columns: {pair!r} must be KEY=COLUMN with KEY one of {ROW_KEYS}"
            )
        if key in seen:  # one would silently override the other
            raise ArgumentError(
                f"TrainConfig.columns: {key!r} is given twice ({seen[key]!r}, {pair!r})"
            )
        seen[key] = pair
    if config.method != "sft":
        given = [name for name, unset in [
            ("columns", ()), ("streaming", False), ("num_proc", None), ("data_subset", None),
            ("data_split", "train"), ("eval_split", None), ("on_bad_row", "stop"),
            ("packing_strategy", "bfd"),
        ] if getattr(config, name) != unset]  # fmt: skip
        if given:
            raise ArgumentError(
                f"TrainConfig.{given[0]} applies to supervised data (method 'sft'); method "
                f"{config.method!r} reads the rows of `data` whole (split 'train')"
            )
    if config.packing_strategy != "bfd" and not config.packing:
        raise ArgumentError(
            f"TrainConfig.packing_strategy {config.packing_strategy!r} packs rows, but packing "
            "is off (turn packing on, or leave packing_strategy at 'bfd')"
        )
    if config.num_proc is not None:
        _check_number("num_proc", config.num_proc, "int", 1, None, "")
        if config.streaming and config.num_proc > 1:
            raise ArgumentError(
                "TrainConfig.num_proc > 1 needs the whole dataset; streaming tokenizes rows in "
                "this process as they arrive (set one of them)"
            )


def data_options(config: TrainConfig) -> dict:
    """The keyword arguments of `fnlm.data.prepare` that a config sets (but the split)."""
    return dict(
        max_seq_length=config.max_seq_length, train_on_responses_only=config.train_on_responses_only,
        truncation=config.truncation, text_blocks=config.text_blocks, subset=config.data_subset,
        columns=dict(pair.split("=", 1) for pair in config.columns) or None,
        streaming=config.streaming, num_proc=config.num_proc, on_bad_row=config.on_bad_row,
        template_kwargs=None if config.enable_thinking is None
        else {"enable_thinking": config.enable_thinking},
        cache_dir=config.cache_dir,
    )  # fmt: skip


def check_numbers(config: TrainConfig) -> None:
    """ArgumentError naming the option unless every numeric option is of its kind and range
    (NUMBER_RANGES; also max_steps, epochs, max_grad_norm, betas)."""
    for name, (kind, low, high, *how) in NUMBER_RANGES.items():
        _check_number(name, getattr(config, name), kind, low, high, how[0] if how else "")
    if config.max_steps is not None:
        _check_number("max_steps", config.max_steps, "int", 1, None, "")
    elif not _is_number(config.epochs) or not 0 < config.epochs < math.inf:
        raise ArgumentError(f"TrainConfig.epochs must be positive, got {config.epochs!r}")
    if config.max_grad_norm is not None:
        # 0 keeps the meaning transformers gives it (no clipping); a negative norm would make
        # clip_grad_norm_ flip every gradient (gradient ascent).
        value = config.max_grad_norm
        if not _is_number(value) or not 0 <= value < math.inf:
            raise ArgumentError(
                f"TrainConfig.max_grad_norm must be a positive number (None or 0: no clipping), "
                f"got {value!r}"
            )
    if len(config.betas) != 2:
        raise ArgumentError(f"TrainConfig.betas must be two numbers, got {config.betas!r}")
    for beta in config.betas:
        _check_number("betas", beta, "float", 0.0, 1.0, "high-open")
    if config.eval_every and not (config.eval_data or config.eval_fraction or config.eval_split):
        raise ArgumentError("TrainConfig.eval_every needs eval_data, eval_split or eval_fraction")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_number(name: str, value, kind: str, low, high, how: str) -> None:
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    else:
        ok = _is_number(value) and math.isfinite(value)
        what = "a finite number"
    low_open, high_open = how == "open", how in ("open", "high-open")
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    if low is not None and high is not None:
        what += f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif (kind, low) == ("int", 1):
        what = "a positive integer"
    elif low == 0 and low_open:
        what = "positive"
    elif low == 0:
        what += " >= 0"
    raise ArgumentError(f"TrainConfig.{name} must be {what}, got {value!r}")


def read_config_file(path: str | os.PathLike) -> dict:
    """A TOML or YAML (PyYAML installed) file of training options as a dict: its [train] table /
    train: key when it has one, else the whole file. Raises ArgumentError naming the file."""
    file = Path(path)
    if not file.is_file():
        raise ArgumentError(f"config file {file} does not exist")
    if file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ArgumentError(
                f"{file} is YAML, which needs PyYAML (`pip install pyyaml`); or write it as TOML"
            ) from None
        try:
            values = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ArgumentError(f"{file} is not valid YAML: {e}") from None
    elif file.suffix == ".toml":
        try:
            values = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ArgumentError(f"{file} is not valid TOML: {e}") from None
    else:
        raise ArgumentError(f"config file {file}: expected a .toml, .yaml or .yml file")
    if not isinstance(values, dict):
        raise ArgumentError(f"{file} must hold a table of options, got {type(values).__name__}")
    values = values.get("train", values)
    if not isinstance(values, dict):
        raise ArgumentError(f"{file}: [train] must be a table of options")
    return values
