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
    tensors, doc = convert_legacy_experts(read_tensors(directory), doc, params.config)
    lora_config = _lora_config(doc)
    reader = _Reader(params, doc, trainable, dtype)
    for key, tensor in tensors.items():
        reader.add(key, tensor)
    reader.set_adapters(lora_config)
    return Lora(reader.tree, lora_config, params.config)


def _lora_config(doc: dict) -> LoraConfig:
    """The LoraConfig of an adapter_config.json (PEFT's defaults for absent fields)."""
    targets = doc.get("target_modules") or ()
    return LoraConfig(
        r=int(doc.get("r", 8)),
        alpha=doc.get("lora_alpha", 8),
        targets=targets if isinstance(targets, str) else tuple(targets),
        dropout=float(doc.get("lora_dropout") or 0.0),
        bias=doc.get("bias", "none"),
        rslora=bool(doc.get("use_rslora", False)),
        modules_to_save=tuple(doc.get("modules_to_save") or ()),
        rank_pattern=tuple((doc.get("rank_pattern") or {}).items()),
        alpha_pattern=tuple((doc.get("alpha_pattern") or {}).items()),
        base_model_name_or_path=doc.get("base_model_name_or_path"),
    )


class _Reader:
    """The tensors of one adapter file placed into a lora tree: saved modules and biases as they
    come (`add`), lora_A / lora_B collected per module and set in pairs (`set_adapters`)."""

    def __init__(self, params: Params, doc: dict, trainable: bool, dtype: torch.dtype):
        config = params.config
        self.params, self.doc, self.trainable, self.dtype = params, doc, trainable, dtype
        self.config = config
        self.by_name = modules_by_name(config)
        self.bias_by_name = {
            m.name + ".bias": m for m in module_table(config) if m.bias is not None
        }
        self.targeted = parameter_keys(config, doc.get("target_parameters") or ())
        self.described = (
            f"this {config.model_type} model ({config.num_layers} layers, hidden "
            f"{config.hidden_size})"
        )
        self.halves: dict[Module, dict[str, tuple[str, torch.Tensor]]] = {}
        self.tree: dict = {"layers": [{} for _ in range(config.num_layers)]}

    def module_of(self, key: str, name: str) -> Module:
        """The module (or parameter target) the tensor `key` of module `name` belongs to."""
        if name in self.targeted:
            return self.targeted[name]
        if (
            re.search(r"\.(mlp\.)?(experts|gate|router)(\.base_layer)*$", name)
            and self.config.moe_layers
        ):
            raise LoraError(
                f"adapter tensor {key} adapts an expert stack or router, but adapter_config.json's "
                f"target_parameters ({self.doc.get('target_parameters')}) do not account for it "
                "(peft names the innermost of a module's targeted parameters ...base_layer.lora_A)"
            )
        if name not in self.by_name:
            raise LoraError(
                f"adapter tensor {key} belongs to module {name}, which {self.described} does not "
                "have; was the adapter trained for another base model?"
            )
        return self.by_name[name]

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Place one tensor of the file (a factor, a base-weight copy, a saved module or bias)."""
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in LORA_KEYS if name.endswith(s)), None)
        if suffix is not None:
            module = self.module_of(key, name.removesuffix(suffix))
            self.halves.setdefault(module, {})[LORA_KEYS[suffix]] = (key, tensor)
        elif name.endswith(".base_layer.weight"):
            module = self.module_of(key, name.removesuffix(".base_layer.weight"))
            _check_base_copy(key, tensor, self.params, module)
        elif name.endswith(".weight") and name.removesuffix(".weight") in self.by_name:
            module = self.by_name[name.removesuffix(".weight")]
            expect_shape(key, tensor, module.shape, f"base weight {module.name}.weight")
            self._set_copy(module.weight, tensor)
        elif name.replace(".base_layer.bias", ".bias") in self.bias_by_name:
            module = self.bias_by_name[name.replace(".base_layer.bias", ".bias")]
            expect_shape(key, tensor, module.bias_shape, f"base bias {module.name}.bias")
            self._set_copy(module.bias, tensor)
        elif re.search(r"\.lora_|lora_magnitude_vector", name):
            raise LoraError(f"adapter tensor {key} is of a LoRA variant fnlm does not implement")
        else:
            raise LoraError(
                f"adapter tensor {key} matches no module of {self.described}; was the adapter "
                "trained for another base model?"
            )

    def _set_copy(self, path: tuple, tensor: torch.Tensor) -> None:
        base = get_path(self.params, path)
        value = tensor.to(device=base.device, dtype=base.dtype).requires_grad_(self.trainable)
        set_path(self.tree, path, value)

    def set_adapters(self, lora_config: LoraConfig) -> None:
        """Check each module's lora_A / lora_B pair and set it into the tree, in PEFT's order."""
        for module in sorted(self.halves, key=order_key(self.config.model_type)):
            parts = self.halves[module]
            if set(parts) != {"a", "b"}:
                ((key, _),) = parts.values()
                partner = "lora_B" if "a" in parts else "lora_A"
                raise LoraError(f"adapter tensor {key} has no {partner} partner")
            if module.parameter is not None:
                a, b = _parameter_adapter(module, parts, lora_config)
            else:
                a, b = _linear_adapter(module, parts, lora_config)
            device = get_path(self.params, module.weight).device
            adapter = {
                "a": a.to(device=device, dtype=self.dtype).requires_grad_(self.trainable),
                "b": b.to(device=device, dtype=self.dtype).requires_grad_(self.trainable),
            }
            set_path(self.tree, module.weight, adapter)


def _linear_adapter(module: Module, parts: dict, lora_config: LoraConfig):
    """A linear or embedding module's (lora_A, lora_B), checked against its weight and rank."""
    (key_a, a), (key_b, b) = parts["a"], parts["b"]
    in_features, out_features = module.io()
    if a.dim() != 2 or b.dim() != 2:
        raise LoraError(
            f"adapter tensors {key_a} {tuple(a.shape)} and {key_b} {tuple(b.shape)} must be 2-D"
        )
    rank = a.shape[0]
    base = f"base weight {module.name}.weight of shape {tuple(module.shape)}"
    expect_shape(key_a, a, (rank, in_features), base)
    expect_shape(key_b, b, (out_features, rank), base)
    want = pattern_value(lora_config.rank_pattern, (module.name,), lora_config.r)
    expect_rank(key_a, rank, want, module.name)
    return a, b


def _parameter_adapter(module: Module, parts: dict, lora_config: LoraConfig):
    """A router's or expert stack's (A, B) from peft's ParamWrapper layout, checked (an expert
    stack's returned as fnlm's [E, r, in], [E, out, r])."""
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
    want = pattern_value(lora_config.rank_pattern, (module.target,), lora_config.r)
    expect_rank(key_a, rank, want, module.target)
    if not module.experts:
        return a, b
    return from_peft_layout(a, b, experts, module.peft_rows)


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
