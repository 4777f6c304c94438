"""Adapters trained under transformers 4, where each expert was an nn.Linear of its own,
converted to the stacked layout peft 0.21 reads (a family declares its transformers-4 names in
fnlm.models.<family>.LEGACY_EXPERTS)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from fnlm.config import ModelConfig
from fnlm.errors import LoraError
from fnlm.lora.peft_format import (
    PEFT_PREFIX,
    expect_rank,
    expect_shape,
    json_number,
    parameter_keys,
    to_peft_layout,
)
from fnlm.lora.targets import Module, family_naming, modules_by_path
from fnlm.lora.tree import pattern_value
from fnlm.models import moe

_STACK_OF_PART = {"gate": "gate_up", "up": "gate_up", "down": "down"}


@dataclass
class _LegacyFactor:
    """One transformers-4 expert Linear's (or router's) lora_A / lora_B as read from the file."""

    name: str  # its transformers 4 module name, which the file's rank/alpha patterns match
    a: tuple[str, torch.Tensor] | None = None  # (key, [r, in])
    b: tuple[str, torch.Tensor] | None = None  # (key, [out, r])


def convert_legacy_experts(
    tensors: dict[str, torch.Tensor], doc: dict, config: ModelConfig
) -> tuple[dict[str, torch.Tensor], dict]:
    """Rewrite a transformers-4 adapter's per-expert factors (".experts.3.w1.lora_A.weight",
    ".experts.3.gate_proj.lora_A.weight") and routers (Mixtral's ".block_sparse_moe.gate") into the
    stacked layout peft 0.21 reads: (tensors, adapter_config) as if peft had written them.

    As peft.utils.transformers_weight_conversion does: expert e of the gate_up stack gets
    A_e = [A_gate_e; A_up_e] and B_e = blockdiag(B_gate_e, B_up_e), at rank r_gate + r_up with
    alpha scaled alike, so that alpha/r is unchanged; the down stack takes A_e, B_e as they are.
    Beyond peft, the result is always what the adapter computed under transformers 4: with
    use_rslora the stack's alpha keeps alpha/sqrt(rank) (peft's 2·alpha multiplies gate and up by
    sqrt(2)); an expert or a projection absent from the file contributes zero rows (peft refuses
    such a file); rank_pattern / alpha_pattern apply per transformers-4 module, and where the
    experts of a stack differ in rank or scale, the factors are zero-padded to the largest rank
    and B carries the ratio of the expert's scale to the stack's (peft ignores those patterns);
    Qwen2-MoE is converted too (peft 0.21 drops its experts' factors, keeping the shared expert's).
    The new entries go first in rank_pattern / alpha_pattern, under each stack's full name.
    """
    # (the MoE block's name under transformers 4, {expert projection's name there: fnlm part})
    legacy = family_naming(config.model_type, "LEGACY_EXPERTS")
    if legacy is None or not config.moe_layers:
        return tensors, doc
    experts, routers, kept = _collect(tensors, doc, config, *legacy)
    if not experts and not routers:
        return tensors, doc
    reading = _Reading.of(doc, config)
    by_path = modules_by_path(config)
    stacked: dict[Module, tuple[torch.Tensor, torch.Tensor]] = {}  # fnlm's [E, R, in], [E, out, R]
    alphas: dict[Module, float] = {}
    for layer in sorted({layer for layer, _ in experts}):
        for stack in moe.STACKS:
            parts = [p for p in ("gate", "up", "down") if _STACK_OF_PART[p] == stack]
            module = by_path[("layers", layer, "mlp", "experts", stack)]
            found = {p: experts.get((layer, p), {}) for p in parts}
            if any(found.values()):
                stacked[module], alphas[module] = reading.stack(module, found)
    for layer, factor in routers.items():
        module = by_path[("layers", layer, "mlp", "router")]
        a, b, _, alphas[module] = reading.checked(factor, config.hidden_size, config.num_experts)
        stacked[module] = (a, b)
    return _rewrite(kept, doc, config, stacked, alphas)


def _collect(
    tensors: dict[str, torch.Tensor],
    doc: dict,
    config: ModelConfig,
    block: str,
    projections: dict[str, str],
) -> tuple[dict, dict, dict]:
    """The file's transformers-4 factors: ({(layer, part): {expert: factor}}, {layer: router
    factor}, {key: tensor} of every other tensor). Routers that target_parameters already name
    (peft 0.21 wrote them) stay as they are."""
    expert_key = re.compile(
        rf"model\.layers\.(\d+)\.{block}\.experts\.(\d+)\.({'|'.join(projections)})"
        r"\.lora_([AB])\.weight"
    )
    router_key = re.compile(rf"model\.layers\.(\d+)\.{block}\.gate\.lora_([AB])\.weight")
    covered = set(parameter_keys(config, doc.get("target_parameters") or ()).values())
    by_path = modules_by_path(config)
    experts: dict[tuple[int, str], dict[int, _LegacyFactor]] = {}
    routers: dict[int, _LegacyFactor] = {}
    kept: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if match := expert_key.fullmatch(name):
            layer, expert, projection, half = match.groups()
            layer, expert = _moe_layer(config, key, int(layer)), int(expert)
            if expert >= config.num_experts:
                raise LoraError(
                    f"adapter tensor {key} adapts expert {expert}, but this {config.model_type} "
                    f"model has {config.num_experts} experts per layer (0..{config.num_experts - 1})"
                )
            slot = experts.setdefault((layer, projections[projection]), {})
            factor = slot.setdefault(expert, _LegacyFactor(name.rpartition(".lora_")[0]))
        elif (match := router_key.fullmatch(name)) and (
            by_path.get(("layers", int(match.group(1)), "mlp", "router")) not in covered
        ):
            layer, half = _moe_layer(config, key, int(match.group(1))), match.group(2)
            factor = routers.setdefault(layer, _LegacyFactor(name.rpartition(".lora_")[0]))
        else:
            kept[key] = tensor
            continue
        setattr(factor, half.lower(), (key, tensor))
    return experts, routers, kept


def _moe_layer(config: ModelConfig, key: str, layer: int) -> int:
    if layer not in config.moe_layers:
        raise LoraError(
            f"adapter tensor {key} adapts an expert of layer {layer}, but layer {layer} of this "
            f"{config.model_type} model is not a mixture-of-experts layer (those are "
            f"{list(config.moe_layers)}); was the adapter trained for another base model?"
        )
    return layer


@dataclass(frozen=True)
class _Reading:
    """What a transformers-4 file's factors are checked and scaled by: its r, lora_alpha,
    use_rslora, rank_pattern and alpha_pattern (matched against transformers-4 module names)."""

    config: ModelConfig
    r: int
    alpha: float
    rslora: bool
    rank_pattern: tuple
    alpha_pattern: tuple

    @classmethod
    def of(cls, doc: dict, config: ModelConfig) -> _Reading:
        return cls(
            config,
            int(doc.get("r", 8)),
            doc.get("lora_alpha", 8),
            bool(doc.get("use_rslora", False)),
            tuple((doc.get("rank_pattern") or {}).items()),
            tuple((doc.get("alpha_pattern") or {}).items()),
        )

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def checked(self, factor: _LegacyFactor, in_features: int, out_features: int):
        """(A, B, rank, alpha) of one transformers-4 Linear, checked against its config."""
        if factor.a is None or factor.b is None:
            key, _ = factor.a or factor.b
            raise LoraError(
                f"adapter tensor {key} has no {'lora_B' if factor.a else 'lora_A'} partner"
            )
        (key_a, a), (key_b, b) = factor.a, factor.b
        rank = a.shape[0] if a.dim() == 2 else -1
        base = (
            f"{factor.name} of this {self.config.model_type} model (in {in_features}, out "
            f"{out_features}; lora_A [r, in], lora_B [out, r])"
        )
        expect_shape(key_a, a, (rank, in_features), base)
        expect_shape(key_b, b, (out_features, rank), base)
        want = pattern_value(self.rank_pattern, (factor.name,), self.r)
        expect_rank(key_a, rank, want, factor.name)
        return a, b, rank, pattern_value(self.alpha_pattern, (factor.name,), self.alpha)

    def stack(self, module: Module, found: dict[str, dict[int, _LegacyFactor]]):
        """((A [E, R, in], B [E, out, R]), alpha) of one expert stack from its parts' per-expert
        factors: A_e the parts' A stacked, B_e block-diagonal (gate rows, then up rows); R the sum
        of each part's largest rank, smaller ranks zero-padded."""
        hidden, inner = self.config.hidden_size, self.config.expert_size
        io = {"gate": (hidden, inner), "up": (hidden, inner), "down": (inner, hidden)}
        factors = {p: {e: self.checked(f, *io[p]) for e, f in found[p].items()} for p in found}
        part_ranks = {p: max((f[2] for f in factors[p].values()), default=0) for p in found}
        total = sum(part_ranks.values())
        # The stack's scale is the first factor's; its alpha is chosen so that alpha/rank
        # (alpha/sqrt(rank) with rslora) gives it: 2·alpha at rank 2r, as peft writes it.
        reference = next(f for p in found for f in factors[p].values())
        ref_rank, ref_alpha = reference[2], reference[3]
        ratio = math.sqrt(total / ref_rank) if self.rslora else total / ref_rank
        experts, out_features, in_features = module.shape
        a = torch.zeros(experts, total, in_features, dtype=reference[0].dtype)
        b = torch.zeros(experts, out_features, total, dtype=reference[1].dtype)
        row = column = 0
        for p in found:
            rows = io[p][1]
            for e, (a_e, b_e, rank, alpha_e) in factors[p].items():
                if (rank, alpha_e) != (ref_rank, ref_alpha):
                    b_e = b_e * (self.scale(rank, alpha_e) / self.scale(ref_rank, ref_alpha))
                a[e, column : column + rank] = a_e
                b[e, row : row + rows, column : column + rank] = b_e
            row, column = row + rows, column + part_ranks[p]
        return (a, b), ref_alpha * ratio


def _rewrite(
    kept: dict[str, torch.Tensor],
    doc: dict,
    config: ModelConfig,
    stacked: dict[Module, tuple[torch.Tensor, torch.Tensor]],
    alphas: dict[Module, float],
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) as peft 0.21 would have written them: the stacks' and routers'
    factors under their ParamWrapper keys, target_parameters extended, and their rank / alpha
    first in rank_pattern / alpha_pattern under each target's full name."""
    target_parameters = list(doc.get("target_parameters") or ()) + [m.target for m in stacked]
    keys = {m: key for key, m in parameter_keys(config, target_parameters).items()}
    ranks: dict[str, int] = {}
    for module, (a, b) in stacked.items():
        ranks[re.escape(module.target)] = a.shape[-2] if module.experts else a.shape[0]
        if module.experts:
            a, b = to_peft_layout(a, b)
        for half, tensor in (("lora_A", a), ("lora_B", b)):
            key = f"{PEFT_PREFIX}{keys[module]}.{half}.weight"
            if key in kept:
                raise LoraError(
                    f"adapter tensor {key} is in the file, and so are the per-expert tensors that "
                    f"make up {module.target}; a file holds one or the other"
                )
            kept[key] = tensor
    alpha_entries = {re.escape(m.target): json_number(alpha) for m, alpha in alphas.items()}
    doc = dict(doc)
    doc["target_parameters"] = target_parameters
    for field, entries in (("rank_pattern", ranks), ("alpha_pattern", alpha_entries)):
        old = doc.get(field) or {}
        doc[field] = {**entries, **{k: v for k, v in old.items() if k not in entries}}
    return kept, doc
