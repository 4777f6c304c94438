"""PEFT's adapter format, shared by reading and writing: file and key names, the options fnlm
does not implement, peft's ParamWrapper layout of expert stacks, and the shape / rank checks."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from fnlm import files
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


def from_peft_layout(a: torch.Tensor, b: torch.Tensor, experts: int, rows=None):
    """peft's ParamWrapper factors (lora_A [E·r, in], lora_B [out, r·E]) -> fnlm's per-expert
    ([E, r, in], [E, out, r]): expert e's A is rows e·r..(e+1)·r of lora_A, its B the columns
    e, e+E, e+2E, ... of lora_B (peft reshapes B to [out, r, E]). `rows`: the stack's
    `Module.peft_rows` (peft's output row j is fnlm's row rows[j]), None when they agree."""
    rank = a.shape[0] // experts
    b = b.reshape(b.shape[0], rank, experts).permute(2, 0, 1)
    if rows is not None:
        b = b[:, torch.argsort(torch.tensor(rows, device=b.device))]
    return a.reshape(experts, rank, a.shape[1]), b.contiguous()


def to_peft_layout(a: torch.Tensor, b: torch.Tensor, rows=None):
    """fnlm's per-expert factors -> peft's ParamWrapper layout (inverse of `from_peft_layout`)."""
    experts, rank, _ = a.shape
    if rows is not None:
        b = b[:, torch.tensor(rows, device=b.device)]
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
    """The tensors of an adapter file, under PEFT's saved key names (an adapter name such as
    ".default", which a raw model.state_dict() carries, taken out). LoraError naming the file
    when it is corrupt or truncated, holds no tensors while adapter_config.json targets modules
    (a no-op adapter), or holds several adapters."""
    path = directory / WEIGHTS_FILE
    if path.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise LoraError(f"{path} is corrupt or truncated: {e}") from None
    elif (directory / LEGACY_WEIGHTS_FILE).exists():
        path = directory / LEGACY_WEIGHTS_FILE
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            raise LoraError(
                f"{path} is corrupt, truncated or holds more than tensors: {e}"
            ) from None
    else:
        raise LoraError(
            f"{directory} has no {WEIGHTS_FILE} (nor {LEGACY_WEIGHTS_FILE}); is it a PEFT adapter?"
        )
    tensors = _without_adapter_name(tensors, path)
    doc = read_config(directory)
    targets = doc.get("target_modules") or doc.get("target_parameters")
    if targets and not any(re.search(r"\.lora_", key) for key in tensors):
        raise LoraError(
            f"{path} holds no LoRA tensors ({len(tensors)} tensor(s)), although {CONFIG_FILE} "
            f"targets {targets}: it would load as an adapter that changes nothing. Was it saved "
            "before the adapters were added, or cut short?"
        )
    return tensors


# A raw model.state_dict() of a peft model names the adapter: "...q_proj.lora_A.default.weight",
# "...embed_tokens.lora_embedding_A.default"; save_pretrained leaves the name out.
_ADAPTER_NAME = re.compile(
    r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.([^.]+)(?=\.weight$|$)"
)


def _without_adapter_name(tensors: dict[str, torch.Tensor], path: Path) -> dict:
    names = {
        m.group(2) for key in tensors if (m := _ADAPTER_NAME.search(key)) and m.group(2) != "weight"
    }
    if not names:
        return tensors
    if len(names) > 1:
        raise LoraError(
            f"{path} holds several adapters ({sorted(names)}): save one with peft's "
            "model.save_pretrained(dir, selected_adapters=[name])"
        )

    def strip(match: re.Match) -> str:
        return match.group(0) if match.group(2) == "weight" else f".{match.group(1)}"

    return {_ADAPTER_NAME.sub(strip, key): tensor for key, tensor in tensors.items()}


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.exists():
        raise LoraError(
            f"{path} does not exist; a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    doc = files.read_json(path, error=LoraError, expect=dict)
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
