"""The module table and PEFT's target rules: params paths <-> transformers module names.

Paths map to PEFT's names through the family's `weight_names(config)`, so every architecture
works without a table of its own; a family whose PEFT naming differs declares it in its own file
(see `family_naming`), so the lora package reads models and models never import lora.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from fnlm.config import ModelConfig
from fnlm.errors import LoraError
from fnlm.models import family, moe
from fnlm.params import path_name

# PEFT's shorthand for "every linear layer except the output layer".
ALL_LINEAR_SHORTHAND = "all-linear"

# Within a decoder layer, the order transformers creates (and PEFT visits) the modules in; PEFT
# draws the initial A of each adapter from the global RNG in this order. A family created in
# another order declares its own (fnlm.models.phi3.PEFT_LAYER_ORDER).
LAYER_ORDER = (
    "attn", "mlp", "q", "k", "v", "qkv", "o",
    "router", "experts", "shared", "shared_gate", "gate", "up", "gate_up", "down",
)  # fmt: skip
# Within a MoE layer, the order peft visits its parameter targets: transformers' module order
# (Mixtral and Qwen2-MoE create the router before the experts), then the experts' parameters as
# defined (gate_up_proj, then down_proj: the first one targeted is the inner wrapper). Qwen3-MoE
# creates its router after the experts (fnlm.models.qwen3_moe.PEFT_PARAMETER_ORDER).
PARAMETER_ORDER = ("router", "gate_up", "down")


def family_naming(model_type: str, name: str, default=None):
    """The PEFT naming a family declares beside its model code (`fnlm.models.<family>`:
    PEFT_LAYER_ORDER, PEFT_PARAMETER_ORDER, PEFT_EXPERT_NAMES, LEGACY_EXPERTS), else `default`."""
    return getattr(family(model_type), name, default)


def peft_expert_names(model_type: str) -> dict[str, str] | None:
    """{transformers per-expert name: fnlm part} of a family whose per-expert targets peft 0.21
    rewrites into target_parameters on transformers 5's fused experts
    (peft.utils.transformers_weight_conversion), else None."""
    return family_naming(model_type, "PEFT_EXPERT_NAMES")


@dataclass(frozen=True)
class Module:
    name: str  # transformers module name, "model.layers.0.self_attn.q_proj"
    weight: tuple  # param path of its weight, ("layers", 0, "attn", "q")
    # weight shape as stored: [out, in], [vocab, hidden] for embed, [E, out, in]
    shape: tuple[int, ...]
    bias: tuple | None = None  # param path of its bias
    bias_shape: tuple[int, ...] | None = None
    # peft adapts the parameter `parameter` of module `name` (target_parameters, ParamWrapper):
    # "gate_up_proj" / "down_proj" of "model.layers.0.mlp.experts", "weight" of a router
    parameter: str | None = None
    experts: int = 0  # an expert stack's E
    # an expert stack whose output rows peft (the checkpoint) orders otherwise: peft's row j is
    # fnlm's row peft_rows[j] (gpt-oss interleaves gate and up); None when they agree
    peft_rows: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

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


def order_key(model_type: str):
    """Sort key putting modules in the order PEFT visits them: embed, each layer (attention, then
    MLP), the rest, lm_head; then the parameter targets (routers, expert stacks) layer by layer."""
    order = family_naming(model_type, "PEFT_LAYER_ORDER", LAYER_ORDER)
    parameter_order = family_naming(model_type, "PEFT_PARAMETER_ORDER", PARAMETER_ORDER)

    def key(module: Module) -> tuple:
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
def module_table(config: ModelConfig) -> tuple[Module, ...]:
    """Every module with a weight, in the order PEFT visits them; MoE layers contribute their
    router and their two expert stacks as parameter targets (under transformers 5's names)."""
    weights: dict[str, tuple] = {}
    biases: dict[str, tuple] = {}
    for hf_name, (path, shape) in family(config.model_type).weight_names(config).items():
        path = tuple(path)
        if moe.stack_slot(path) is not None or path[2:] == ("mlp", "router"):
            continue  # one expert's matrix, or a router: added below as parameter targets
        if path[2:4] == ("mlp", "experts") or str(path[-1]).startswith(("experts_", "router_")):
            continue  # gpt-oss's checkpoint stacks and their biases, router bias: not modules
        module, _, kind = hf_name.rpartition(".")
        (biases if kind == "bias" else weights)[module] = (path, tuple(shape))
    if "lm_head" not in weights:  # tied: same tensor as embed, but PEFT sees a module of its own
        weights["lm_head"] = (("lm_head",), (config.vocab_size, config.hidden_size))
    modules = [
        Module(
            name,
            path,
            shape,
            biases.get(name, (None, None))[0],
            biases.get(name, (None, None))[1],
        )
        for name, (path, shape) in weights.items()
        if not _dense_mlp_peft_skips(config, path)
    ]
    # Family naming: the router's module under "mlp" (gpt-oss: "router"; transformers 5's MoE
    # families: "gate"; None where the router is a linear module, Gemma 4's "router.proj"), the
    # experts' module (Gemma 4: "experts", beside the MLP) and the stacks' row order in peft's
    # layout (gpt-oss: `peft_stack_rows`)
    router_name = family_naming(config.model_type, "PEFT_ROUTER", "gate")
    experts_name = family_naming(config.model_type, "PEFT_EXPERTS_MODULE", "mlp.experts")
    stack_rows = family_naming(config.model_type, "peft_stack_rows")
    for n in config.moe_layers:
        mlp = f"model.layers.{n}.mlp"  # transformers 5's name in every MoE family (Mixtral too)
        router = ("layers", n, "mlp", "router")
        if router_name is not None:
            modules.append(
                Module(
                    f"{mlp}.{router_name}",
                    router,
                    (config.num_experts, config.hidden_size),
                    parameter="weight",
                )
            )
        for stack in moe.STACKS:
            modules.append(
                Module(
                    f"model.layers.{n}.{experts_name}",
                    ("layers", n, "mlp", "experts", stack),
                    moe.stack_shape(config, stack),
                    parameter=f"{stack}_proj",
                    experts=config.num_experts,
                    peft_rows=stack_rows(config, stack) if stack_rows else None,
                )
            )
    return tuple(sorted(modules, key=order_key(config.model_type)))


def _dense_mlp_peft_skips(config: ModelConfig, path: tuple) -> bool:
    """A dense MLP module (Qwen3-MoE's mlp_only_layers, Qwen3-Next's shared expert) of a family
    whose MLP targets peft turns into expert target_parameters: peft drops them from
    target_modules, so it never adapts these (Qwen3-Next's shared_expert_gate, named otherwise,
    it does)."""
    names = peft_expert_names(config.model_type)
    return bool(names) and path[0] == "layers" and path[2] == "mlp" and path[-1] in names.values()


def adaptable(module: Module) -> bool:
    """A matrix that is not a norm weight (Cohere's per-head q/k norm weights are 2-D), or an
    expert stack."""
    if module.experts:
        return True
    return len(module.shape) == 2 and "norm" not in module.weight[-1]


@lru_cache(maxsize=32)
def modules_by_path(config: ModelConfig) -> dict[tuple, Module]:
    return {m.weight: m for m in module_table(config)}


@lru_cache(maxsize=32)
def modules_by_name(config: ModelConfig) -> dict[str, Module]:
    """Modules (not parameter targets) by transformers name."""
    return {m.name: m for m in module_table(config) if m.parameter is None}


def short_name(module: Module, peft_names: bool) -> str:
    return module.name.rpartition(".")[2] if peft_names else module.weight[-1]


def short_parameter(module: Module) -> str:
    """The short target_parameters entry of a parameter target: "gate_up_proj", "gate.weight"."""
    if module.parameter == "weight":
        return f"{module.name.rpartition('.')[2]}.weight"
    return module.parameter


def matches_target(target: str, names: tuple[str, ...]) -> bool:
    """PEFT's rule for a list entry: the module name equals it or ends with "." + it."""
    return any(name == target or name.endswith("." + target) for name in names)


def expert_parts(config: ModelConfig, targets) -> set[str]:
    """The expert parts ("gate", "up", "down") that per-expert target names ask for, in a family
    whose per-expert targets peft converts: fnlm's names or the family's transformers names, bare
    or ending a longer name (peft's rule; "model.layers.0.mlp.down_proj" adapts every layer's down
    stack there too); "all-linear" asks for all three."""
    names = peft_expert_names(config.model_type)
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


def select(config: ModelConfig, targets, what: str) -> list[Module]:
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
    modules = module_table(config)
    linear = [m for m in modules if m.parameter is None]
    parts = expert_parts(config, targets)
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
            # model-level linear layers peft also adapts (Gemma 4's PLE projection)
            extra = family_naming(config.model_type, "PEFT_ALL_LINEAR_EXTRA", ())
            chosen = [
                m for m in linear if adaptable(m) and (m.weight[0] == "layers" or m.weight in extra)
            ]
            if peft_expert_names(config.model_type):
                chosen += [m for m in modules if m.parameter is not None]
            return sorted(chosen, key=order_key(config.model_type))
        chosen = [m for m in modules if any(re.fullmatch(targets, n) for n in m.names)]
        if not chosen:
            raise LoraError(
                f"{what} pattern {targets!r} matches no module of this {config.model_type} model"
            )
        return chosen
    # As in PEFT, entries that match nothing are fine (ALL_LINEAR names "gate_up" and "qkv" for
    # every family); only a list that matches nothing at all is an error.
    chosen = [m for m in linear if any(matches_target(t, m.names) for t in targets)]
    for m in modules:
        if m.parameter is None or m in by_part:
            continue
        named = [t for t in targets if not m.experts or "experts" in t or "gate_up_proj" in t]
        if any(matches_target(t, m.names) for t in named):
            by_part.append(m)
    chosen = sorted(chosen + by_part, key=order_key(config.model_type))
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
        "down", "w1"...) reach them too (gate and up only together; see `select`).
    """
    names = {
        m.weight[-1]: short_name(m, True)
        for m in module_table(config)
        if m.parameter is None and adaptable(m)
    }
    if experts:
        for m in module_table(config):
            if m.parameter is not None:
                fnlm_name = "router" if m.weight[-1] == "router" else f"experts.{m.weight[-1]}"
                names[fnlm_name] = short_parameter(m)
    return names
