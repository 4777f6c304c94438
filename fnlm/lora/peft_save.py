"""`fnlm.lora.save`: an adapter written as peft 0.21 writes it (adapter_config.json +
adapter_model.safetensors), so `PeftModel.from_pretrained` loads it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fnlm import files, quant
from fnlm.config import ModelConfig
from fnlm.errors import LoraError
from fnlm.lora.peft_format import (
    CONFIG_FILE,
    PEFT_FORMAT_VERSION,
    PEFT_PREFIX,
    WEIGHTS_FILE,
    json_number,
    parameter_key,
    to_peft_layout,
)
from fnlm.lora.targets import (
    Module,
    matches_target,
    module_table,
    modules_by_path,
    order_key,
    peft_expert_names,
    short_name,
    short_parameter,
)
from fnlm.lora.tree import Lora, entries, is_adapter, pattern_value
from fnlm.params import Params, get_path, path_name

# adapter_config.json as peft 0.21 writes it for a plain LoRA of a causal LM; save fills in the
# adapter's own fields. Keys are sorted as PEFT sorts them.
PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": PEFT_FORMAT_VERSION,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": "CAUSAL_LM",
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}


def _names_for(modules: list[Module], config: ModelConfig) -> list[str]:
    """Short transformers names ("q_proj") when they pick out exactly `modules`, else full names."""
    shorts = sorted({short_name(m, True) for m in modules})
    covered = [m for m in module_table(config) if any(matches_target(s, (m.name,)) for s in shorts)]
    if set(covered) == set(modules):
        return shorts
    return sorted(m.name for m in modules)


def save(
    directory: str | os.PathLike,
    lora: Lora,
    *,
    params: Params | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` as PEFT writes them for the
    transformers model of `lora.model_config`, so `PeftModel.from_pretrained(model, directory)`
    loads it. Each file is written whole or not at all (fnlm.files).

    params: the base; when given and embed / lm_head are adapted, their base weights are stored
        too, as PEFT does (needed only by readers that check them; fnlm.lora.load does).
    base_model_name_or_path: recorded in the config (default: the lora config's).
    Returns the directory.
    """
    config = lora.model_config
    adapted, replaced = _entries_by_kind(lora)
    tensors = _adapter_tensors(lora, adapted)
    saved = _replaced_tensors(replaced, adapted, config, tensors)
    linear = [m for m in adapted if m.parameter is None]
    target_modules = _names_for(linear, config) if linear else []
    # PEFT's save_embedding_layers="auto": with an embedding layer among target_modules, the
    # adapted embedding layers' base weights go into the file.
    if params is not None and {"embed_tokens", "lm_head"} & set(target_modules):
        for module in adapted:
            if module.weight in (("embed",), ("lm_head",)):
                base = quant.dequantize(get_path(params, module.weight))
                tensors[f"{PEFT_PREFIX}{module.name}.base_layer.weight"] = base
    doc = _config_doc(lora, adapted, saved, target_modules)
    doc["base_model_name_or_path"] = base_model_name_or_path or lora.config.base_model_name_or_path
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory, tensors, doc)
    return directory


def _entries_by_kind(lora: Lora) -> tuple[list[Module], list[tuple[tuple, torch.Tensor]]]:
    """(adapted modules in the order peft visits them, [(path, tensor)] of the saved modules and
    biases); LoraError for an adapter at a path with no transformers module."""
    by_path = modules_by_path(lora.model_config)
    adapted: list[Module] = []
    replaced: list[tuple[tuple, torch.Tensor]] = []
    for path, node in entries(lora):
        if not is_adapter(node):
            replaced.append((path, node))
        elif path in by_path:
            adapted.append(by_path[path])
        else:
            raise LoraError(f"lora.save: no transformers module for adapter {path_name(path)}")
    return sorted(adapted, key=order_key(lora.model_config.model_type)), replaced


def _adapter_tensors(lora: Lora, adapted: list[Module]) -> dict[str, torch.Tensor]:
    """{saved key: tensor} of the adapters' lora_A / lora_B (lora_embedding_A / B for embed; an
    expert stack's in peft's ParamWrapper layout, under its nested wrapper's key)."""
    tensors: dict[str, torch.Tensor] = {}
    for module in adapted:
        a, b = get_path(lora, module.weight)["a"], get_path(lora, module.weight)["b"]
        if module.parameter is not None:
            key = f"{PEFT_PREFIX}{parameter_key(module, adapted)}"
            a, b = to_peft_layout(a, b, module.peft_rows) if module.experts else (a, b)
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
        elif module.embedding:
            tensors[f"{PEFT_PREFIX}{module.name}.lora_embedding_A"] = a
            tensors[f"{PEFT_PREFIX}{module.name}.lora_embedding_B"] = b
        else:
            tensors[f"{PEFT_PREFIX}{module.name}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{module.name}.lora_B.weight"] = b
    return tensors


def _replaced_tensors(
    replaced: list[tuple[tuple, torch.Tensor]],
    adapted: list[Module],
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
) -> list[Module]:
    """Add the saved modules' weights and the trained biases to `tensors` under PEFT's keys;
    returns the saved modules (modules_to_save)."""
    weight_owner = {m.weight: m for m in module_table(config)}
    bias_owner = {m.bias: m for m in module_table(config) if m.bias is not None}
    saved: list[Module] = []
    for path, tensor in replaced:
        if path in weight_owner:
            module = weight_owner[path]
            saved.append(module)
            tensors[f"{PEFT_PREFIX}{module.name}.weight"] = tensor
        elif path in bias_owner:
            module = bias_owner[path]
            # A bias of an adapted module lives on the LoRA layer's base_layer.
            inner = ".base_layer" if module in adapted else ""
            tensors[f"{PEFT_PREFIX}{module.name}{inner}.bias"] = tensor
        else:
            raise LoraError(
                f"lora.save: no transformers tensor for adapter entry {path_name(path)}"
            )
    return saved


def _config_doc(
    lora: Lora, adapted: list[Module], saved: list[Module], target_modules: list[str]
) -> dict[str, Any]:
    """adapter_config.json's content as peft 0.21 writes it for this adapter."""
    lc, config = lora.config, lora.model_config
    linear = [m for m in adapted if m.parameter is None]
    parameters = [m for m in adapted if m.parameter is not None]
    rank_pattern, alpha_pattern = {}, {}
    for module in linear:
        rank = get_path(lora, module.weight)["a"].shape[0]
        alpha = pattern_value(lc.alpha_pattern, module.names, lc.alpha)
        if rank != lc.r:
            rank_pattern[module.name] = rank
        if alpha != lc.alpha:
            alpha_pattern[module.name] = json_number(alpha)
    _parameter_patterns(parameters, adapted, lora, rank_pattern, alpha_pattern)
    doc = dict(PEFT_DEFAULTS)
    doc.update(
        r=lc.r,
        lora_alpha=json_number(lc.alpha),
        lora_dropout=lc.dropout,
        bias=lc.bias,
        use_rslora=lc.rslora,
        target_modules=target_modules,
        modules_to_save=_names_for(saved, config) if saved else None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    if parameters:
        doc["target_parameters"] = _parameter_names(parameters, config)
    elif peft_expert_names(config.model_type):  # peft's conversion leaves an empty list
        doc["target_parameters"] = []
    return doc


def _write(directory: Path, tensors: dict[str, torch.Tensor], doc: dict) -> None:
    """adapter_model.safetensors (contiguous CPU copies; an alias cloned, as safetensors refuses
    aliases: tied embed / lm_head, which PEFT copies too), then adapter_config.json."""
    contiguous, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        contiguous[key] = tensor
    files.write_atomic(
        directory / WEIGHTS_FILE, lambda p: save_file(contiguous, p, metadata={"format": "pt"})
    )
    files.write_text(directory / CONFIG_FILE, json.dumps(doc, indent=2, sort_keys=True))


def _parameter_names(parameters: list[Module], config: ModelConfig) -> list[str]:
    """target_parameters: short names ("gate_up_proj", "down_proj", "gate.weight") when they pick
    out exactly `parameters`, else full names."""
    shorts = sorted({short_parameter(m) for m in parameters})
    every = [m for m in module_table(config) if m.parameter is not None]
    covered = [m for m in every if any(matches_target(t, (m.target,)) for t in shorts)]
    if set(covered) == set(parameters):
        return shorts
    return sorted(m.target for m in parameters)


def _parameter_patterns(
    parameters: list[Module], adapted: list[Module], lora: Lora, ranks: dict, alphas: dict
) -> None:
    """rank_pattern / alpha_pattern entries of the parameter targets whose rank or alpha is not
    the adapter's r / alpha: one ".*\\.gate_up_proj" entry when every such stack agrees (as peft's
    conversion writes it) and it matches no other adapted module, else one per full name."""
    lc = lora.config
    for pattern, values, default in ((ranks, "rank", lc.r), (alphas, "alpha", lc.alpha)):
        groups: dict[str, list[tuple[Module, Any]]] = {}
        for module in parameters:
            a = get_path(lora, module.weight)["a"]
            if values == "rank":
                value = a.shape[1] if module.experts else a.shape[0]
            else:
                value = json_number(pattern_value(lc.alpha_pattern, module.names, lc.alpha))
            groups.setdefault(short_parameter(module), []).append((module, value))
        for short, members in groups.items():
            distinct = {value for _, value in members}
            if distinct == {default}:
                continue
            key = rf".*\.{re.escape(short)}"
            others = [m for m in adapted if m not in {module for module, _ in members}]
            if len(distinct) == 1 and not any(re.match(rf"{key}$", m.target) for m in others):
                pattern[key] = distinct.pop()
                continue
            for module, value in members:
                if value != default:
                    pattern[module.target] = value
