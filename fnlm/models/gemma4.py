"""Gemma 4 (text model; the multimodal checkpoint's text tower through fnlm.models.multimodal):
Gemma 3's block with per-layer input embeddings, keys and values shared across the last layers,
global layers with their own head size, kv heads, k = v and proportional rope, and an optional
mixture-of-experts block beside each MLP.

Gemma 3's block (q/k RMSNorm, pre- and post-norms, sliding layers with a global one every few)
with these differences, all from transformers' `modeling_gemma4`:

- RMSNorm scales by w (not 1 + w); values get an RMSNorm without weight; the attention scale is 1
  (the q/k norms set the scale); every layer ends by multiplying with a learned `layer_scalar`.
- Global (full-attention) layers have their own head size (`global_head_dim`), may have their own
  kv-head count, may use the key projection as the values too (`attention_k_eq_v`: no v_proj),
  and use "proportional" rope: the first `partial_rotary_factor` of the frequencies of a rope over
  the whole head, the rest zero (those dims pass through).
- KV sharing: the last `num_kv_shared_layers` layers have no k/v projections and attend with the
  keys and values of the last earlier layer of their own type (`Layout.kv_source`); with
  `use_double_wide_mlp` their MLP is twice as wide.
- Per-layer input embeddings (PLE): a second embedding table [vocab, layers · P] plus a projection
  of the scaled embeddings give each layer a P-wide input; after its MLP a layer adds
  norm(proj(act(gate(x)) * input)).
- With `enable_moe_block` every layer runs a mixture of experts beside its dense MLP, on the same
  residual: its router norms (no weight), scales by `router.scale / sqrt(hidden)`, takes softmax,
  top-k, renormalizes and multiplies by a per-expert scale; the two outputs are each normed and
  summed before the usual post-norm.

What ModelConfig has no field for is read from the config.json kept on it (`layout`). The decoder
loop is `hidden_states` here; fnlm.models.decoder.hidden_states hands gemma4 configs to it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fnlm import kernels
from fnlm.config import ModelConfig, freeze
from fnlm.errors import ConfigError, UnsupportedModelError
from fnlm.models import decoder, gemma2, llama, moe
from fnlm.models.rope import rope_tables
from fnlm.params import Params

MODEL_TYPES = ("gemma4_text",)

DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {
        "rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0,
    },
}  # fmt: skip

# Read by fnlm.lora. Module order in a transformers Gemma4TextDecoderLayer (PEFT draws initial
# A matrices in this order): attention, MLP, the per-layer input gate and projection, the router.
PEFT_LAYER_ORDER = (
    "attn", "mlp", "q", "k", "v", "o", "gate", "up", "down",
    "per_layer_gate", "per_layer_projection", "router", "experts",
)  # fmt: skip
# peft's "all-linear" also adapts this model-level linear layer (the PLE projection).
PEFT_ALL_LINEAR_EXTRA = (("per_layer_model_projection",),)
# The router is an ordinary linear layer ("router" / transformers' "router.proj"), not a parameter
# target; the expert stacks are, as peft's target_parameters names them ("experts.gate_up_proj",
# "experts.down_proj": the experts module sits beside the MLP, in fnlm's [E, out, in] layout).
PEFT_ROUTER = None
PEFT_EXPERTS_MODULE = "experts"


@dataclass(frozen=True)
class Layout:
    """Per-layer shapes and sharing that ModelConfig does not describe (see the module docstring)."""

    head_dims: tuple[int, ...]
    kv_heads: tuple[int, ...]
    k_eq_v: tuple[bool, ...]  # values are the key projection (global layers, attention_k_eq_v)
    kv_source: tuple[int, ...]  # the layer whose keys and values layer i attends with
    mlp_sizes: tuple[int, ...]
    per_layer_size: int  # PLE width P (0: no per-layer inputs)
    per_layer_vocab: int
    rope: dict = field(compare=False)  # {layer type: transformers' rope parameters}

    def shared(self, layer: int) -> bool:
        return self.kv_source[layer] != layer


def layer_types(hf: dict) -> tuple[str, ...]:
    """transformers' layer types: five sliding per global by default, the last layer always global."""
    types = list(gemma2.layer_types(hf, 6))
    if types:
        types[-1] = "full_attention"
    return tuple(types)


def make_layout(hf: dict) -> Layout:
    n, types = hf["num_hidden_layers"], layer_types(hf)
    head_dim = hf.get("head_dim") or 256
    kv = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    k_eq_v = bool(hf.get("attention_k_eq_v", False))
    overrides = {i: {} for i in range(n)}
    if "per_layer_config" in hf:  # what transformers 5 writes: {"<layer>": {"head_dim": ...}}
        for key, values in (hf["per_layer_config"] or {}).items():
            layers = [i for i in range(n) if types[i] == key] if key in types else [int(key)]
            for i in layers:
                overrides[i].update(values)
    else:  # the released checkpoints' global_head_dim / num_global_key_value_heads
        for i in range(n):
            if types[i] == "full_attention":
                overrides[i]["head_dim"] = hf.get("global_head_dim", 512)
                if k_eq_v and hf.get("num_global_key_value_heads") is not None:
                    overrides[i]["num_key_value_heads"] = hf["num_global_key_value_heads"]
    for i, values in overrides.items():
        unknown = set(values) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise UnsupportedModelError(
                f"gemma4 per_layer_config of layer {i} sets {sorted(unknown)}; fnlm follows only "
                "head_dim and num_key_value_heads per layer"
            )
    shared = hf.get("num_kv_shared_layers") or 0
    first_shared = n - shared
    if shared and first_shared <= 0:
        raise UnsupportedModelError(
            f"gemma4 with num_kv_shared_layers = num_hidden_layers ({n}) has no layer that computes "
            "keys and values (an assistant model fed by another); fnlm runs standalone models"
        )
    sources = []
    for i in range(n):
        if i < first_shared:
            sources.append(i)
            continue
        earlier = [j for j in range(first_shared) if types[j] == types[i]]
        if not earlier:
            raise ConfigError(
                f"gemma4 layer {i} ({types[i]}) shares keys and values, but no layer before "
                f"{first_shared} is of that type"
            )
        sources.append(earlier[-1])
    wide = bool(hf.get("use_double_wide_mlp", False))
    size = llama.require(hf, "intermediate_size")
    rope = hf.get("rope_parameters") or DEFAULT_ROPE
    if not all(t in rope for t in set(types)):
        raise ConfigError(
            f"gemma4 rope_parameters needs an entry per layer type {sorted(set(types))}"
        )
    per_layer = hf.get("hidden_size_per_layer_input") or 0
    return Layout(
        head_dims=tuple(overrides[i].get("head_dim", head_dim) for i in range(n)),
        kv_heads=tuple(overrides[i].get("num_key_value_heads", kv) for i in range(n)),
        k_eq_v=tuple(k_eq_v and t == "full_attention" for t in types),
        kv_source=tuple(sources),
        mlp_sizes=tuple(size * (2 if wide and i >= first_shared else 1) for i in range(n)),
        per_layer_size=per_layer,
        per_layer_vocab=hf.get("vocab_size_per_layer_input") or hf["vocab_size"],
        rope={t: dict(rope[t]) for t in set(types)},
    )


@functools.lru_cache(maxsize=16)
def _layout(hf_text: str) -> Layout:
    return make_layout(json.loads(hf_text))


def layout(config: ModelConfig) -> Layout:
    """The Layout of a gemma4 ModelConfig (parsed once per config.json)."""
    return _layout(config.hf_config)


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(
            "gemma4 with use_bidirectional_attention (bidirectional vision tokens or an embedding "
            "model) is not supported; fnlm runs causal decoders over text"
        )
    hf = {**hf, "rope_parameters": hf.get("rope_parameters") or DEFAULT_ROPE}
    lay = make_layout(hf)
    types = layer_types(hf)
    full = dict(hf["rope_parameters"]["full_attention"])
    local = dict(hf["rope_parameters"].get("sliding_attention") or full)
    experts = (hf.get("num_experts") or 0) if hf.get("enable_moe_block") else 0
    config = llama.translate(
        hf,
        activation="silu",
        qk_norm=True,
        post_norms=True,
        attention_scale=1.0,
        final_softcap=hf.get("final_logit_softcapping"),
        sliding_window=hf.get("sliding_window", 512),
        layer_types=types,
        norm_offset=0.0,
        embedding_scale=hf["hidden_size"] ** 0.5,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        head_dim=hf.get("head_dim") or 256,
        num_kv_heads=lay.kv_heads[0],
        partial_rotary_factor=1.0,
        # the global rope, so rope-type checks elsewhere see it; gemma4 builds its own tables
        rope_theta=float(full.pop("rope_theta", 1_000_000.0)),
        rope_scaling=freeze(full),
        local_rope_theta=float(local.pop("rope_theta", 10_000.0)),
        local_rope_scaling=freeze(local),
        num_experts=experts,
        experts_per_token=llama.require(hf, "top_k_experts") if experts else 0,
        moe_intermediate_size=hf.get("moe_intermediate_size") if experts else None,
        moe_layers=tuple(range(hf["num_hidden_layers"])) if experts else (),
        moe_renormalize=True,
    )
    return config.replace(activation=hf.get("hidden_activation") or "gelu_pytorch_tanh")


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """HF tensor name -> (param path, shape). Shared-KV layers have no k/v tensors; the per-layer
    input tensors, the router and the expert stacks exist only where the config enables them."""
    lay = layout(config)
    h, layers = config.hidden_size, config.num_layers
    p = lay.per_layer_size
    names = {
        "model.embed_tokens.weight": (("embed",), (config.vocab_size, h)),
        "model.norm.weight": (("norm",), (h,)),
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head",), (config.vocab_size, h))
    if p:
        names["model.embed_tokens_per_layer.weight"] = (
            ("embed_per_layer",),
            (lay.per_layer_vocab, layers * p),
        )
        names["model.per_layer_model_projection.weight"] = (
            ("per_layer_model_projection",),
            (layers * p, h),
        )
        names["model.per_layer_projection_norm.weight"] = (("norm_per_layer_model",), (p,))
    e, i_e = config.num_experts, config.expert_size
    for n in range(layers):
        d, kv_heads, i = lay.head_dims[n], lay.kv_heads[n], lay.mlp_sizes[n]
        q, kv = config.num_heads * d, kv_heads * d
        layer = {
            "layer_scalar": (("scale",), (1,)),
            "input_layernorm.weight": (("norm_attn",), (h,)),
            "post_attention_layernorm.weight": (("norm_attn_post",), (h,)),
            "pre_feedforward_layernorm.weight": (("norm_mlp",), (h,)),
            "post_feedforward_layernorm.weight": (("norm_mlp_post",), (h,)),
            "self_attn.q_proj.weight": (("attn", "q"), (q, h)),
            "self_attn.q_norm.weight": (("attn", "q_norm"), (d,)),
            "self_attn.o_proj.weight": (("attn", "o"), (h, q)),
            "mlp.gate_proj.weight": (("mlp", "gate"), (i, h)),
            "mlp.up_proj.weight": (("mlp", "up"), (i, h)),
            "mlp.down_proj.weight": (("mlp", "down"), (h, i)),
        }
        own_kv = not lay.shared(n)
        if own_kv:
            layer["self_attn.k_proj.weight"] = (("attn", "k"), (kv, h))
            layer["self_attn.k_norm.weight"] = (("attn", "k_norm"), (d,))
            if not lay.k_eq_v[n]:
                layer["self_attn.v_proj.weight"] = (("attn", "v"), (kv, h))
        if config.attention_bias:
            layer["self_attn.q_proj.bias"] = (("attn", "q_bias"), (q,))
            layer["self_attn.o_proj.bias"] = (("attn", "o_bias"), (h,))
            if own_kv:
                layer["self_attn.k_proj.bias"] = (("attn", "k_bias"), (kv,))
                if not lay.k_eq_v[n]:
                    layer["self_attn.v_proj.bias"] = (("attn", "v_bias"), (kv,))
        if p:
            layer["per_layer_input_gate.weight"] = (("per_layer_gate",), (p, h))
            layer["per_layer_projection.weight"] = (("per_layer_projection",), (h, p))
            layer["post_per_layer_input_norm.weight"] = (("norm_per_layer",), (h,))
        if e:
            layer["router.proj.weight"] = (("router",), (e, h))
            layer["router.scale"] = (("router_scale",), (h,))
            layer["router.per_expert_scale"] = (("router_expert_scale",), (e,))
            layer["experts.gate_up_proj"] = (("mlp", "experts", "gate_up"), (e, 2 * i_e, h))
            layer["experts.down_proj"] = (("mlp", "experts", "down"), (e, h, i_e))
            layer["post_feedforward_layernorm_1.weight"] = (("norm_dense_post",), (h,))
            layer["pre_feedforward_layernorm_2.weight"] = (("norm_experts",), (h,))
            layer["post_feedforward_layernorm_2.weight"] = (("norm_experts_post",), (h,))
        for name, (path, shape) in layer.items():
            names[f"model.layers.{n}.{name}"] = (("layers", n, *path), shape)
    return names


_KV_TENSOR = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")


def checkpoint_stream(stream: Iterator, config: ModelConfig) -> Iterator:
    """The loader's (name, tensor, file) stream without the k/v tensors of shared-KV layers, which
    transformers ignores too (`_keys_to_ignore_on_load_unexpected`)."""
    lay = layout(config)
    for name, tensor, file in stream:
        found = _KV_TENSOR.search(name)
        if found is None or not lay.shared(int(found.group(1))):
            yield name, tensor, file


def cache_shape(config: ModelConfig, layer: int) -> tuple[int, int]:
    """(kv heads, head dim) of one layer's KV cache (global layers differ from sliding ones)."""
    lay = layout(config)
    return lay.kv_heads[layer], lay.head_dims[layer]


@functools.lru_cache(maxsize=64)
def layer_config(config: ModelConfig, layer: int) -> ModelConfig:
    """`config` with this layer's head size and kv heads, for the shared attention helpers."""
    lay = layout(config)
    return config.replace(head_dim=lay.head_dims[layer], num_kv_heads=lay.kv_heads[layer])


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


def unit_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without weight (Gemma 4's value norm and router norm), in fp32."""
    xf = x.float()
    return (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)).to(x.dtype)


def norm(config: ModelConfig, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gemma 4's RMSNorm: x · (mean(x²) + eps)^-½ · w in fp32, rounded once, as transformers'
    Gemma4RMSNorm. (fnlm's offset-0 kernel rounds before the weight, as Llama does; in bf16 that
    gave logits up to 12x further from fp32 than transformers' own bf16 on the tiny test models,
    this at most 1.25x, 4 seeds.)"""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + config.norm_eps, -0.5)
    return (y * w.float()).to(x.dtype)


def rope_for(
    config: ModelConfig, layer_type: str, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [batch, seq, head_dim / 2] of one layer type. "proportional" rope (global layers)
    rotates the first partial_rotary_factor of the frequency pairs of a full-head rope (exponents
    over the whole head), the rest with frequency 0; other types as fnlm.models.rope."""
    lay = layout(config)
    layer = config.layer_types.index(layer_type)
    dim = lay.head_dims[layer]
    rope = dict(lay.rope[layer_type])
    theta = float(rope.pop("rope_theta", 10_000.0))
    if rope.get("rope_type", "default") != "proportional":
        factor = float(rope.pop("partial_rotary_factor", 1.0))
        rope = {} if rope.get("rope_type", "default") == "default" and len(rope) <= 1 else rope
        local = config.replace(
            head_dim=dim, rope_theta=theta, rope_scaling=freeze(rope), partial_rotary_factor=factor,
            local_rope_theta=None, local_rope_scaling=(),
        )  # fmt: skip
        return rope_tables(local, positions)
    angles = int(rope.get("partial_rotary_factor", 1.0) * dim // 2)
    exponents = torch.arange(0, 2 * angles, 2, dtype=torch.int64, device=positions.device)
    inv_freq = 1.0 / (theta ** (exponents.float() / dim))
    inv_freq = torch.cat([inv_freq, inv_freq.new_zeros(dim // 2 - angles)])
    inv_freq = inv_freq / rope.get("factor", 1.0)
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    return freqs.cos(), freqs.sin()


def attention(
    config: ModelConfig,
    k_eq_v: bool,
    p: dict,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask,
    kv: tuple | None,
    shared: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One layer's attention and the keys and values it attended with ([b, kv_heads, len, d]);
    `shared` gives a shared-KV layer its source layer's, `config` is the layer's (`layer_config`)."""
    batch, seq, _ = x.shape
    d, cos, sin = config.head_dim, *rope
    q = decoder.linear(x, p["q"], p.get("q_bias")).view(batch, seq, config.num_heads, d)
    q = norm(config, p["q_norm"], q)
    if shared is None:
        k = decoder.linear(x, p["k"], p.get("k_bias")).view(batch, seq, config.num_kv_heads, d)
        v = k if k_eq_v else decoder.linear(x, p["v"], p.get("v_bias")).view(k.shape)
        k, v = norm(config, p["k_norm"], k), unit_norm(v, config.norm_eps)
        q, k = kernels.apply_rope(q, k, cos, sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if kv is not None:
            k, v = decoder.update_cache(kv, k, v)
    else:
        q = kernels.apply_rope(q, q[:, :, :1].contiguous(), cos, sin)[0]
        k, v = shared
    out = decoder.attend(config, q.transpose(1, 2), k, v, mask)
    out = out.transpose(1, 2).reshape(batch, seq, config.num_heads * d)
    return decoder.linear(out, p["o"], p.get("o_bias")), (k, v)


def experts(config: ModelConfig, p: dict, x: torch.Tensor) -> torch.Tensor:
    """The mixture-of-experts branch on the residual x [batch, seq, hidden]: routed on the
    weightless-normed x, run on norm_experts(x), as transformers' Gemma4TextRouter / Experts."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    routed = unit_norm(flat, config.norm_eps) * p["router_scale"] * config.hidden_size**-0.5
    logits = decoder.linear(routed, p["router"])
    route = moe.route(config, logits, x.dtype, expert_scale=p["router_expert_scale"])
    rows = norm(config, p["norm_experts"], flat)[route.tokens]
    stacks = p["mlp"]["experts"]
    gate, up = decoder.expert_matmul(route, rows, stacks["gate_up"]).chunk(2, dim=-1)
    y = decoder.expert_matmul(route, decoder.glu(config, gate, up), stacks["down"])
    return moe.combine(route, y * route.weights[:, None], flat.shape[0]).reshape(shape)


def layer_forward(
    config: ModelConfig,
    layer: int,
    p: dict,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask,
    kv: tuple | None = None,
    shared: tuple | None = None,
    per_layer_input: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One decoder layer (transformers' Gemma4TextDecoderLayer): (output, the keys and values it
    attended with). `config` is the model's; kv / shared / per_layer_input as in `hidden_states`."""
    lay, own = layout(config), layer_config(config, layer)
    h = norm(config, p["norm_attn"], x)
    attn, keys_values = attention(own, lay.k_eq_v[layer], p["attn"], h, rope, mask, kv, shared)
    x = x + norm(config, p["norm_attn_post"], attn)
    mlp = p["mlp"]
    h = norm(config, p["norm_mlp"], x)
    y = decoder.glu(config, decoder.linear(h, mlp["gate"]), decoder.linear(h, mlp["up"]))
    y = decoder.linear(y, mlp["down"])
    if "router" in p:
        y = norm(config, p["norm_dense_post"], y) + norm(
            config, p["norm_experts_post"], experts(config, p, x)
        )
    x = x + norm(config, p["norm_mlp_post"], y)
    if per_layer_input is not None:
        g = decoder.activation(config, decoder.linear(x, p["per_layer_gate"])) * per_layer_input
        x = x + norm(config, p["norm_per_layer"], decoder.linear(g, p["per_layer_projection"]))
    return x * p["scale"], keys_values


def per_layer_inputs(params: Params, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[batch, seq, layers, P]: (norm(proj(x) / sqrt(hidden)) + embed_per_layer(tokens) · sqrt(P))
    / sqrt(2), x the scaled token embeddings (transformers' get/project_per_layer_inputs)."""
    config = params.config
    size = layout(config).per_layer_size
    shape = (*tokens.shape, config.num_layers, size)
    table = decoder.embedding(tokens, params["embed_per_layer"])
    table = table * torch.tensor(size**0.5, dtype=table.dtype)
    projected = decoder.linear(x, params["per_layer_model_projection"]) * config.hidden_size**-0.5
    projected = norm(config, params["norm_per_layer_model"], projected.reshape(shape))
    return (projected + table.reshape(shape)) * 2.0**-0.5


def hidden_states(
    params: Params,
    tokens: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    layer_fn=None,
    cache: dict | None = None,
    cache_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """fnlm.models.decoder.hidden_states for Gemma 4 (same arguments and cache). `layer_fn` (the
    training wrappers of decoder.layer_forward) is not called: Gemma 4's layer takes and returns
    more; its `wrap`, when it has one (fnlm.train's layer functions), checkpoints this layer."""
    config = params.config
    lay = layout(config)
    if positions is None:
        positions = decoder.default_positions(tokens, attention_mask)
    x = decoder.embedding(tokens, params["embed"])
    x = x * torch.tensor(config.embedding_scale, dtype=x.dtype)
    extra = per_layer_inputs(params, tokens, x) if lay.per_layer_size else None
    ropes = {t: rope_for(config, t, positions) for t in sorted(set(config.layer_types))}
    sources = {s for i, s in enumerate(lay.kv_source) if s != i}
    shared: dict[int, tuple] = {}
    layer_masks: dict = {}
    wrap = getattr(layer_fn, "wrap", None)
    run = wrap(layer_forward) if wrap is not None and cache is None else layer_forward
    for i, p in enumerate(params["layers"]):
        window = config.window(i)
        if window not in layer_masks:
            layer_masks[window] = decoder.window_mask(
                window, positions, attention_mask, segments, cache, cache_slots
            )
        kv = (cache["k"][i], cache["v"][i], cache_slots) if cache is not None else None
        x, keys_values = run(
            config, i, p, x, ropes[config.layer_types[i]], layer_masks[window], kv,
            shared.get(lay.kv_source[i]) if lay.shared(i) else None,
            extra[:, :, i] if extra is not None else None,
        )  # fmt: skip
        if i in sources:
            shared[i] = keys_values
    return norm(config, params["norm"], x)
