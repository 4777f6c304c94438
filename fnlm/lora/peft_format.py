"""PEFT's adapter format, shared by reading and writing: file and key names, the options fnlm
does not implement, peft's ParamWrapper layout of expert stacks, and the shape / rank checks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fnlm.config import ModelConfig
from fnlm.errors import LoraError
from fnlm.lora.targets import Module, matches_target, module_table
from fnlm.lora.tree import BIAS_MODES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
# PeftModelForCausalLM wraps LoraModel wraps the transformers model: every saved key starts so.
PEFT_PREFIX = "base_model.model."
# The adapter_config.json layout written here is that of this peft release.
PEFT_FORMAT_VERSION = "0.21.2"

# Options of a PEFT LoRA that change its computation in ways fnlm does not implement.
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "a bias on lora_B",
    "fan_in_fan_out": "Conv1D (fan_in_fan_out) layers",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}


LORA_KEYS = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_embedding_A": "a",
    ".lora_embedding_B": "b",
}


def json_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def from_peft_layout(a: torch.Tensor, b: torch.Tensor, experts: int):
    """peft's ParamWrapper factors (lora_A [E·r, in], lora_B [out, r·E]) -> fnlm's per-expert
    ([E, r, in], [E, out, r]): expert e's A is rows e·r..(e+1)·r of lora_A, its B the columns
    e, e+E, e+2E, ... of lora_B (peft reshapes B to [out, r, E])."""
    rank = a.shape[0] // experts
    return (
        a.reshape(experts, rank, a.shape[1]),
        b.reshape(b.shape[0], rank, experts).permute(2, 0, 1).contiguous(),
    )


def to_peft_layout(a: torch.Tensor, b: torch.Tensor):
    """fnlm's per-expert factors -> peft's ParamWrapper layout (inverse of `from_peft_layout`)."""
    experts, rank, _ = a.shape
    return a.reshape(experts * rank, -1), b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)


def parameter_key(module: Module, adapted: list[Module]) -> str:
    """The saved-key prefix of a parameter target's factors. peft wraps each targeted parameter
    of one module in a ParamWrapper of its own, nested in the order it visits them, so all but
    the last one targeted sit under ".base_layer" once per wrapper outside them:
    "model.layers.0.mlp.experts.base_layer" (gate_up) and "model.layers.0.mlp.experts" (down)."""
    siblings = [m for m in adapted if m.name == module.name]  # in visiting order
    return module.name + ".base_layer" * (len(siblings) - 1 - siblings.index(module))


def parameter_keys(config: ModelConfig, target_parameters) -> dict[str, Module]:
    """{saved-key prefix: parameter target} for the parameters `target_parameters` names (peft's
    rule: a full name equals an entry or ends with "." + it), nested as peft nests them."""
    targeted = [
        m
        for m in module_table(config)
        if m.parameter is not None
        and any(matches_target(t, (m.target,)) for t in target_parameters)
    ]
    return {parameter_key(m, targeted): m for m in targeted}


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_FILE).exists():
        from safetensors.torch import load_file

        return load_file(directory / WEIGHTS_FILE)
    if (directory / LEGACY_WEIGHTS_FILE).exists():
        return torch.load(directory / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    raise LoraError(
        f"{directory} has no {WEIGHTS_FILE} (nor {LEGACY_WEIGHTS_FILE}); is it a PEFT adapter?"
    )


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.exists():
        raise LoraError(
            f"{path} does not exist; a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoraError(f"{path} is not valid JSON: {e}") from None
    if doc.get("peft_type", "LORA") != "LORA":
        raise LoraError(
            f"{path}: peft_type is {doc.get('peft_type')!r}; fnlm reads LoRA adapters only"
        )
    for key, what in UNSUPPORTED.items():
        if doc.get(key):
            raise LoraError(f"{path}: {key}={doc[key]!r} ({what}) is not supported by fnlm")
    if doc.get("bias", "none") not in BIAS_MODES:
        raise LoraError(f"{path}: bias={doc['bias']!r}; expected one of {BIAS_MODES}")
    return doc


def expect_shape(key: str, tensor: torch.Tensor, want: tuple, base: str) -> None:
    """LoraError unless the adapter tensor `key` has shape `want` (what `base` needs)."""
    if tuple(tensor.shape) != tuple(want):
        raise LoraError(
            f"adapter tensor {key} has shape {tuple(tensor.shape)}, but {base} needs "
            f"{tuple(want)}; was the adapter trained for another base model?"
        )


def expect_rank(key: str, rank: int, want: int, name: str) -> None:
    """LoraError unless lora_A `key`'s rank is the one adapter_config.json gives `name`."""
    if rank != want:
        raise LoraError(
            f"adapter tensor {key} has rank {rank}, but adapter_config.json gives {name} rank "
            f"{want} (r / rank_pattern)"
        )
