"""Single-GPU fine-tuning: QLoRA (default), LoRA on 16-bit weights, or full fine-tuning.

    result = fnlm.train.train(fnlm.train.TrainConfig(model=None, data="data/demo.jsonl",
                                                     out="runs/demo", mode="lora", max_steps=60))
    result.lora, result.run_dir, result.losses

The pieces are library functions a user can recombine: `build_optimizer`, `build_scheduler`,
`layer_function` (activation checkpointing, CPU offload, torch.compile, MLP tiling), `train_step`
(gradient accumulation normalised by the step's trained tokens), `evaluate`, `save_checkpoint` /
`load_checkpoint` (atomic directories), `plot_losses` (matplotlib), trackers (`report_to`).

A run directory is shaped as transformers' Trainer leaves its output_dir: train_config.json,
metrics.jsonl (one line per step and per evaluation), loss.png, runs/ (TensorBoard),
checkpoint-N/ (trainable tensors, optimizer, scheduler, RNG and data position, and the adapter in
PEFT's format) and, at the end, the adapter (LoRA modes: adapter_config.json +
adapter_model.safetensors, so `PeftModel.from_pretrained(model, out)` and `fnlm.load(out)` load
it) or the model (full: config.json, model.safetensors, generation_config.json, tokenizer, as
`fnlm.save(format="merged")` writes them) at its top. Runs of earlier versions
(checkpoints/step-NNNNNNNN/, config.json) still resume.
"""

from fnlm.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_full_model,
)
from fnlm.train.config import (
    CHECKPOINT_PREFIX,
    CHECKPOINTING,
    MODES,
    OPTIMIZERS,
    SCHEDULES,
    TMP_PREFIX,
    NonFiniteLossError,
    TrainConfig,
    TrainResult,
)
from fnlm.train.graphs import StepGraphs
from fnlm.train.layers import layer_function, tiled_layer_forward
from fnlm.train.optim import build_optimizer, build_scheduler, lr_factor
from fnlm.train.plot import plot_losses
from fnlm.train.run import train
from fnlm.train.setup import Run, load_for_training, start
from fnlm.train.step import Trainable, evaluate, train_step
from fnlm.train.stream import Stream

__all__ = [
    "CHECKPOINTING", "CHECKPOINT_PREFIX", "MODES", "OPTIMIZERS", "SCHEDULES", "TMP_PREFIX",
    "NonFiniteLossError", "Run", "StepGraphs", "Stream", "TrainConfig", "TrainResult", "Trainable", "build_optimizer",
    "build_scheduler", "evaluate", "layer_function", "list_checkpoints", "load_checkpoint",
    "load_for_training", "lr_factor", "plot_losses", "save_checkpoint", "save_full_model",
    "start", "tiled_layer_forward", "train", "train_step",
]  # fmt: skip
