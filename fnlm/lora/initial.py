"""`fnlm.lora.init`: fresh adapters, initialised exactly as PEFT initialises them."""

from __future__ import annotations

import math

import torch

from fnlm import quant
from fnlm.errors import ArgumentError, LoraError
from fnlm.lora.peft_format import from_peft_layout
from fnlm.lora.targets import (
    Module,
    adaptable,
    expert_parts,
    family_naming,
    module_table,
    select,
)
from fnlm.lora.tree import ALL_LINEAR, BIAS_MODES, Lora, LoraConfig, pattern_value
from fnlm.params import Params, get_path, path_name, set_path


def init(
    params: Params,
    r: int = 16,
    alpha: float = 16,
    targets: tuple[str, ...] | str = ALL_LINEAR,
    dropout: float = 0.0,
    bias: str = "none",
    rslora: bool = False,
    seed: int = 3407,
    modules_to_save: tuple[str, ...] = (),
    *,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    dtype: torch.dtype = torch.float32,
    base_model_name_or_path: str | None = None,
) -> Lora:
    """Fresh adapters for `params`, initialised exactly as PEFT does.

    targets: fnlm leaf names ("q", "gate", "embed", "lm_head", or paths "layers.0.attn.q"),
        transformers names ("q_proj", "model.layers.0.mlp.down_proj"), a regex string, or
        "all-linear". Linear A is kaiming-uniform(a=sqrt(5)) and B zero; the embedding's A is
        zero and B standard normal. The values equal PEFT's after `torch.manual_seed(seed);
        get_peft_model(model, LoraConfig(...))` (drawn from a private CPU generator, in the order
        PEFT visits the modules), so the global RNG is untouched.
        Mixture-of-experts models: per-expert names adapt the expert stacks as peft 0.21 does
        (Mixtral, Qwen3-MoE: gate and up together, as one "gate_up" adapter of rank 2r and alpha
        2·alpha, recorded in rank_pattern / alpha_pattern as peft records it); "all-linear" adds the
        routers there; stacks are also named "experts.gate_up" / "experts.down" (see `select`).
    scale: alpha / r, or alpha / sqrt(r) with rslora. rank_pattern / alpha_pattern: {pattern: value}
        per module, matched as PEFT matches them (see `LoraConfig`).
    bias: "none", "all" (every bias of the model trainable) or "lora_only" (those of adapted modules).
    modules_to_save: modules trained in full (e.g. ("lm_head",)): a trainable copy replaces them.
    dtype: of A and B (fp32 by default, as PEFT keeps adapters over a 16-bit base).

    Returns a `Lora` whose tensors (all requiring grad) sit on the base weights' device.
    Raises LoraError for a target that names no module or a non-matrix weight, for only one of an
    MoE model's gate / up expert projections, or for dropout on routers or experts (peft refuses
    it there); ArgumentError for invalid r, dropout or bias.
    """
    config = params.config
    _check_arguments(r, dropout, bias, rank_pattern)
    if bias == "all" and not family_naming(config.model_type, "PEFT_BIAS_ALL", True):
        raise LoraError(
            f"lora.init: bias='all' is not supported for {config.model_type}: peft's 'all' also "
            "trains biases fnlm keeps frozen here (gpt-oss: router and expert biases); use "
            "bias='lora_only' or 'none'"
        )
    if isinstance(targets, list):
        targets = tuple(targets)
    adapted = select(config, targets, "targets")
    saved = select(config, tuple(modules_to_save), "modules_to_save") if modules_to_save else []
    _check_modules(adapted, saved, dropout)
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    if {"gate", "up"} <= expert_parts(config, targets) and config.moe_layers:
        # peft's conversion: the gate and up adapters of each expert, fused, are one adapter of
        # twice the rank (alpha doubled too, keeping alpha / r) on the gate_up stack.
        fused = r".*\.gate_up_proj"
        rank_pattern.setdefault(fused, 2 * r)
        alpha_pattern.setdefault(fused, 2 * alpha)
    lora_config = LoraConfig(
        r=r,
        alpha=alpha,
        targets=targets,
        dropout=float(dropout),
        bias=bias,
        rslora=rslora,
        modules_to_save=tuple(modules_to_save),
        rank_pattern=tuple(rank_pattern.items()),
        alpha_pattern=tuple(alpha_pattern.items()),
        base_model_name_or_path=base_model_name_or_path,
    )
    tree: dict = {"layers": [{} for _ in range(config.num_layers)]}
    generator = torch.Generator().manual_seed(seed)
    for module in adapted:
        rank = pattern_value(lora_config.rank_pattern, module.names, r)
        a, b = _initial_adapter(module, rank, generator)
        if module.experts:
            a, b = from_peft_layout(a, b, module.experts)
        device = get_path(params, module.weight).device
        adapter = {"a": _trainable(a, dtype, device), "b": _trainable(b, dtype, device)}
        set_path(tree, module.weight, adapter)
    _copy_trained_modules(tree, params, adapted, saved, bias)
    return Lora(tree, lora_config, config)


def _check_arguments(r, dropout, bias, rank_pattern) -> None:
    """ArgumentError for an invalid r, dropout, bias mode or rank_pattern value."""
    if not isinstance(r, int) or r <= 0:
        raise ArgumentError(f"lora.init: r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ArgumentError(f"lora.init: dropout must lie in [0, 1), got {dropout!r}")
    if bias not in BIAS_MODES:
        raise ArgumentError(f"lora.init: bias must be one of {BIAS_MODES}, got {bias!r}")
    for key, value in (rank_pattern or {}).items():
        if not isinstance(value, int) or value <= 0:
            raise ArgumentError(
                f"lora.init: rank_pattern[{key!r}] must be a positive integer, got {value!r}"
            )


def _check_modules(adapted: list[Module], saved: list[Module], dropout: float) -> None:
    """LoraError for a target peft would refuse: dropout on a router or expert stack, a norm
    weight, a module both adapted and saved, a router or stack in modules_to_save."""
    for module in adapted:
        if module.parameter is not None and dropout:
            raise LoraError(
                f"lora.init: dropout={dropout} with target {path_name(module.weight)} "
                f"({module.target}): peft adapts routers and expert stacks through its ParamWrapper, "
                "which refuses dropout; use dropout=0 or leave them out of targets"
            )
        if not adaptable(module):
            raise LoraError(
                f"lora.init: target {path_name(module.weight)} ({module.name}) is a norm weight of "
                f"shape {module.shape}; LoRA adapts linear layers, embed and lm_head (train norms "
                "with modules_to_save)"
            )
        if module in saved:
            raise LoraError(
                f"lora.init: {path_name(module.weight)} is both a target and in modules_to_save; pick one"
            )
    for module in saved:
        if module.parameter is not None:
            raise LoraError(
                f"lora.init: modules_to_save names {path_name(module.weight)} ({module.target}), a "
                "router or expert stack; modules_to_save takes whole modules such as lm_head"
            )


def _copy_trained_modules(
    tree: dict, params: Params, adapted: list[Module], saved: list[Module], bias: str
) -> None:
    """Trainable copies of the modules_to_save (weight and bias) and, with bias="all" /
    "lora_only", of every bias / those of adapted modules, set into `tree`."""
    for module in saved:
        for path in (module.weight, module.bias):
            if path is not None:
                set_path(tree, path, _trainable_copy(get_path(params, path)))
    if bias != "none":
        owners = module_table(params.config) if bias == "all" else adapted
        for module in owners:
            if module.bias is not None and module not in saved:
                set_path(tree, module.bias, _trainable_copy(get_path(params, module.bias)))


def _initial_adapter(module: Module, r: int, generator: torch.Generator):
    """(A, B) as PEFT leaves them, consuming the generator exactly as PEFT consumes the global RNG
    (an expert stack's in peft's layout: A [E·r, in], B [out, r·E], see `from_peft_layout`)."""
    in_features, out_features = module.io()
    r = r * max(module.experts, 1)  # ParamWrapper: nn.Linear(in, r·E), nn.Linear(r·E, out)
    if module.embedding:
        # Embedding.update_layer draws randn A and B, then reset_lora_parameters zeroes A and
        # redraws B from a standard normal.
        torch.randn((r, in_features), generator=generator)
        torch.randn((out_features, r), generator=generator)
        return torch.zeros(r, in_features), torch.randn((out_features, r), generator=generator)
    # nn.Linear(in, r) and nn.Linear(r, out) initialise themselves on construction, then
    # reset_lora_parameters draws A again (kaiming-uniform, a=sqrt(5)) and zeroes B.
    _kaiming((r, in_features), generator)
    _kaiming((out_features, r), generator)
    return _kaiming((r, in_features), generator), torch.zeros(out_features, r)


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t


def _trainable(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype).requires_grad_(True)


def _trainable_copy(w) -> torch.Tensor:
    return quant.dequantize(w).detach().clone().requires_grad_(True)
