"""`ModelConfig`: one frozen description of every supported decoder.

A family file (`fnlm/models/llama.py`, ...) translates a transformers `config.json` into this; the
decoder reads nothing else. Fields are grouped: sizes, attention, rope, norms/MLP, special tokens.
Adding a behaviour means adding one named field here and one branch in `fnlm/models/decoder.py`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from fnlm.errors import ConfigError


def _freeze(value: Any) -> Any:
    """Dicts and lists from JSON into hashable tuples, so the config can key caches and compile."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value
    ):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


# transformers' `hidden_act` names -> ours; "gelu_new" is the tanh formula written out by hand.
ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
}  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only transformer; hashable, so it is a compile-time constant."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    # attention
    attention_bias: bool = False  # biases on q, k, v (Qwen2)
    o_bias: bool = False  # bias on the output projection
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # a query sees keys with q_pos - k_pos < window
    layer_types: tuple[
        str, ...
    ] = ()  # per layer "full_attention" | "sliding_attention"; () = all full

    # the q/k norm spans all heads at once, before the head split (OLMo2)
    qk_norm_across_heads: bool = False
    # a fused "qkv" weight has rows [per kv group: its q heads, k, v] (Falcon), not [q; k; v] (Phi-3)
    fused_qkv_grouped: bool = False
    # softmax scale; None = head_dim**-0.5 (Gemma2/3: query_pre_attn_scalar**-0.5, Granite: attention_multiplier)
    attention_scale: float | None = None
    # scores -> cap * tanh(scores / cap) before the mask (Gemma2); takes the explicit attention path
    attention_softcap: float | None = None
    # q_proj also yields each head's output gate; attention output times sigmoid(gate) (Qwen3.5)
    attention_output_gate: bool = False
    # (key_heads, value_heads, key_head_dim, value_head_dim, conv_kernel) of the gated DeltaNet
    # layers, those "linear_attention" in layer_types (Qwen3.5; see fnlm/models/deltanet.py)
    linear_attention: tuple[int, ...] = ()
    # (q_lora_rank or 0, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim) of
    # multi-head latent attention (DeepSeek-V3; see fnlm/models/mla.py): head_dim is q/k's
    # nope + rope width, rotary_dim the rope part's
    latent_attention: tuple[int, ...] = ()

    # rope
    nope_layers: tuple[int, ...] = ()  # layers whose q, k get no rotary embedding (SmolLM3)
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # frozen HF rope parameters beyond theta (rope_type, factor, ...)
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048
    rope_interleaved: bool = False  # rotate pairs (x0, x1), (x2, x3), not halves (Cohere)
    # sliding-window layers have their own rope base and parameters (Gemma3); None = the global ones
    local_rope_theta: float | None = None
    local_rope_scaling: tuple = ()
    # the checkpoint's max_position_embeddings (filled in __post_init__): dynamic / longrope / yarn
    # scale relative to it even after `fnlm.load(max_seq_length=L)` raises max_position_embeddings
    rope_native_length: int | None = None

    # norms, residuals, embeddings, logits
    norm_eps: float = 1e-6
    # "rms" (RMSNorm) | "layer" (LayerNorm: Cohere without bias, StarCoder2 / Falcon with)
    norm_type: str = "rms"
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores w - 1, offset 1
    pre_norms: bool = True  # norm the input of attention and MLP (all but OLMo2)
    post_norms: bool = False  # norm attention / MLP outputs before the add (Gemma2/3, OLMo2)
    parallel_block: bool = False  # x + attn(norm(x)) + mlp(norm(x)) (Cohere, Falcon)
    residual_scale: float = 1.0  # block outputs times this before the add (Granite)
    # embeddings times this, rounded to the weight dtype (Gemma: sqrt(hidden); Granite: embedding_multiplier)
    embedding_scale: float | None = None
    logit_scale: float = 1.0  # logits times this (Cohere logit_scale; Granite 1 / logits_scaling)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma2)
    tie_word_embeddings: bool = False

    # MLP: gated act(gate) * up (SwiGLU / GeGLU) or ungated; activation is a key of ACTIVATIONS
    activation: str = "silu"
    mlp_gated: bool = True  # False: down(act(up(x))), no gate (StarCoder2, Falcon)
    mlp_bias: bool = False
    # gated activation clamped (gate <= limit, |up| <= limit) as (up + 1) * gate * sigmoid(alpha *
    # gate) (gpt-oss's experts); None = the plain GLU of `activation`
    glu_limit: float | None = None
    glu_alpha: float = 1.0

    # mixture of experts (Mixtral, Qwen2/3-MoE): the layers in moe_layers route each token to
    # experts_per_token of num_experts expert MLPs of width moe_intermediate_size
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int | None = None  # None = intermediate_size
    moe_layers: tuple[int, ...] = ()
    moe_renormalize: bool = True  # top-k weights renormalized to sum 1 (Qwen: norm_topk_prob)
    shared_expert_size: int = 0  # width of the expert every token also uses, gated (Qwen2-MoE)
    # router scores: "softmax" (Mixtral, Qwen) or "sigmoid" (DeepSeek-V3, GLM-4.5: experts chosen
    # by sigmoid + the router's correction bias in moe_groups groups of which the moe_topk_groups
    # best compete, weighted by the uncorrected sigmoid; see fnlm.models.moe.route)
    moe_scoring: str = "softmax"
    moe_groups: int = 1  # n_group (sigmoid scoring only)
    moe_topk_groups: int = 1  # topk_group
    moe_routed_scale: float = 1.0  # routing weights times this (routed_scaling_factor)

    # special tokens (from config.json; the tokenizer has the final word)
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    # the multimodal checkpoint this is the text tower of ("gemma3", "mistral3"; None = a text
    # checkpoint): its language-model tensors are renamed to the text model's, the others skipped
    text_tower_of: str | None = None

    # the checkpoint's own dtype name ("bfloat16", ...), kept for export
    torch_dtype: str | None = None
    # the original config.json, frozen, so exports can write it back
    hf_config: str = field(default="", compare=False, repr=False)  # config.json text (`hf_dict`)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        if self.rope_native_length is None:
            object.__setattr__(self, "rope_native_length", self.max_position_embeddings)
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"activation {self.activation!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
            )
        if self.norm_type not in ("rms", "layer"):
            raise ConfigError(f"norm_type must be 'rms' or 'layer'; got {self.norm_type!r}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(
                f"experts per token ({self.experts_per_token}) must lie in [1, {self.num_experts}]"
            )
        if self.num_experts:
            _check_groups(self)
        if self.linear_attention:
            _check_linear_attention(self.linear_attention)
        if self.latent_attention:
            _check_latent_attention(self.latent_attention)

    @property
    def rotary_dim(self) -> int:
        if self.latent_attention:
            return self.latent_attention[3]
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope(self) -> dict:
        """The rope parameters as a dict (rope_type, factor, ...), without rope_theta."""
        return _thaw(self.rope_scaling) if self.rope_scaling else {}

    @property
    def expert_size(self) -> int:
        """Width of each routed expert's MLP."""
        return self.moe_intermediate_size or self.intermediate_size

    def local_rope(self, layer: int) -> bool:
        """Whether layer `layer` uses the local (sliding-window) rope tables instead of the global ones."""
        return self.local_rope_theta is not None and self.window(layer) is not None

    def window(self, layer: int) -> int | None:
        """The sliding window of one layer, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def hf_dict(self) -> dict:
        """The original transformers config.json as a dict."""
        return json.loads(self.hf_config) if self.hf_config else {}

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)


def _check_linear_attention(sizes: tuple[int, ...]) -> None:
    """The gated DeltaNet sizes: five positive integers, each key head serving a whole number of
    value heads (transformers repeats q and k per value head)."""
    names = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim")
    names += ("linear_value_head_dim", "linear_conv_kernel_dim")
    if len(sizes) != len(names) or not all(isinstance(v, int) and v > 0 for v in sizes):
        raise ConfigError(f"{', '.join(names)} must be positive integers; got {sizes}")
    if sizes[1] % sizes[0]:
        raise ConfigError(
            f"linear_num_value_heads ({sizes[1]}) must be a multiple of linear_num_key_heads "
            f"({sizes[0]})"
        )


def _check_latent_attention(sizes: tuple[int, ...]) -> None:
    """The MLA sizes: q_lora_rank (0: none) and qk_nope_head_dim non-negative integers,
    kv_lora_rank, qk_rope_head_dim (even: rotary turns pairs) and v_head_dim positive ones."""
    names = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    least = (0, 1, 0, 2, 1)
    if len(sizes) != len(names):
        raise ConfigError(f"latent_attention holds {', '.join(names)}; got {sizes}")
    for name, value, low in zip(names, sizes, least, strict=True):
        if not isinstance(value, int) or value < low or (name == "qk_rope_head_dim" and value % 2):
            kind = "an even integer >= 2" if name == "qk_rope_head_dim" else f"an integer >= {low}"
            raise ConfigError(f"{name} must be {kind}; got {value!r}")


def _check_groups(config: ModelConfig) -> None:
    """The router's groups: sigmoid scoring only, dividing the experts, each group holding two
    (its score is its best two), and enough experts in the chosen groups for the top-k."""
    groups, chosen = config.moe_groups, config.moe_topk_groups
    if config.moe_scoring not in ("softmax", "sigmoid"):
        raise ConfigError(f"moe_scoring must be 'softmax' or 'sigmoid'; got {config.moe_scoring!r}")
    if groups == 1 and chosen == 1:
        return
    if config.moe_scoring != "sigmoid":
        raise ConfigError(f"n_group {groups} > 1 needs sigmoid router scoring (noaux_tc)")
    if groups < 1 or config.num_experts % groups or config.num_experts // groups < 2:
        raise ConfigError(
            f"n_group ({groups}) must divide the {config.num_experts} routed experts into groups "
            "of at least two"
        )
    if not 0 < chosen <= groups or chosen * config.num_experts // groups < config.experts_per_token:
        raise ConfigError(
            f"topk_group ({chosen}) must lie in [1, n_group={groups}] and its groups hold at "
            f"least num_experts_per_tok ({config.experts_per_token}) experts"
        )


def hf_text(config: dict) -> str:
    """The transformers config as kept on ModelConfig.hf_config: JSON text, exact and hashable
    (frozen tuples cannot tell an empty list from an empty dict)."""
    return json.dumps(config, sort_keys=True)


def freeze(value: Any) -> tuple:
    """Public alias for family files: freeze a JSON value (dict/list) into a hashable tuple."""
    return _freeze(value)
