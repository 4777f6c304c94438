"""`fnlm.lora.load`: a PEFT LoRA adapter read for a params tree, checked tensor by tensor."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from fnlm import quant
from fnlm.errors import LoraError
from fnlm.lora.legacy import convert_legacy_experts
from fnlm.lora.peft_format import (
    LORA_KEYS,
    PEFT_PREFIX,
    expect_rank,
    expect_shape,
    from_peft_layout,
    parameter_keys,
    read_config,
    read_tensors,
)
from fnlm.lora.targets import Module, module_table, modules_by_name, order_key
from fnlm.lora.tree import Lora, LoraConfig, pattern_value
from fnlm.params import Params, get_path, set_path

# Base embedding weights stored in an adapter file (PEFT saves them when embed/lm_head are
# targeted) must equal the base model's; the file may hold an fp32 copy of a bf16 base, so
# compare to bf16 rounding (relative to the weights' scale).
BASE_WEIGHT_REL_TOL = 1e-2


def load(
    directory: str | os.PathLike,
    params: Params,
    *,
    trainable: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Lora:
    """Read a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for `params`.

    Understands what PEFT writes for a causal LM: lora_A/B of linear layers and of the routers and
    expert stacks named by target_parameters (peft's ParamWrapper layout), lora_embedding_A/B,
    rank_pattern / alpha_pattern, use_rslora, lora_dropout, modules_to_save and biases
    (bias="all" / "lora_only"), and the base embedding weights PEFT stores when embed / lm_head
    are targeted (checked against the base, not used). A and B are loaded in `dtype`, saved
    modules and biases in the base's dtype, all on the base's device, requiring grad when
    `trainable`.

    Mixture-of-experts adapters trained under transformers 4 (one nn.Linear per expert: keys like
    "...block_sparse_moe.experts.3.w1.lora_A.weight" in Mixtral, "...mlp.experts.3.gate_proj..."
    in Qwen2/3-MoE, target_modules ["w1", "w3", "w2"], routers as ".gate") are converted to the
    stacks as peft 0.21 converts them (gate and up fused at rank r_gate + r_up), computing what
    they computed under transformers 4 (see `convert_legacy_experts` for where that goes beyond
    peft). `save` writes such an adapter in the stacked format (target_parameters), which peft
    0.21 reads; the per-expert layout is not written back.

    Raises LoraError when a tensor names a module the base lacks, its shape does not fit the
    base weight (the message names the tensor and both shapes), A and B disagree on the rank,
    or the config asks for a LoRA variant fnlm does not implement.
    """
    directory = Path(directory)
    doc = read_config(directory)
    config = params.config
    tensors, doc = convert_legacy_experts(read_tensors(directory), doc, config)
    by_name = modules_by_name(config)
    bias_by_name = {m.name + ".bias": m for m in module_table(config) if m.bias is not None}
    described = (
        f"this {config.model_type} model ({config.num_layers} layers, hidden {config.hidden_size})"
    )

    rank_pattern = tuple((doc.get("rank_pattern") or {}).items())
    targets = doc.get("target_modules") or ()
    lora_config = LoraConfig(
        r=int(doc.get("r", 8)),
        alpha=doc.get("lora_alpha", 8),
        targets=targets if isinstance(targets, str) else tuple(targets),
        dropout=float(doc.get("lora_dropout") or 0.0),
        bias=doc.get("bias", "none"),
        rslora=bool(doc.get("use_rslora", False)),
        modules_to_save=tuple(doc.get("modules_to_save") or ()),
        rank_pattern=rank_pattern,
        alpha_pattern=tuple((doc.get("alpha_pattern") or {}).items()),
        base_model_name_or_path=doc.get("base_model_name_or_path"),
    )

    targeted = parameter_keys(config, doc.get("target_parameters") or ())

    def module_of(key: str, name: str) -> Module:
        if name in targeted:
            return targeted[name]
        if re.search(r"\.mlp\.(experts|gate)(\.base_layer)*$", name) and config.moe_layers:
            raise LoraError(
                f"adapter tensor {key} adapts an expert stack or router, but adapter_config.json's "
                f"target_parameters ({doc.get('target_parameters')}) do not account for it (peft "
                "names the innermost of a module's targeted parameters ...base_layer.lora_A)"
            )
        if name not in by_name:
            raise LoraError(
                f"adapter tensor {key} belongs to module {name}, which {described} does not have; "
                "was the adapter trained for another base model?"
            )
        return by_name[name]

    halves: dict[Module, dict[str, tuple[str, torch.Tensor]]] = {}
    tree: dict = {"layers": [{} for _ in range(config.num_layers)]}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in LORA_KEYS if name.endswith(s)), None)
        if suffix is not None:
            module = module_of(key, name.removesuffix(suffix))
            halves.setdefault(module, {})[LORA_KEYS[suffix]] = (key, tensor)
        elif name.endswith(".base_layer.weight"):
            module = module_of(key, name.removesuffix(".base_layer.weight"))
            _check_base_copy(key, tensor, params, module)
        elif name.endswith(".weight") and name.removesuffix(".weight") in by_name:
            module = by_name[name.removesuffix(".weight")]
            expect_shape(key, tensor, module.shape, f"base weight {module.name}.weight")
            set_path(
                tree, module.weight, _loaded(tensor, get_path(params, module.weight), trainable)
            )
        elif name.replace(".base_layer.bias", ".bias") in bias_by_name:
            module = bias_by_name[name.replace(".base_layer.bias", ".bias")]
            expect_shape(key, tensor, module.bias_shape, f"base bias {module.name}.bias")
            set_path(tree, module.bias, _loaded(tensor, get_path(params, module.bias), trainable))
        elif re.search(r"\.lora_|lora_magnitude_vector", name):
            raise LoraError(f"adapter tensor {key} is of a LoRA variant fnlm does not implement")
        else:
            raise LoraError(
                f"adapter tensor {key} matches no module of {described}; was the adapter trained for "
                "another base model?"
            )

    for module in sorted(halves, key=order_key(config.model_type)):
        parts = halves[module]
        if set(parts) != {"a", "b"}:
            ((key, _),) = parts.values()
            raise LoraError(
                f"adapter tensor {key} has no {'lora_B' if 'a' in parts else 'lora_A'} partner"
            )
        (key_a, a), (key_b, b) = parts["a"], parts["b"]
        in_features, out_features = module.io()
        if module.parameter is not None:
            _load_parameter_adapter(
                tree, module, parts, rank_pattern, lora_config.r, params, dtype, trainable
            )
            continue
        if a.dim() != 2 or b.dim() != 2:
            raise LoraError(
                f"adapter tensors {key_a} {tuple(a.shape)} and {key_b} {tuple(b.shape)} must be 2-D"
            )
        rank = a.shape[0]
        base = f"base weight {module.name}.weight of shape {tuple(module.shape)}"
        expect_shape(key_a, a, (rank, in_features), base)
        expect_shape(key_b, b, (out_features, rank), base)
        expect_rank(
            key_a, rank, pattern_value(rank_pattern, (module.name,), lora_config.r), module.name
        )
        device = get_path(params, module.weight).device
        set_path(
            tree,
            module.weight,
            {
                "a": a.to(device=device, dtype=dtype).requires_grad_(trainable),
                "b": b.to(device=device, dtype=dtype).requires_grad_(trainable),
            },
        )
    return Lora(tree, lora_config, config)


def _load_parameter_adapter(
    tree: dict, module: Module, parts: dict, rank_pattern, r: int, params, dtype, trainable: bool
) -> None:
    """Check a router's or expert stack's lora_A / lora_B (peft's ParamWrapper layout) and set
    them into `tree` (an expert stack's as [E, r, in], [E, out, r])."""
    (key_a, a), (key_b, b) = parts["a"], parts["b"]
    in_features, out_features = module.io()
    experts = max(module.experts, 1)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] % experts:
        raise LoraError(
            f"adapter tensors {key_a} {tuple(a.shape)} and {key_b} {tuple(b.shape)} must be 2-D, "
            f"lora_A with a multiple of {experts} rows (rank x experts)"
        )
    rank = a.shape[0] // experts
    want_a, want_b = (rank * experts, in_features), (out_features, rank * experts)
    base = f"{module.target} of shape {module.shape} with {experts} expert(s) (rank {rank})"
    expect_shape(key_a, a, want_a, base)
    expect_shape(key_b, b, want_b, base)
    expect_rank(key_a, rank, pattern_value(rank_pattern, (module.target,), r), module.target)
    if module.experts:
        a, b = from_peft_layout(a, b, experts)
    device = get_path(params, module.weight).device
    adapter = {
        "a": a.to(device=device, dtype=dtype).requires_grad_(trainable),
        "b": b.to(device=device, dtype=dtype).requires_grad_(trainable),
    }
    set_path(tree, module.weight, adapter)


def _loaded(tensor: torch.Tensor, base, trainable: bool) -> torch.Tensor:
    return tensor.to(device=base.device, dtype=base.dtype).requires_grad_(trainable)


def _check_base_copy(key: str, tensor: torch.Tensor, params: Params, module: Module) -> None:
    """PEFT stores targeted embedding layers' base weights; they must be the base model's."""
    base = quant.dequantize(get_path(params, module.weight))
    if tuple(tensor.shape) != tuple(base.shape):
        raise LoraError(
            f"adapter tensor {key} has shape {tuple(tensor.shape)}, but the base weight "
            f"{module.name}.weight has shape {tuple(base.shape)}: the adapter was trained on another "
            "(or a resized) base model"
        )
    ref = base.detach().float().cpu()
    error = (tensor.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
    if error > BASE_WEIGHT_REL_TOL:
        raise LoraError(
            f"adapter tensor {key} differs from the base model's {module.name}.weight (relative "
            f"difference {error:.3g}): the adapter was trained on another base model"
        )
