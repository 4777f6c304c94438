"""LoRA adapters as a second pytree over the params, PEFT-compatible both ways.

    lora = fnlm.lora.init(params, r=16, alpha=16, targets=fnlm.lora.ALL_LINEAR, seed=3407)
    logits = fnlm.forward(params, tokens, lora=lora)         # adapters applied unmerged
    loss = fnlm.loss(params, batch, lora=fnlm.lora.train_mode(lora))   # dropout on
    fnlm.lora.save("out/adapter", lora)                      # PEFT's adapter_config.json + safetensors
    lora = fnlm.lora.load("out/adapter", params)              # or any adapter PEFT wrote
    merged = fnlm.lora.merge(params, lora)                    # plain 16-bit params

A `Lora` holds, at the same paths as the params leaves they adapt:

    lora["layers"][i]["attn"]["q"] = {"a": [r, in], "b": [out, r]}     # adapted linear
    lora["embed"] = {"a": [r, vocab], "b": [hidden, r]}                # PEFT's lora_embedding_A/B
    lora["lm_head"] = tensor                                            # modules_to_save: a full copy
    lora["layers"][i]["attn"]["q_bias"] = tensor                        # bias="all" / "lora_only"
    lora["layers"][i]["mlp"]["experts"]["gate_up"] = {"a": [E, r, in], "b": [E, out, r]}  # MoE
    lora["layers"][i]["mlp"]["router"] = {"a": [r, hidden], "b": [experts, r]}

Mixture-of-experts layers are adapted as peft 0.21 adapts transformers 5's fused experts
(`target_parameters`, peft's `ParamWrapper`): one low-rank pair per expert for each stack
("gate_up", "down"; see fnlm.models.moe), applied by a `LoraExperts` leaf, saved in peft's layout
(lora_A [E·r, in], lora_B [out, r·E], nested wrappers when both stacks of a layer are adapted).
Which targets reach the experts follows peft: see `_select`.

Its leaves are the only tensors that require grad; the base params stay frozen (and quantized).
`attach(params, lora)` swaps each adapted leaf for a `LoraLinear` / `LoraEmbedding` that the
decoder calls through `.linear` / `.embedding`, and replaced leaves for the lora's copies.
Paths map to PEFT's key names through the family's `weight_names(config)`, so every
architecture works without a table of its own.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from fnlm import quant
from fnlm.config import ModelConfig
from fnlm.errors import ArgumentError, LoraError
from fnlm.lora.linear import lora_linear
from fnlm.models import moe
from fnlm.params import Params, get_path, path_name, set_path

__all__ = [
    "ALL_LINEAR",
    "Lora",
    "LoraConfig",
    "LoraEmbedding",
    "LoraExperts",
    "LoraLinear",
    "SavedEmbedding",
    "attach",
    "init",
    "load",
    "merge",
    "parameters",
    "save",
    "target_names",
    "train_mode",
]

# Every linear of attention and MLP; "qkv" and "gate_up" are the fused leaves of Phi-3 / Falcon.
ALL_LINEAR = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
BIAS_MODES = ("none", "all", "lora_only")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
# PeftModelForCausalLM wraps LoraModel wraps the transformers model: every saved key starts so.
PEFT_PREFIX = "base_model.model."
# The adapter_config.json layout written here is that of this peft release.
PEFT_FORMAT_VERSION = "0.21.2"
# PEFT's shorthand for "every linear layer except the output layer".
ALL_LINEAR_SHORTHAND = "all-linear"
# Base embedding weights stored in an adapter file (PEFT saves them when embed/lm_head are
# targeted) must equal the base model's; the file may hold an fp32 copy of a bf16 base, so
# compare to bf16 rounding (relative to the weights' scale).
BASE_WEIGHT_REL_TOL = 1e-2

# Within a decoder layer, the order transformers creates (and PEFT visits) the modules in; PEFT
# draws the initial A of each adapter from the global RNG in this order.
_LAYER_ORDER = (
    "attn", "mlp", "q", "k", "v", "qkv", "o",
    "router", "experts", "shared", "shared_gate", "gate", "up", "gate_up", "down",
)  # fmt: skip
# Families whose modules transformers creates in another order (Phi-3: o_proj before qkv_proj).
_LAYER_ORDER_OF = {"phi3": ("attn", "mlp", "o", "qkv", "gate_up", "down")}


# ---------------------------------------------------------------------------------------------
# The Lora pytree and its static config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraConfig:
    """Static description of an adapter (PEFT's LoraConfig fields, in fnlm's names).

    targets: module names as given (fnlm leaf names like "q", HF names like "q_proj", full names,
    or PEFT's regex string); informational once the adapter exists, the tensors say what is
    adapted. rank_pattern / alpha_pattern: (pattern, value) pairs matched as PEFT does (a pattern
    matches a module whose name, fnlm path "layers.0.attn.q" or HF "model.layers.0.self_attn.q_proj",
    ends with it as a regex); the first match wins, else r / alpha.
    """

    r: int = 16
    alpha: float = 16
    targets: tuple[str, ...] | str = ALL_LINEAR
    dropout: float = 0.0
    bias: str = "none"
    rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    base_model_name_or_path: str | None = None

    def scale(self, r: int, names: tuple[str, ...]) -> float:
        """The factor on B·A of a module of rank r: alpha/r, or alpha/sqrt(r) with rslora."""
        alpha = _pattern_value(self.alpha_pattern, names, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r


class Lora(dict):
    """Adapters at the params' paths, with the static `LoraConfig`, the `ModelConfig` they were
    made for (for names when saving) and `training` (dropout on the adapter inputs when True)."""

    def __init__(
        self, tree: dict, config: LoraConfig, model_config: ModelConfig, training: bool = False
    ):
        super().__init__(tree)
        self.config = config
        self.model_config = model_config
        self.training = training

    def __repr__(self) -> str:
        adapted = sum(1 for _, node in _entries(self) if isinstance(node, dict))
        n = sum(t.numel() for t in pytree.tree_leaves(self))
        mode = ", training" if self.training else ""
        return (
            f"Lora(r={self.config.r}, alpha={self.config.alpha}, {adapted} adapted modules, "
            f"{n:,} trainable elements{mode})"
        )


def _flatten(lora: Lora):
    keys = tuple(lora.keys())
    return [lora[k] for k in keys], (keys, lora.config, lora.model_config, lora.training)


def _unflatten(values, context) -> Lora:
    keys, config, model_config, training = context
    return Lora(dict(zip(keys, values, strict=True)), config, model_config, training)


def _flatten_with_keys(lora: Lora):
    values, context = _flatten(lora)
    return [(pytree.MappingKey(k), v) for k, v in zip(context[0], values, strict=True)], context


pytree.register_pytree_node(
    Lora,
    _flatten,
    _unflatten,
    serialized_type_name="fnlm.lora.Lora",
    flatten_with_keys_fn=_flatten_with_keys,
)


def train_mode(lora: Lora, enabled: bool = True) -> Lora:
    """The same adapters (no copies) with dropout on (`enabled`) or off. forward/loss stay pure:
    the mode is part of their input. `fnlm.loss(params, batch, lora=train_mode(lora))`."""
    return Lora(lora, lora.config, lora.model_config, training=enabled)


def parameters(lora: Lora) -> list[torch.Tensor]:
    """The trainable tensors, in a stable order: `torch.optim.AdamW(fnlm.lora.parameters(lora))`."""
    return pytree.tree_leaves(lora)


# ---------------------------------------------------------------------------------------------
# Adapted leaves: what the decoder sees after `attach`
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoraLinear:
    """A linear weight W (dense or quantized) plus scale·B·A, with dropout on the adapter input
    in training: y = x W^T + bias + scale · (dropout(x) A^T) B^T, as PEFT's lora.Linear computes it
    (the adapter path in the adapters' dtype, the sum cast back to the base output's dtype)."""

    weight: Any  # [out, in] tensor or quantized leaf
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    dropout: float = 0.0
    training: bool = False

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.weight.shape)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return lora_linear(
            x, self.weight, self.a, self.b, self.scale, bias,
            dropout=self.dropout, training=self.training,
        )  # fmt: skip

    def merged_weight(self) -> torch.Tensor:
        """W + scale·B·A [out, in] in W's compute dtype (summed in fp32); differentiable in A, B.
        Used for the lm head by the fused cross-entropy, which never sees the adapter input, so
        no dropout applies there."""
        w = quant.dequantize(self.weight)
        delta = (self.b.float() @ self.a.float()) * self.scale
        return (w.float() + delta).to(w.dtype)


@dataclass(frozen=True, eq=False)
class LoraEmbedding:
    """An embedding table W [vocab, hidden] plus PEFT's embedding adapter: rows of A^T [vocab, r]
    looked up per token, times B^T [r, hidden], times scale. PEFT applies no dropout here."""

    weight: Any  # [vocab, hidden]
    a: torch.Tensor  # [r, vocab]
    b: torch.Tensor  # [hidden, r]
    scale: float
    padding_idx: int | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.weight.shape)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        base = F.embedding(tokens, quant.dequantize(self.weight))
        # padding_idx only zeroes the gradient of the pad row, as in transformers' nn.Embedding
        # (PEFT passes the base layer's padding_idx to the adapter lookup too).
        after_a = F.embedding(tokens, self.a.t(), padding_idx=self.padding_idx)
        delta = (after_a @ self.b.t()) * self.scale
        return (base + delta).to(base.dtype)

    def merged_weight(self) -> torch.Tensor:
        w = quant.dequantize(self.weight)
        delta = (self.b.float() @ self.a.float()).t() * self.scale
        return (w.float() + delta).to(w.dtype)


@dataclass(frozen=True, eq=False)
class LoraExperts:
    """An expert stack W (dense [E, out, in] or quantized [E·out, in]) plus, per expert e,
    scale·B_e·A_e: each sorted row x of expert e gives x W_e^T + scale · (x A_e^T) B_e^T, the
    adapter path in the adapters' dtype and the sum cast back to the base output's dtype (as
    LoraLinear). The decoder calls `expert_matmul` instead of `moe.matmul` for such a leaf.
    peft's ParamWrapper adds the same delta to W before its matmul; no dropout (peft refuses it)."""

    weight: Any  # [E, out, in] tensor or quantized [E·out, in]
    a: torch.Tensor  # [E, r, in]
    b: torch.Tensor  # [E, out, r]
    scale: float

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.weight.shape)

    def expert_matmul(self, route: moe.Route, rows: torch.Tensor) -> torch.Tensor:
        """rows [P, in] sorted by expert (see moe.Route) -> [P, out]; differentiable in rows, a, b."""
        base = moe.matmul(route, rows, self.weight)
        after_a = moe.matmul(route, rows.to(self.a.dtype), self.a)
        delta = moe.matmul(route, after_a, self.b) * self.scale
        return (base + delta).to(base.dtype)

    def delta(self, expert: int | None = None) -> torch.Tensor:
        """scale·B_e·A_e in fp32: [out, in] of one expert, or [E, out, in] of all (None)."""
        if expert is not None:
            return (self.b[expert].float() @ self.a[expert].float()) * self.scale
        return torch.einsum("eor,eri->eoi", self.b.float(), self.a.float()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + scale·B_e·A_e per expert, [E, out, in] in W's compute dtype (summed in fp32)."""
        w = moe.dense(self.weight, self.a.shape[0])
        return (w.float() + self.delta()).to(w.dtype)


@dataclass(frozen=True, eq=False)
class SavedEmbedding:
    """A trainable copy of the embedding table (modules_to_save). transformers' nn.Embedding has
    padding_idx = pad_token_id, so the pad row gets no gradient; the copy keeps that."""

    weight: torch.Tensor  # [vocab, hidden]
    padding_idx: int | None = None

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight, padding_idx=self.padding_idx)

    def merged_weight(self) -> torch.Tensor:
        return self.weight


pytree.register_pytree_node(
    SavedEmbedding,
    lambda e: ([e.weight], e.padding_idx),
    lambda values, padding_idx: SavedEmbedding(values[0], padding_idx),
    serialized_type_name="fnlm.lora.SavedEmbedding",
    flatten_with_keys_fn=lambda e: ([(pytree.GetAttrKey("weight"), e.weight)], e.padding_idx),
)


def _register_adapted(cls, statics: tuple[str, ...]) -> None:
    def flatten(leaf):
        return [leaf.weight, leaf.a, leaf.b], tuple(getattr(leaf, s) for s in statics)

    def unflatten(values, context):
        return cls(*values, **dict(zip(statics, context, strict=True)))

    def flatten_with_keys(leaf):
        values, context = flatten(leaf)
        keys = [pytree.GetAttrKey(k) for k in ("weight", "a", "b")]
        return list(zip(keys, values, strict=True)), context

    pytree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        serialized_type_name=f"fnlm.lora.{cls.__name__}",
        flatten_with_keys_fn=flatten_with_keys,
    )


_register_adapted(LoraLinear, ("scale", "dropout", "training"))
_register_adapted(LoraEmbedding, ("scale", "padding_idx"))
_register_adapted(LoraExperts, ("scale",))


# ---------------------------------------------------------------------------------------------
# Module table: params paths <-> transformers module names, from the family's weight_names
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Module:
    name: str  # transformers module name, "model.layers.0.self_attn.q_proj"
    weight: tuple  # param path of its weight, ("layers", 0, "attn", "q")
    shape: tuple[
        int, ...
    ]  # weight shape as stored: [out, in], [vocab, hidden] for embed, [E, out, in]
    bias: tuple | None = None  # param path of its bias
    bias_shape: tuple[int, ...] | None = None
    # peft adapts the parameter `parameter` of module `name` (target_parameters, ParamWrapper):
    # "gate_up_proj" / "down_proj" of "model.layers.0.mlp.experts", "weight" of a router
    parameter: str | None = None
    experts: int = 0  # an expert stack's E

    @property
    def embedding(self) -> bool:
        return self.weight == ("embed",)

    @property
    def target(self) -> str:
        """The name peft matches targets and rank/alpha patterns against (for a parameter target
        its full name, "model.layers.0.mlp.experts.gate_up_proj")."""
        return f"{self.name}.{self.parameter}" if self.parameter else self.name

    @property
    def names(self) -> tuple[str, str]:
        """The names patterns and targets match against: fnlm path, then transformers name."""
        return (path_name(self.weight), self.target)

    def io(self) -> tuple[int, int]:
        """(in_features, out_features) in PEFT's sense (an embedding's in is the vocabulary; an
        expert stack's are one expert's)."""
        if self.embedding:
            return self.shape[0], self.shape[1]
        return self.shape[-1], self.shape[-2]


# Families whose per-expert targets peft 0.21 rewrites into target_parameters on transformers 5's
# fused experts (peft.utils.transformers_weight_conversion: its per-expert names -> fnlm's parts).
# qwen2_moe is not among them: transformers maps no conversion pattern to qwen2_moe itself (only to
# the families built like it), so peft adapts a qwen2_moe's shared expert and dense MLPs as plain
# linear layers and reaches its experts only through explicit target_parameters.
_PEFT_EXPERT_NAMES = {
    "mixtral": {"w1": "gate", "w3": "up", "w2": "down"},
    "qwen3_moe": {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
}
# Within a MoE layer, the order peft visits its parameter targets: transformers' module order
# (Mixtral and Qwen2-MoE create the router before the experts, Qwen3-MoE after), then the experts'
# parameters as defined (gate_up_proj, then down_proj: the first one targeted is the inner wrapper).
_PARAMETER_ORDER = ("router", "gate_up", "down")
_PARAMETER_ORDER_OF = {"qwen3_moe": ("gate_up", "down", "router")}


def _order_key(model_type: str):
    """Sort key putting modules in the order PEFT visits them: embed, each layer (attention, then
    MLP), the rest, lm_head; then the parameter targets (routers, expert stacks) layer by layer."""
    order = _LAYER_ORDER_OF.get(model_type, _LAYER_ORDER)
    parameter_order = _PARAMETER_ORDER_OF.get(model_type, _PARAMETER_ORDER)

    def key(module: _Module) -> tuple:
        path = module.weight
        if module.parameter is not None:
            return (4, path[1], parameter_order.index(path[-1]))
        if path == ("embed",):
            return (0,)
        if path[0] != "layers":
            return (3,) if path == ("lm_head",) else (2,)
        rank = tuple(
            part if isinstance(part, int) else order.index(part) if part in order else len(order)
            for part in path[2:]
        )
        return (1, path[1], rank)

    return key


@lru_cache(maxsize=32)
def _modules(config: ModelConfig) -> tuple[_Module, ...]:
    """Every module with a weight, in the order PEFT visits them; MoE layers contribute their
    router and their two expert stacks as parameter targets (under transformers 5's names)."""
    from fnlm.models import family

    weights: dict[str, tuple] = {}
    biases: dict[str, tuple] = {}
    for hf_name, (path, shape) in family(config.model_type).weight_names(config).items():
        path = tuple(path)
        if moe.stack_slot(path) is not None or path[2:] == ("mlp", "router"):
            continue  # one expert's matrix, or a router: added below as parameter targets
        module, _, kind = hf_name.rpartition(".")
        (biases if kind == "bias" else weights)[module] = (path, tuple(shape))
    if "lm_head" not in weights:  # tied: same tensor as embed, but PEFT sees a module of its own
        weights["lm_head"] = (("lm_head",), (config.vocab_size, config.hidden_size))
    modules = [
        _Module(
            name,
            path,
            shape,
            biases.get(name, (None, None))[0],
            biases.get(name, (None, None))[1],
        )
        for name, (path, shape) in weights.items()
        if not _dense_mlp_peft_skips(config, path)
    ]
    for n in config.moe_layers:
        mlp = f"model.layers.{n}.mlp"  # transformers 5's name in every MoE family (Mixtral too)
        router = ("layers", n, "mlp", "router")
        modules.append(
            _Module(
                f"{mlp}.gate", router, (config.num_experts, config.hidden_size), parameter="weight"
            )
        )
        for stack in moe.STACKS:
            modules.append(
                _Module(
                    f"{mlp}.experts",
                    ("layers", n, "mlp", "experts", stack),
                    moe.stack_shape(config, stack),
                    parameter=f"{stack}_proj",
                    experts=config.num_experts,
                )
            )
    return tuple(sorted(modules, key=_order_key(config.model_type)))


def _dense_mlp_peft_skips(config: ModelConfig, path: tuple) -> bool:
    """A dense MLP module (Qwen3-MoE's mlp_only_layers) of a family whose MLP targets peft turns
    into expert target_parameters: peft drops them from target_modules, so it never adapts these."""
    return config.model_type in _PEFT_EXPERT_NAMES and path[0] == "layers" and path[2] == "mlp"


def _adaptable(module: _Module) -> bool:
    """A matrix that is not a norm weight (Cohere's per-head q/k norm weights are 2-D), or an
    expert stack."""
    if module.experts:
        return True
    return len(module.shape) == 2 and "norm" not in module.weight[-1]


@lru_cache(maxsize=32)
def _by_path(config: ModelConfig) -> dict[tuple, _Module]:
    return {m.weight: m for m in _modules(config)}


@lru_cache(maxsize=32)
def _by_name(config: ModelConfig) -> dict[str, _Module]:
    """Modules (not parameter targets) by transformers name."""
    return {m.name: m for m in _modules(config) if m.parameter is None}


def _short_name(module: _Module, peft_names: bool) -> str:
    return module.name.rpartition(".")[2] if peft_names else module.weight[-1]


def _short_parameter(module: _Module) -> str:
    """The short target_parameters entry of a parameter target: "gate_up_proj", "gate.weight"."""
    if module.parameter == "weight":
        return f"{module.name.rpartition('.')[2]}.weight"
    return module.parameter


def _matches_target(target: str, names: tuple[str, ...]) -> bool:
    """PEFT's rule for a list entry: the module name equals it or ends with "." + it."""
    return any(name == target or name.endswith("." + target) for name in names)


def _pattern_value(pattern: tuple[tuple[str, Any], ...], names: tuple[str, ...], default: Any):
    """PEFT's get_pattern_key: the first key that regex-matches the end of a module name."""
    for key, value in pattern:
        if any(re.match(rf"(.*\.)?({key})$", name) for name in names):
            return value
    return default


def _expert_parts(config: ModelConfig, targets) -> set[str]:
    """The expert parts ("gate", "up", "down") that per-expert target names ask for, in a family
    whose per-expert targets peft converts: fnlm's names or the family's transformers names, bare
    or ending a longer name (peft's rule; "model.layers.0.mlp.down_proj" adapts every layer's down
    stack there too); "all-linear" asks for all three."""
    names = _PEFT_EXPERT_NAMES.get(config.model_type)
    if not names:
        return set()
    if isinstance(targets, str):
        return {"gate", "up", "down"} if targets == ALL_LINEAR_SHORTHAND else set()
    aliases = {**names, "gate": "gate", "up": "up", "down": "down"}
    return {
        part
        for target in targets
        for alias, part in aliases.items()
        if target == alias or target.endswith("." + alias)
    }


def _select(config: ModelConfig, targets, what: str) -> list[_Module]:
    """The modules `targets` names (a list of names, PEFT's regex string, or "all-linear").

    Mixture-of-experts layers follow peft 0.21 under transformers 5: in Mixtral and Qwen3-MoE,
    per-expert names (fnlm "gate"/"up"/"down", "w1"/"w3"/"w2", "gate_proj"/"up_proj"/"down_proj")
    adapt the expert stacks of every MoE layer, gate and up only together (they share the
    "gate_up" stack; `init` gives it rank 2r and alpha 2·alpha, as peft does), and "all-linear" adds
    the routers. In every MoE family a stack is also named by its own path ("experts.gate_up",
    "experts.down_proj", ...: names containing "experts", or "gate_up_proj"; peft's
    target_parameters) and a router by "router" or "gate.weight". In Qwen2-MoE the per-expert names
    adapt the shared expert and dense MLPs as linear layers (peft does not convert that family).
    A regex string is matched against each module's names, the stacks' own included."""
    modules = _modules(config)
    linear = [m for m in modules if m.parameter is None]
    parts = _expert_parts(config, targets)
    if {"gate", "up"} & parts and not {"gate", "up"} <= parts:
        one, other = ("gate", "up") if "gate" in parts else ("up", "gate")
        raise LoraError(
            f"{what} {targets!r} adapt the experts' {one} projections but not their {other} "
            f"projections; this {config.model_type} model holds both in one stack "
            "(mlp.experts.gate_up_proj), which peft adapts as a whole: name both or neither"
        )
    stacks = {"down"} if "down" in parts else set()
    if {"gate", "up"} <= parts:
        stacks.add("gate_up")
    by_part = [m for m in modules if m.experts and m.weight[-1] in stacks]
    if isinstance(targets, str):
        if targets == ALL_LINEAR_SHORTHAND:
            chosen = [m for m in linear if _adaptable(m) and m.weight[0] == "layers"]
            if config.model_type in _PEFT_EXPERT_NAMES:
                chosen += [m for m in modules if m.parameter is not None]
            return sorted(chosen, key=_order_key(config.model_type))
        chosen = [m for m in modules if any(re.fullmatch(targets, n) for n in m.names)]
        if not chosen:
            raise LoraError(
                f"{what} pattern {targets!r} matches no module of this {config.model_type} model"
            )
        return chosen
    # As in PEFT, entries that match nothing are fine (ALL_LINEAR names "gate_up" and "qkv" for
    # every family); only a list that matches nothing at all is an error.
    chosen = [m for m in linear if any(_matches_target(t, m.names) for t in targets)]
    for m in modules:
        if m.parameter is None or m in by_part:
            continue
        named = [t for t in targets if not m.experts or "experts" in t or "gate_up_proj" in t]
        if any(_matches_target(t, m.names) for t in named):
            by_part.append(m)
    chosen = sorted(chosen + by_part, key=_order_key(config.model_type))
    if not chosen:
        available = ", ".join(sorted(target_names(config)))
        raise LoraError(
            f"{what} {list(targets)} match no module of this {config.model_type} model; "
            f"names it has: {available}"
        )
    return chosen


def target_names(config: ModelConfig, *, experts: bool = False) -> dict[str, str]:
    """{fnlm leaf name: transformers module name} of the modules LoRA can adapt in this
    architecture, e.g. {"q": "q_proj", ..., "embed": "embed_tokens", "lm_head": "lm_head"}; each
    name works alone as a target, in fnlm and in peft's target_modules alike. Qwen2-MoE lists
    its shared expert and dense MLPs here (peft adapts them as linear layers).

    experts: also the mixture-of-experts parameter targets, {fnlm target: peft target_parameters
        entry}: {"experts.gate_up": "gate_up_proj", "experts.down": "down_proj", "router":
        "gate.weight"}. They are apart because peft adapts them through its ParamWrapper, which
        refuses dropout, and because in Mixtral / Qwen3-MoE the per-expert names ("gate", "up",
        "down", "w1"...) reach them too (gate and up only together; see `_select`).
    """
    names = {
        m.weight[-1]: _short_name(m, True)
        for m in _modules(config)
        if m.parameter is None and _adaptable(m)
    }
    if experts:
        for m in _modules(config):
            if m.parameter is not None:
                fnlm_name = "router" if m.weight[-1] == "router" else f"experts.{m.weight[-1]}"
                names[fnlm_name] = _short_parameter(m)
    return names


# ---------------------------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------------------------


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
        routers there; stacks are also named "experts.gate_up" / "experts.down" (see `_select`).
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
    if not isinstance(r, int) or r <= 0:
        raise ArgumentError(f"lora.init: r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ArgumentError(f"lora.init: dropout must lie in [0, 1), got {dropout!r}")
    if bias not in BIAS_MODES:
        raise ArgumentError(f"lora.init: bias must be one of {BIAS_MODES}, got {bias!r}")
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key, value in (pattern or {}).items():
            if name == "rank_pattern" and (not isinstance(value, int) or value <= 0):
                raise ArgumentError(
                    f"lora.init: {name}[{key!r}] must be a positive integer, got {value!r}"
                )
    if isinstance(targets, list):
        targets = tuple(targets)
    adapted = _select(config, targets, "targets")
    saved = _select(config, tuple(modules_to_save), "modules_to_save") if modules_to_save else []
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    if {"gate", "up"} <= _expert_parts(config, targets) and config.moe_layers:
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
    for module in adapted:
        if module.parameter is not None and dropout:
            raise LoraError(
                f"lora.init: dropout={dropout} with target {path_name(module.weight)} "
                f"({module.target}): peft adapts routers and expert stacks through its ParamWrapper, "
                "which refuses dropout; use dropout=0 or leave them out of targets"
            )
        if not _adaptable(module):
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

    tree: dict = {"layers": [{} for _ in range(config.num_layers)]}
    generator = torch.Generator().manual_seed(seed)
    for module in adapted:
        rank = _pattern_value(lora_config.rank_pattern, module.names, r)
        a, b = _initial_adapter(module, rank, generator)
        if module.experts:
            a, b = _from_peft_layout(a, b, module.experts)
        device = get_path(params, module.weight).device
        set_path(
            tree,
            module.weight,
            {"a": _trainable(a, dtype, device), "b": _trainable(b, dtype, device)},
        )
    for module in saved:
        for path in (module.weight, module.bias):
            if path is not None:
                set_path(tree, path, _trainable_copy(get_path(params, path)))
    if bias != "none":
        owners = _modules(config) if bias == "all" else adapted
        for module in owners:
            if module.bias is not None and module not in saved:
                set_path(tree, module.bias, _trainable_copy(get_path(params, module.bias)))
    return Lora(tree, lora_config, config)


def _initial_adapter(module: _Module, r: int, generator: torch.Generator):
    """(A, B) as PEFT leaves them, consuming the generator exactly as PEFT consumes the global RNG
    (an expert stack's in peft's layout: A [E·r, in], B [out, r·E], see `_from_peft_layout`)."""
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


def _from_peft_layout(a: torch.Tensor, b: torch.Tensor, experts: int):
    """peft's ParamWrapper factors (lora_A [E·r, in], lora_B [out, r·E]) -> fnlm's per-expert
    ([E, r, in], [E, out, r]): expert e's A is rows e·r..(e+1)·r of lora_A, its B the columns
    e, e+E, e+2E, ... of lora_B (peft reshapes B to [out, r, E])."""
    rank = a.shape[0] // experts
    return (
        a.reshape(experts, rank, a.shape[1]),
        b.reshape(b.shape[0], rank, experts).permute(2, 0, 1).contiguous(),
    )


def _to_peft_layout(a: torch.Tensor, b: torch.Tensor):
    """fnlm's per-expert factors -> peft's ParamWrapper layout (inverse of `_from_peft_layout`)."""
    experts, rank, _ = a.shape
    return a.reshape(experts * rank, -1), b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t


def _trainable(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype).requires_grad_(True)


def _trainable_copy(w) -> torch.Tensor:
    return quant.dequantize(w).detach().clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# attach / merge
# ---------------------------------------------------------------------------------------------


def _is_adapter(node) -> bool:
    return isinstance(node, dict) and set(node) == {"a", "b"}


def _entries(lora) -> list[tuple[tuple, Any]]:
    """(path, adapter dict or replacement tensor) of every entry of a lora tree."""
    out = []

    def walk(node, path):
        if _is_adapter(node) or isinstance(node, torch.Tensor):
            out.append((path, node))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(lora, ())
    return out


def _replace_paths(params: Params, values: dict[tuple, Any], config: ModelConfig) -> Params:
    """A shallow copy of params with the leaves at `values`' paths replaced (nothing else copied)."""

    def copy(node, path):
        children = {p[len(path)] for p in values if len(p) > len(path) and p[: len(path)] == path}
        if not children:
            return values.get(path, node)
        new = list(node) if isinstance(node, list | tuple) else dict(node)
        for key in children:
            new[key] = copy(node[key], (*path, key))
        return new

    return Params(copy(dict(params), ()), config)


def _base_leaf(params: Params, path: tuple):
    try:
        return get_path(params, path)
    except (KeyError, IndexError, TypeError):
        raise LoraError(
            f"the adapter has an entry at {path_name(path)}, which this {params.config.model_type} "
            f"model ({params.config.num_layers} layers) does not have; was it made for another base model?"
        ) from None


def _check_adapter(path: tuple, node: dict, base, module: _Module | None) -> None:
    a, b = node["a"], node["b"]
    shape = tuple(base.shape)
    if module is not None and module.embedding:
        want_a, want_b = (a.shape[0], shape[0]), (shape[1], a.shape[0])
    else:
        want_a, want_b = (a.shape[0], shape[1]), (shape[0], a.shape[0])
    if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise LoraError(
            f"adapter {path_name(path)}: a {tuple(a.shape)} and b {tuple(b.shape)} do not fit the base "
            f"weight of shape {shape} (expected a (r, {want_a[1]}) and b ({want_b[0]}, r))"
        )


def _check_expert_adapter(path: tuple, node: dict, base, module: _Module) -> None:
    a, b = node["a"], node["b"]
    experts, out_features, in_features = module.shape
    stored = (experts * out_features, in_features) if quant.is_quantized(base) else module.shape
    if tuple(base.shape) != tuple(stored):
        raise LoraError(
            f"adapter {path_name(path)}: the base expert stack has shape {tuple(base.shape)}, "
            f"expected {tuple(stored)} for this model's config"
        )
    rank = a.shape[1] if a.dim() == 3 else None
    want_a, want_b = (experts, rank, in_features), (experts, out_features, rank)
    if a.dim() != 3 or b.dim() != 3 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise LoraError(
            f"adapter {path_name(path)}: a {tuple(a.shape)} and b {tuple(b.shape)} do not fit the "
            f"expert stack [{experts}, {out_features}, {in_features}] (expected a ({experts}, r, "
            f"{in_features}) and b ({experts}, {out_features}, r))"
        )


def attach(params: Params, lora: Lora, *, training: bool | None = None) -> Params:
    """Params whose adapted leaves are `LoraLinear` / `LoraEmbedding` / `LoraExperts` and whose
    saved modules and trainable biases are the lora's tensors. Cheap: nothing is copied but the
    containers on the way to a replaced leaf. `fnlm.forward` / `fnlm.loss` call it when given `lora=`.

    training: dropout on the adapter inputs; default `lora.training` (see `train_mode`).
    Raises LoraError when an entry has no counterpart in params or its shapes do not fit.
    """
    training = lora.training if training is None else training
    config = params.config
    modules = _by_path(config)
    values: dict[tuple, Any] = {}
    for path, node in _entries(lora):
        base = _base_leaf(params, path)
        module = modules.get(path)
        if not _is_adapter(node):
            if tuple(node.shape) != tuple(base.shape):
                raise LoraError(
                    f"adapter entry {path_name(path)} has shape {tuple(node.shape)} but the base "
                    f"tensor has shape {tuple(base.shape)}"
                )
            embed = module is not None and module.embedding
            values[path] = SavedEmbedding(node, _padding_idx(config)) if embed else node
            continue
        names = module.names if module is not None else (path_name(path),)
        if module is not None and module.experts:
            _check_expert_adapter(path, node, base, module)
            scale = lora.config.scale(node["a"].shape[1], names)
            a, b = _compute_copies(node["a"], node["b"], base.dtype)
            values[path] = LoraExperts(base, a, b, scale)
            continue
        _check_adapter(path, node, base, module)
        scale = lora.config.scale(node["a"].shape[0], names)
        if module is not None and module.embedding:
            values[path] = LoraEmbedding(base, node["a"], node["b"], scale, _padding_idx(config))
        else:
            a, b = _compute_copies(node["a"], node["b"], base.dtype)
            values[path] = LoraLinear(base, a, b, scale, lora.config.dropout, training)
    return _replace_paths(params, values, config)


def _compute_copies(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
    """A and B in a 16-bit base's compute dtype (differentiable casts, made once per forward
    rather than in every recomputed layer): the adapter branch runs in the input's dtype anyway
    (fnlm.lora.linear), as under mixed-precision autocast; fp32 bases keep them as is."""
    if dtype in (torch.bfloat16, torch.float16) and a.dtype != dtype:
        return a.to(dtype), b.to(dtype)
    return a, b


def _padding_idx(config: ModelConfig) -> int | None:
    pad = config.pad_token_id
    return pad if pad is not None and 0 <= pad < config.vocab_size else None


def merge(params: Params, lora: Lora) -> Params:
    """Plain params with the adapters folded in: W + scale·B·A summed in fp32 (quantized bases
    dequantized first), cast to the base's compute dtype; saved modules and biases copied in.
    The result needs no lora and holds no tensor that requires grad.

    With tied embeddings, adapting embed or lm_head unties them (the other keeps the base
    weight, as the unmerged model computes), and the config says tie_word_embeddings=False.
    """
    attached = attach(params, lora, training=False)
    values = {}
    with torch.no_grad():
        for path, _ in _entries(lora):
            leaf = get_path(attached, path)
            merged = leaf.merged_weight() if hasattr(leaf, "merged_weight") else leaf
            values[path] = merged.detach().clone()
    config = params.config
    touched = {("embed",), ("lm_head",)} & set(values)
    if config.tie_word_embeddings and touched:
        config = config.replace(tie_word_embeddings=False)
    return _replace_paths(params, values, config)


# ---------------------------------------------------------------------------------------------
# save / load in PEFT's format
# ---------------------------------------------------------------------------------------------

# adapter_config.json as peft 0.21 writes it for a plain LoRA of a causal LM; save fills in the
# adapter's own fields. Keys are sorted as PEFT sorts them.
_PEFT_DEFAULTS: dict[str, Any] = {
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

# Options of a PEFT LoRA that change its computation in ways fnlm does not implement.
_UNSUPPORTED = {
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


def _names_for(modules: list[_Module], config: ModelConfig) -> list[str]:
    """Short transformers names ("q_proj") when they pick out exactly `modules`, else full names."""
    shorts = sorted({_short_name(m, True) for m in modules})
    covered = [m for m in _modules(config) if any(_matches_target(s, (m.name,)) for s in shorts)]
    if set(covered) == set(modules):
        return shorts
    return sorted(m.name for m in modules)


def _json_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def save(
    directory: str | os.PathLike,
    lora: Lora,
    *,
    params: Params | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` as PEFT writes them for the
    transformers model of `lora.model_config`, so `PeftModel.from_pretrained(model, directory)`
    loads it. Each file is written to a temporary name and renamed into place.

    params: the base; when given and embed / lm_head are adapted, their base weights are stored
        too, as PEFT does (needed only by readers that check them; fnlm.lora.load does).
    base_model_name_or_path: recorded in the config (default: the lora config's).
    Returns the directory.
    """
    from safetensors.torch import save_file

    config = lora.model_config
    by_path = _by_path(config)
    adapted: list[_Module] = []
    tensors: dict[str, torch.Tensor] = {}
    replaced: list[tuple[tuple, torch.Tensor]] = []
    for path, node in _entries(lora):
        if _is_adapter(node):
            if path not in by_path:
                raise LoraError(f"lora.save: no transformers module for adapter {path_name(path)}")
            adapted.append(by_path[path])
        else:
            replaced.append((path, node))
    adapted.sort(key=_order_key(config.model_type))
    for module in adapted:
        node = get_path(lora, module.weight)
        if module.parameter is not None:
            key = _parameter_key(module, adapted)
            a, b = (
                _to_peft_layout(node["a"], node["b"]) if module.experts else (node["a"], node["b"])
            )
            tensors[f"{PEFT_PREFIX}{key}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{key}.lora_B.weight"] = b
            continue
        kind = (
            ("lora_embedding_A", "lora_embedding_B")
            if module.embedding
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PEFT_PREFIX}{module.name}.{kind[0]}"] = node["a"]
        tensors[f"{PEFT_PREFIX}{module.name}.{kind[1]}"] = node["b"]

    weight_owner = {m.weight: m for m in _modules(config)}
    bias_owner = {m.bias: m for m in _modules(config) if m.bias is not None}
    saved: list[_Module] = []
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

    linear = [m for m in adapted if m.parameter is None]
    parameters = [m for m in adapted if m.parameter is not None]
    target_modules = _names_for(linear, config) if linear else []
    # PEFT's save_embedding_layers="auto": with an embedding layer among target_modules, the
    # adapted embedding layers' base weights go into the file.
    if params is not None and {"embed_tokens", "lm_head"} & set(target_modules):
        for module in adapted:
            if module.weight in (("embed",), ("lm_head",)):
                base = quant.dequantize(get_path(params, module.weight))
                tensors[f"{PEFT_PREFIX}{module.name}.base_layer.weight"] = base

    lc = lora.config
    rank_pattern, alpha_pattern = {}, {}
    for module in linear:
        rank = get_path(lora, module.weight)["a"].shape[0]
        alpha = _pattern_value(lc.alpha_pattern, module.names, lc.alpha)
        if rank != lc.r:
            rank_pattern[module.name] = rank
        if alpha != lc.alpha:
            alpha_pattern[module.name] = _json_number(alpha)
    _parameter_patterns(parameters, adapted, lora, rank_pattern, alpha_pattern)
    doc = dict(_PEFT_DEFAULTS)
    doc.update(
        r=lc.r,
        lora_alpha=_json_number(lc.alpha),
        lora_dropout=lc.dropout,
        bias=lc.bias,
        use_rslora=lc.rslora,
        target_modules=target_modules,
        modules_to_save=_names_for(saved, config) if saved else None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        base_model_name_or_path=base_model_name_or_path or lc.base_model_name_or_path,
    )
    if parameters:
        doc["target_parameters"] = _parameter_names(parameters, config)
    elif config.model_type in _PEFT_EXPERT_NAMES:  # peft's conversion leaves an empty list
        doc["target_parameters"] = []

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    contiguous, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        if (
            tensor.data_ptr() in seen
        ):  # tied embed / lm_head: safetensors refuses aliases, PEFT copies
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        contiguous[key] = tensor
    _atomic_write(
        directory / WEIGHTS_FILE, lambda p: save_file(contiguous, p, metadata={"format": "pt"})
    )
    text = json.dumps(doc, indent=2, sort_keys=True)
    _atomic_write(directory / CONFIG_FILE, lambda p: Path(p).write_text(text))
    return directory


def _parameter_key(module: _Module, adapted: list[_Module]) -> str:
    """The saved-key prefix of a parameter target's factors. peft wraps each targeted parameter
    of one module in a ParamWrapper of its own, nested in the order it visits them, so all but
    the last one targeted sit under ".base_layer" once per wrapper outside them:
    "model.layers.0.mlp.experts.base_layer" (gate_up) and "model.layers.0.mlp.experts" (down)."""
    siblings = [m for m in adapted if m.name == module.name]  # in visiting order
    return module.name + ".base_layer" * (len(siblings) - 1 - siblings.index(module))


def _parameter_names(parameters: list[_Module], config: ModelConfig) -> list[str]:
    """target_parameters: short names ("gate_up_proj", "down_proj", "gate.weight") when they pick
    out exactly `parameters`, else full names."""
    shorts = sorted({_short_parameter(m) for m in parameters})
    every = [m for m in _modules(config) if m.parameter is not None]
    covered = [m for m in every if any(_matches_target(t, (m.target,)) for t in shorts)]
    if set(covered) == set(parameters):
        return shorts
    return sorted(m.target for m in parameters)


def _parameter_patterns(
    parameters: list[_Module], adapted: list[_Module], lora: Lora, ranks: dict, alphas: dict
) -> None:
    """rank_pattern / alpha_pattern entries of the parameter targets whose rank or alpha is not
    the adapter's r / alpha: one ".*\\.gate_up_proj" entry when every such stack agrees (as peft's
    conversion writes it) and it matches no other adapted module, else one per full name."""
    lc = lora.config
    for pattern, values, default in ((ranks, "rank", lc.r), (alphas, "alpha", lc.alpha)):
        groups: dict[str, list[tuple[_Module, Any]]] = {}
        for module in parameters:
            a = get_path(lora, module.weight)["a"]
            if values == "rank":
                value = a.shape[1] if module.experts else a.shape[0]
            else:
                value = _json_number(_pattern_value(lc.alpha_pattern, module.names, lc.alpha))
            groups.setdefault(_short_parameter(module), []).append((module, value))
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


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_LORA_KEYS = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_embedding_A": "a",
    ".lora_embedding_B": "b",
}


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_FILE).exists():
        from safetensors.torch import load_file

        return load_file(directory / WEIGHTS_FILE)
    if (directory / LEGACY_WEIGHTS_FILE).exists():
        return torch.load(directory / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    raise LoraError(
        f"{directory} has no {WEIGHTS_FILE} (nor {LEGACY_WEIGHTS_FILE}); is it a PEFT adapter?"
    )


def _read_config(directory: Path) -> dict:
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
    for key, what in _UNSUPPORTED.items():
        if doc.get(key):
            raise LoraError(f"{path}: {key}={doc[key]!r} ({what}) is not supported by fnlm")
    if doc.get("bias", "none") not in BIAS_MODES:
        raise LoraError(f"{path}: bias={doc['bias']!r}; expected one of {BIAS_MODES}")
    return doc


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
    they computed under transformers 4 (see `_convert_legacy_experts` for where that goes beyond
    peft). `save` writes such an adapter in the stacked format (target_parameters), which peft
    0.21 reads; the per-expert layout is not written back.

    Raises LoraError when a tensor names a module the base lacks, its shape does not fit the
    base weight (the message names the tensor and both shapes), A and B disagree on the rank,
    or the config asks for a LoRA variant fnlm does not implement.
    """
    directory = Path(directory)
    doc = _read_config(directory)
    config = params.config
    tensors, doc = _convert_legacy_experts(_read_tensors(directory), doc, config)
    by_name = _by_name(config)
    bias_by_name = {m.name + ".bias": m for m in _modules(config) if m.bias is not None}
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

    parameter_keys = _parameter_keys(config, doc.get("target_parameters") or ())

    def module_of(key: str, name: str) -> _Module:
        if name in parameter_keys:
            return parameter_keys[name]
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

    halves: dict[_Module, dict[str, tuple[str, torch.Tensor]]] = {}
    tree: dict = {"layers": [{} for _ in range(config.num_layers)]}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in _LORA_KEYS if name.endswith(s)), None)
        if suffix is not None:
            module = module_of(key, name.removesuffix(suffix))
            halves.setdefault(module, {})[_LORA_KEYS[suffix]] = (key, tensor)
        elif name.endswith(".base_layer.weight"):
            module = module_of(key, name.removesuffix(".base_layer.weight"))
            _check_base_copy(key, tensor, params, module)
        elif name.endswith(".weight") and name.removesuffix(".weight") in by_name:
            module = by_name[name.removesuffix(".weight")]
            _expect_shape(key, tensor, module.shape, f"base weight {module.name}.weight")
            set_path(
                tree, module.weight, _loaded(tensor, get_path(params, module.weight), trainable)
            )
        elif name.replace(".base_layer.bias", ".bias") in bias_by_name:
            module = bias_by_name[name.replace(".base_layer.bias", ".bias")]
            _expect_shape(key, tensor, module.bias_shape, f"base bias {module.name}.bias")
            set_path(tree, module.bias, _loaded(tensor, get_path(params, module.bias), trainable))
        elif re.search(r"\.lora_|lora_magnitude_vector", name):
            raise LoraError(f"adapter tensor {key} is of a LoRA variant fnlm does not implement")
        else:
            raise LoraError(
                f"adapter tensor {key} matches no module of {described}; was the adapter trained for "
                "another base model?"
            )

    for module in sorted(halves, key=_order_key(config.model_type)):
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
        _expect_shape(key_a, a, (rank, in_features), base)
        _expect_shape(key_b, b, (out_features, rank), base)
        _expect_rank(
            key_a, rank, _pattern_value(rank_pattern, (module.name,), lora_config.r), module.name
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


def _parameter_keys(config: ModelConfig, target_parameters) -> dict[str, _Module]:
    """{saved-key prefix: parameter target} for the parameters `target_parameters` names (peft's
    rule: a full name equals an entry or ends with "." + it), nested as peft nests them."""
    targeted = [
        m
        for m in _modules(config)
        if m.parameter is not None
        and any(_matches_target(t, (m.target,)) for t in target_parameters)
    ]
    return {_parameter_key(m, targeted): m for m in targeted}


def _load_parameter_adapter(
    tree: dict, module: _Module, parts: dict, rank_pattern, r: int, params, dtype, trainable: bool
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
    _expect_shape(key_a, a, want_a, base)
    _expect_shape(key_b, b, want_b, base)
    _expect_rank(key_a, rank, _pattern_value(rank_pattern, (module.target,), r), module.target)
    if module.experts:
        a, b = _from_peft_layout(a, b, experts)
    device = get_path(params, module.weight).device
    adapter = {
        "a": a.to(device=device, dtype=dtype).requires_grad_(trainable),
        "b": b.to(device=device, dtype=dtype).requires_grad_(trainable),
    }
    set_path(tree, module.weight, adapter)


# ---------------------------------------------------------------------------------------------
# Adapters trained under transformers 4, where each expert was an nn.Linear of its own
# ---------------------------------------------------------------------------------------------

# Per family: the MoE block's name under transformers 4, and each expert projection's name there
# -> the part of fnlm's stack it became ("gate" / "up": the rows of "gate_up", gate first).
_LEGACY_EXPERTS = {
    "mixtral": ("block_sparse_moe", {"w1": "gate", "w3": "up", "w2": "down"}),
    "qwen2_moe": ("mlp", {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}),
    "qwen3_moe": ("mlp", {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}),
}
_STACK_OF_PART = {"gate": "gate_up", "up": "gate_up", "down": "down"}


@dataclass
class _LegacyFactor:
    """One transformers-4 expert Linear's (or router's) lora_A / lora_B as read from the file."""

    name: str  # its transformers 4 module name, which the file's rank/alpha patterns match
    a: tuple[str, torch.Tensor] | None = None  # (key, [r, in])
    b: tuple[str, torch.Tensor] | None = None  # (key, [out, r])


def _convert_legacy_experts(
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
    legacy = _LEGACY_EXPERTS.get(config.model_type)
    if legacy is None or not config.moe_layers:
        return tensors, doc
    block, projections = legacy
    expert_key = re.compile(
        rf"model\.layers\.(\d+)\.{block}\.experts\.(\d+)\.({'|'.join(projections)})"
        r"\.lora_([AB])\.weight"
    )
    router_key = re.compile(rf"model\.layers\.(\d+)\.{block}\.gate\.lora_([AB])\.weight")
    covered = set(_parameter_keys(config, doc.get("target_parameters") or ()).values())
    by_path = _by_path(config)

    def moe_layer(key: str, layer: int) -> int:
        if layer not in config.moe_layers:
            raise LoraError(
                f"adapter tensor {key} adapts an expert of layer {layer}, but layer {layer} of this "
                f"{config.model_type} model is not a mixture-of-experts layer (those are "
                f"{list(config.moe_layers)}); was the adapter trained for another base model?"
            )
        return layer

    # (layer, part) -> expert -> factor; layer -> router factor
    experts: dict[tuple[int, str], dict[int, _LegacyFactor]] = {}
    routers: dict[int, _LegacyFactor] = {}
    kept: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if match := expert_key.fullmatch(name):
            layer, expert, projection, half = match.groups()
            layer, expert = moe_layer(key, int(layer)), int(expert)
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
            layer, half = moe_layer(key, int(match.group(1))), match.group(2)
            factor = routers.setdefault(layer, _LegacyFactor(name.rpartition(".lora_")[0]))
        else:
            kept[key] = tensor
            continue
        setattr(factor, half.lower(), (key, tensor))
    if not experts and not routers:
        return tensors, doc

    r, alpha = int(doc.get("r", 8)), doc.get("lora_alpha", 8)
    rslora = bool(doc.get("use_rslora", False))
    legacy_ranks = tuple((doc.get("rank_pattern") or {}).items())
    legacy_alphas = tuple((doc.get("alpha_pattern") or {}).items())

    def checked(factor: _LegacyFactor, in_features: int, out_features: int):
        """(A, B, rank, alpha) of one transformers-4 Linear, checked against its config."""
        if factor.a is None or factor.b is None:
            key, _ = factor.a or factor.b
            raise LoraError(
                f"adapter tensor {key} has no {'lora_B' if factor.a else 'lora_A'} partner"
            )
        (key_a, a), (key_b, b) = factor.a, factor.b
        rank = a.shape[0] if a.dim() == 2 else -1
        base = (
            f"{factor.name} of this {config.model_type} model (in {in_features}, out "
            f"{out_features}; lora_A [r, in], lora_B [out, r])"
        )
        _expect_shape(key_a, a, (rank, in_features), base)
        _expect_shape(key_b, b, (out_features, rank), base)
        _expect_rank(key_a, rank, _pattern_value(legacy_ranks, (factor.name,), r), factor.name)
        return a, b, rank, _pattern_value(legacy_alphas, (factor.name,), alpha)

    def scale(rank: int, alpha_value: float) -> float:
        return alpha_value / math.sqrt(rank) if rslora else alpha_value / rank

    hidden, inner = config.hidden_size, config.expert_size
    io = {"gate": (hidden, inner), "up": (hidden, inner), "down": (inner, hidden)}
    stacked: dict[_Module, tuple[torch.Tensor, torch.Tensor]] = {}  # fnlm's [E, R, in], [E, out, R]
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for layer in sorted({layer for layer, _ in experts}):
        for stack in moe.STACKS:
            parts = [p for p in ("gate", "up", "down") if _STACK_OF_PART[p] == stack]
            factors = {
                p: {e: checked(f, *io[p]) for e, f in experts.get((layer, p), {}).items()}
                for p in parts
            }
            part_ranks = {p: max((f[2] for f in factors[p].values()), default=0) for p in parts}
            total = sum(part_ranks.values())
            if not total:
                continue
            # The stack's scale is the first factor's; its alpha is chosen so that alpha/rank
            # (alpha/sqrt(rank) with rslora) gives it: 2·alpha at rank 2r, as peft writes it.
            reference = next(f for p in parts for f in factors[p].values())
            ref_rank, ref_alpha = reference[2], reference[3]
            stack_alpha = (
                ref_alpha * math.sqrt(total / ref_rank) if rslora else ref_alpha * total / ref_rank
            )
            module = by_path[("layers", layer, "mlp", "experts", stack)]
            experts_n, out_features, in_features = module.shape
            a = torch.zeros(experts_n, total, in_features, dtype=reference[0].dtype)
            b = torch.zeros(experts_n, out_features, total, dtype=reference[1].dtype)
            row = column = 0
            for p in parts:
                rows = io[p][1]
                for e, (a_e, b_e, rank, alpha_e) in factors[p].items():
                    if (rank, alpha_e) != (ref_rank, ref_alpha):
                        b_e = b_e * (scale(rank, alpha_e) / scale(ref_rank, ref_alpha))
                    a[e, column : column + rank] = a_e
                    b[e, row : row + rows, column : column + rank] = b_e
                row, column = row + rows, column + part_ranks[p]
            stacked[module] = (a, b)
            ranks[re.escape(module.target)] = total
            alphas[re.escape(module.target)] = _json_number(stack_alpha)
    for layer, factor in routers.items():
        module = by_path[("layers", layer, "mlp", "router")]
        a, b, rank, alpha_value = checked(factor, hidden, config.num_experts)
        stacked[module] = (a, b)
        ranks[re.escape(module.target)] = rank
        alphas[re.escape(module.target)] = _json_number(alpha_value)

    target_parameters = list(doc.get("target_parameters") or ()) + [m.target for m in stacked]
    keys = {m: key for key, m in _parameter_keys(config, target_parameters).items()}
    for module, (a, b) in stacked.items():
        if module.experts:
            a, b = _to_peft_layout(a, b)
        for half, tensor in (("lora_A", a), ("lora_B", b)):
            key = f"{PEFT_PREFIX}{keys[module]}.{half}.weight"
            if key in kept:
                raise LoraError(
                    f"adapter tensor {key} is in the file, and so are the per-expert tensors that "
                    f"make up {module.target}; a file holds one or the other"
                )
            kept[key] = tensor
    doc = dict(doc)
    doc["target_parameters"] = target_parameters
    for field, entries in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        old = doc.get(field) or {}
        doc[field] = {**entries, **{k: v for k, v in old.items() if k not in entries}}
    return kept, doc


def _expect_shape(key: str, tensor: torch.Tensor, want: tuple, base: str) -> None:
    """LoraError unless the adapter tensor `key` has shape `want` (what `base` needs)."""
    if tuple(tensor.shape) != tuple(want):
        raise LoraError(
            f"adapter tensor {key} has shape {tuple(tensor.shape)}, but {base} needs "
            f"{tuple(want)}; was the adapter trained for another base model?"
        )


def _expect_rank(key: str, rank: int, want: int, name: str) -> None:
    """LoraError unless lora_A `key`'s rank is the one adapter_config.json gives `name`."""
    if rank != want:
        raise LoraError(
            f"adapter tensor {key} has rank {rank}, but adapter_config.json gives {name} rank "
            f"{want} (r / rank_pattern)"
        )


def _loaded(tensor: torch.Tensor, base, trainable: bool) -> torch.Tensor:
    return tensor.to(device=base.device, dtype=base.dtype).requires_grad_(trainable)


def _check_base_copy(key: str, tensor: torch.Tensor, params: Params, module: _Module) -> None:
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
