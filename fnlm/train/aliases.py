"""The transformers TrainingArguments / TRL SFTConfig / peft LoraConfig / Unsloth names of
fnlm's training options (and of its optimizers and schedules), and their translation."""

from __future__ import annotations

from typing import Any

# The transformers TrainingArguments / TRL SFTConfig / peft LoraConfig / Unsloth spelling of an
# option -> fnlm's name (and, for some, a translation of the value: see translate_alias).
ALIASES = {
    "model_name_or_path": "model",
    "dataset_name": "data",
    "output_dir": "out",
    "overwrite_output_dir": "overwrite",
    "resume_from_checkpoint": "resume",
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "schedule",
    "optim": "optimizer",
    "adam_beta1": "betas",
    "adam_beta2": "betas",
    "adam_epsilon": "eps",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "gradient_checkpointing": "checkpointing",
    "use_gradient_checkpointing": "checkpointing",
    "torch_compile": "compile",
    "bf16": "dtype",
    "fp16": "dtype",
    "disable_tqdm": "progress",
    "max_length": "max_seq_length",
    "assistant_only_loss": "train_on_responses_only",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "target_modules": "targets",
    "use_rslora": "rslora",
    "dataset_text_field": "columns",  # TRL: the text column
    "dataset_config": "data_subset",  # TRL ScriptArguments
    "dataset_config_name": "data_subset",  # transformers' example scripts
    "dataset_train_split": "data_split",
    "dataset_test_split": "eval_split",
    "dataset_streaming": "streaming",
    "dataset_num_proc": "num_proc",
    "preprocessing_num_workers": "num_proc",  # transformers' example scripts
    "reward_funcs": "rewards",  # TRL's GRPOTrainer argument
    "reward": "rewards",  # --reward module:function ...
}

# transformers' names of the optimizers and schedules fnlm has.
OPTIMIZER_ALIASES = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "adamw_8bit": "adamw8bit",
    "adamw_bnb_8bit": "adamw8bit",
    "paged_adamw_8bit": "paged_adamw8bit",
    "paged_adamw_32bit": "paged_adamw32bit",
}
SCHEDULE_ALIASES = {"constant_with_warmup": "constant"}  # fnlm's warm-up applies to every schedule


def translate_alias(alias: str, value: Any) -> tuple[str, Any]:
    """(fnlm name, fnlm value) for an option given under its transformers / TRL / peft name."""
    name = ALIASES[alias]
    if alias in ("adam_beta1", "adam_beta2"):
        return name, {int(alias[-1]) - 1: value}
    if alias in ("gradient_checkpointing", "use_gradient_checkpointing"):
        # Unsloth's use_gradient_checkpointing="unsloth" offloads the saved inputs to CPU memory.
        table = {True: "layer", False: "none", "unsloth": "offload"}
        return name, table.get(value, value) if isinstance(value, bool | str) else value
    if alias in ("bf16", "fp16"):
        return name, ({"bf16": "bfloat16", "fp16": "float16"}[alias] if value else None)
    if alias == "dataset_text_field":
        column = value[0] if isinstance(value, list | tuple) and len(value) == 1 else value
        return name, (f"text={column}",)
    if alias == "disable_tqdm":
        return name, not value
    if (
        alias == "target_modules"
        and isinstance(value, list | tuple)
        and list(value) == ["all-linear"]
    ):
        return name, "all-linear"
    return name, value
