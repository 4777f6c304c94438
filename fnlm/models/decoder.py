"""The one decoder: embedding, attention, MLP, norms, residuals and lm head as plain functions.

Every supported architecture is this code driven by a `ModelConfig`; a family needing new
behaviour adds one config field and one branch here. Weights arrive as a `Params` pytree whose
linear leaves may be dense tensors, quantized leaves (`fnlm.quant`) or LoRA-adapted leaves
(`fnlm.lora`): `linear` dispatches on the leaf type, so the decoder never knows the precision.

Shapes: x [batch, seq, hidden]; q [batch, seq, heads, head_dim]; masks [batch, 1, q_len, k_len].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from fnlm import kernels, quant
from fnlm.config import ACTIVATIONS, ModelConfig
from fnlm.errors import ArgumentError

# deltanet and mla import this module back (linear, attend, update_cache): an import cycle that
# is harmless because each side reads the other's attributes only inside functions, at call
# time, so any of the three may be imported first.
from fnlm.models import deltanet, masks, mla, moe
from fnlm.models.rope import rope_tables
from fnlm.params import EmbeddingLeaf, ExpertsLeaf, LinearLeaf, Params, expect_leaf


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) for any weight leaf: dense tensor, quantized leaf or a `LinearLeaf`
    (LoRA-adapted leaves carry their own fused forward)."""
    if isinstance(w, torch.Tensor) or quant.is_quantized(w):
        return quant.linear(x, w, bias)
    return expect_leaf(w, LinearLeaf).linear(x, bias)


def embedding(tokens: torch.Tensor, w) -> torch.Tensor:
    """Row lookup for a dense, quantized or `EmbeddingLeaf` (adapted) embedding leaf."""
    if isinstance(w, torch.Tensor) or quant.is_quantized(w):
        return F.embedding(tokens, quant.dequantize(w))
    return expect_leaf(w, EmbeddingLeaf).embedding(tokens)


def norm(
    config: ModelConfig, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The config's norm over the last dim: RMSNorm (scale offset + w) or LayerNorm (bias optional).

    `w` may carry leading dims that broadcast against x (Cohere's per-head q/k norm: [heads, head_dim]).
    """
    if config.norm_type == "layer":
        return layer_norm(x, w, bias, config.norm_eps)
    return kernels.rms_norm(x, w, config.norm_eps, offset=config.norm_offset)


def layer_norm(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm in fp32 with one rounding at the end, as Cohere's; for nn.LayerNorm (StarCoder2,
    Falcon) it differs only in rounding. Plain torch: fnlm.kernels has no LayerNorm kernel yet."""
    xf = x.float()
    centered = xf - xf.mean(-1, keepdim=True)
    y = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def attention(
    config: ModelConfig,
    p: dict,
    x: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    mask: torch.Tensor | None,
    kv: tuple | None = None,
) -> torch.Tensor:
    """Self-attention of one layer. `mask` None means plain causal (lets SDPA pick flash); a
    `BlockMask` (packed rows) runs flex_attention; a boolean tensor runs SDPA with that mask.

    kv: (k_cache, v_cache, slots) when generating: this call's keys and values are written into the
    cache [batch, kv_heads, max_len, head_dim] at `slots` [seq] and the queries attend over the whole
    cache with `mask` [batch, 1, seq, max_len] (see `cache_mask`).
    """
    if "conv" in p:  # gated DeltaNet (Qwen3.5): `mask`, `kv` from deltanet.layer_mask / .state
        return deltanet.linear_attention(config, p, x, mask, kv)
    if config.latent_attention:  # multi-head latent attention (DeepSeek-V3): fnlm/models/mla.py
        return mla.attention(config, p, x, cos, sin, mask, kv)
    batch, seq, _ = x.shape
    q, k, v, gate = project_qkv(config, p, x)
    if cos is not None:  # None: a layer without rotary embeddings (SmolLM3's NoPE layers)
        q, k = kernels.apply_rope(q, k, cos, sin, interleaved=config.rope_interleaved)
    # [batch, heads, seq, head_dim]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kv is not None:
        k, v = update_cache(kv, k, v)
    out = attend(config, q, k, v, mask, p.get("sinks"))
    out = out.transpose(1, 2).reshape(batch, seq, config.num_heads * config.head_dim)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return linear(out, p["o"], p.get("o_bias"))


def attend(
    config: ModelConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v, q [batch, heads, seq, d], k/v [batch, kv_heads, k_len, d]: SDPA,
    flex_attention for packed rows' BlockMask, or `softcapped_attention` (soft-cap or sinks)."""
    # packed rows on a GPU (see fnlm.models.masks); compiled flex_attention needs head_dim >= 16
    flex = isinstance(mask, BlockMask) and sinks is None and config.head_dim >= 16
    if isinstance(mask, BlockMask) and not flex:
        mask = masks.dense(mask)
    if flex:
        return masks.flex(
            q, k, v, mask, scale=config.attention_scale, softcap=config.attention_softcap
        )
    if config.attention_softcap is None and sinks is None:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and q.shape[2] > 1,
            enable_gqa=config.num_kv_heads != config.num_heads,
            scale=config.attention_scale,
        )
    return softcapped_attention(config, q, k, v, mask, sinks)


def project_qkv(
    config: ModelConfig, p: dict, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q [batch, seq, heads, head_dim] and k, v [batch, seq, kv_heads, head_dim], q/k normed if the
    config says so, and the output gate [batch, seq, heads * head_dim] (None unless
    `attention_output_gate`). A fused "qkv" leaf (Phi-3, Falcon) is kept fused, as peft adapts it,
    and sliced."""
    batch, seq, _ = x.shape
    heads, kv_heads, d = config.num_heads, config.num_kv_heads, config.head_dim
    if "qkv" in p:
        qkv = linear(x, p["qkv"], p.get("qkv_bias"))
        if config.fused_qkv_grouped:  # Falcon: [kv group: its q heads, then k, then v]
            qkv = qkv.view(batch, seq, kv_heads, heads // kv_heads + 2, d)
            q, k, v = qkv[..., :-2, :].flatten(2, 3), qkv[..., -2, :], qkv[..., -1, :]
        else:
            q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    else:
        q = linear(x, p["q"], p.get("q_bias"))
        k = linear(x, p["k"], p.get("k_bias"))
        v = linear(x, p["v"], p.get("v_bias"))
    gate = None
    if config.attention_output_gate:  # Qwen3.5: each head's q_proj rows are its q, then its gate
        q, gate = q.view(batch, seq, heads, 2 * d).chunk(2, dim=-1)
        gate = gate.reshape(batch, seq, heads * d)
    if config.qk_norm and config.qk_norm_across_heads:  # OLMo2: one norm over all heads
        q, k = norm(config, p["q_norm"], q), norm(config, p["k_norm"], k)
    q = q.reshape(batch, seq, heads, d)
    k = k.reshape(batch, seq, kv_heads, d)
    v = v.reshape(batch, seq, kv_heads, d)
    if config.qk_norm and not config.qk_norm_across_heads:  # Qwen3, Gemma3, Cohere: per head
        q, k = norm(config, p["q_norm"], q), norm(config, p["k_norm"], k)
    return q, k, v, gate


def softcapped_attention(
    config: ModelConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with Gemma2's score soft-capping or gpt-oss's sinks, written out because SDPA
    has neither.

    q [batch, heads, q_len, d], k/v [batch, kv_heads, k_len, d]; mask as for SDPA (None = causal).
    Scores are capped before the mask and the softmax runs in fp32, as transformers' eager path.
    sinks [heads]: one extra logit per head that takes part in the softmax and is dropped after.
    """
    groups = config.num_heads // config.num_kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = config.attention_scale or config.head_dim**-0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    cap = config.attention_softcap
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    if mask is None:
        q_len, k_len = q.shape[-2], k.shape[-2]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)
        return torch.matmul(probs[..., :-1].to(q.dtype), v)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def update_cache(kv: tuple, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write k, v [batch, kv_heads, seq, head_dim] into the cache at `slots`, in place (the cache is
    a donated buffer: static addresses let a CUDA graph replay the decode step); return the whole
    cache in the compute dtype."""
    k_cache, v_cache, slots = kv
    for cache, new in ((k_cache, k), (v_cache, v)):
        if cache.dtype.itemsize == 1 and new.dtype != cache.dtype:
            # fp8 storage: torch's casts do not promise to saturate (e5m2 overflows to inf), so
            # clamp; index_copy_ has no fp8 kernels, so copy the bytes.
            limit = torch.finfo(cache.dtype).max
            new = new.clamp(-limit, limit).to(cache.dtype).view(torch.uint8)
            cache = cache.view(torch.uint8)
        cache.index_copy_(2, slots, new.to(cache.dtype))
    return k_cache.to(k.dtype), v_cache.to(v.dtype)


def mlp(config: ModelConfig, p: dict, x: torch.Tensor) -> torch.Tensor:
    """Gated MLP down(act(gate) * up), ungated down(act(up)), or a mixture of experts ("router")."""
    if "router" in p:
        return mixture_of_experts(config, p, x)
    if not config.mlp_gated:
        hidden = activation(config, linear(x, p["up"], p.get("up_bias")))
        return linear(hidden, p["down"], p.get("down_bias"))
    if "gate_up" in p:  # Phi-3 keeps gate and up fused, as peft adapts them
        gate, up = linear(x, p["gate_up"], p.get("gate_up_bias")).chunk(2, dim=-1)
    else:
        gate, up = linear(x, p["gate"], p.get("gate_bias")), linear(x, p["up"], p.get("up_bias"))
    return linear(glu(config, gate, up), p["down"], p.get("down_bias"))


def glu(config: ModelConfig, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if config.glu_limit is not None:  # gpt-oss: clamped, (up + 1) * gate * sigmoid(alpha * gate)
        gate, up = gate.clamp(max=config.glu_limit), up.clamp(-config.glu_limit, config.glu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * config.glu_alpha))
    kind = ACTIVATIONS[config.activation]
    if kind == "silu":
        return kernels.swiglu(gate, up)
    return kernels.geglu(gate, up, approximate="tanh" if kind == "gelu_tanh" else "none")


def activation(config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    kind = ACTIVATIONS[config.activation]
    if kind == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")


def mixture_of_experts(config: ModelConfig, p: dict, x: torch.Tensor) -> torch.Tensor:
    """Top-k routed experts (+ an optional shared expert, sigmoid-gated or not), summed per token.

    p: {"router": [experts, hidden], "experts": {"gate_up", "down"} stacks (see fnlm.models.moe),
    optional "router_correction" [experts] (sigmoid scoring), "shared" MLP and "shared_gate"
    [1, hidden]}. Routing follows transformers (`moe.route`: softmax or sigmoid scoring, top-k,
    weights in the compute dtype); the token/expert pairs are sorted by expert on the device and
    each stack multiplies its experts' rows in one grouped GEMM.
    """
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    router = p["router"]  # run in its dtype: fp32 where transformers keeps it so (moe.param_dtype)
    logits = linear(x.to(getattr(router, "weight", router).dtype), router, p.get("router_bias"))
    route = moe.route(config, logits, x.dtype, correction=p.get("router_correction"))
    experts = p["experts"]
    rows = x[route.tokens]
    gate_up = expert_matmul(route, rows, experts["gate_up"])
    owner = None  # gpt-oss: per-expert biases [E, out]; row i gets its expert's
    if "experts_gate_up_bias" in p or "experts_down_bias" in p:
        owner = torch.bucketize(
            torch.arange(rows.shape[0], device=x.device), route.offsets, right=True
        )
    if "experts_gate_up_bias" in p:
        gate_up = gate_up + p["experts_gate_up_bias"][owner]
    gate, up = gate_up.chunk(2, dim=-1)
    y = expert_matmul(route, glu(config, gate, up), experts["down"])
    if "experts_down_bias" in p:
        y = y + p["experts_down_bias"][owner]
    out = moe.combine(route, y * route.weights[:, None], x.shape[0])
    if "shared" in p:  # gated by sigmoid(shared_gate x) (Qwen2-MoE), else added (DeepSeek-V3)
        shared = mlp(config, p["shared"], x)
        gate = p.get("shared_gate")
        out = out + (shared if gate is None else torch.sigmoid(linear(x, gate)) * shared)
    return out.reshape(shape)


def expert_matmul(route, rows: torch.Tensor, w) -> torch.Tensor:
    """Sorted rows times their experts' matrices, for a stack leaf (an `ExpertsLeaf`, such as a
    LoRA-adapted stack, carries its own)."""
    if isinstance(w, torch.Tensor) or quant.is_quantized(w):
        return moe.matmul(route, rows, w)
    return expect_leaf(w, ExpertsLeaf).expert_matmul(route, rows)


def layer_forward(
    config: ModelConfig,
    p: dict,
    x: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    mask: torch.Tensor | None,
    kv: tuple | None = None,
) -> torch.Tensor:
    """One decoder block. Pure; compile/checkpoint unit.

    Pre-norm by default: x + attn(norm(x)), then + mlp(norm(.)); `post_norms` also norms each block
    output (Gemma2/3), `pre_norms` False drops the input norms (OLMo2), `parallel_block` feeds
    attention and MLP the same input (Cohere, Falcon; the MLP gets its own norm when the layer has a
    "norm_mlp", as Falcon-40B). Outputs are scaled by `residual_scale` (Granite) before the add.

    kv: (k_cache, v_cache, slots) of this layer when generating (see `attention`), else None."""
    if config.parallel_block:
        h = norm(config, p["norm_attn"], x, p.get("norm_attn_bias"))
        h_mlp = norm(config, p["norm_mlp"], x, p.get("norm_mlp_bias")) if "norm_mlp" in p else h
        attn = attention(config, p["attn"], h, cos, sin, mask, kv)
        return x + attn + mlp(config, p["mlp"], h_mlp)
    attn = attention(config, p["attn"], block_input(config, p, "norm_attn", x), cos, sin, mask, kv)
    x = x + block_output(config, p, "norm_attn", attn)
    out = mlp(config, p["mlp"], block_input(config, p, "norm_mlp", x))
    return x + block_output(config, p, "norm_mlp", out)


def block_input(config: ModelConfig, p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return norm(config, p[name], x, p.get(name + "_bias")) if config.pre_norms else x


def block_output(config: ModelConfig, p: dict, name: str, y: torch.Tensor) -> torch.Tensor:
    if config.post_norms:
        y = norm(config, p[name + "_post"], y)
    return y * config.residual_scale if config.residual_scale != 1.0 else y


def default_positions(tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """0..seq-1 per row, or, with a padding mask, counting only real tokens (left padding)."""
    if attention_mask is None:
        return torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_mask(
    positions: torch.Tensor,
    padding: torch.Tensor | None,
    segments: torch.Tensor | None,
    window: int | None,
) -> torch.Tensor | None:
    """Boolean [batch, 1, seq, seq] mask (True = may attend), or None for plain causal attention;
    packed rows on a GPU get a flex_attention `BlockMask` instead (`masks.document_mask`: memory
    linear in seq; flex_attention has no backward on CPUs, where the dense mask stays).

    Causality and the window use the token index; `segments` (packed examples, one id per example)
    keep attention inside each example; `padding` [batch, seq] (1 = real token) hides pad keys.
    Every query may see itself, so rows of pad queries stay finite (their outputs are ignored).
    """
    seq = positions.shape[1]
    if padding is None and segments is None and (window is None or window >= seq):
        return None
    if segments is not None and padding is None and segments.is_cuda:
        return masks.document_mask(
            segments, window if window is not None and window < seq else None
        )
    idx = torch.arange(seq, device=positions.device)
    mask = idx[None, :] <= idx[:, None]
    if window is not None:
        mask = mask & (idx[:, None] - idx[None, :] < window)
    mask = mask[None, None]
    if segments is not None:
        mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
    if padding is not None:
        mask = mask & padding.bool()[:, None, None, :]
    return mask | torch.eye(seq, dtype=torch.bool, device=positions.device)


def cache_mask(slots: torch.Tensor, valid: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [batch, 1, seq, max_len] mask over a KV cache for queries at cache `slots` [seq].

    A query at slot s sees slot j when j holds a real token (`valid` [batch, max_len], False for left
    padding), j <= s and, with a sliding window, s - j < window (token index, as `build_mask`).
    Every query sees itself, so rows of pad queries stay finite.
    """
    offset = slots[:, None] - torch.arange(valid.shape[1], device=valid.device)  # [seq, max_len]
    mask = offset >= 0
    if window is not None:
        mask = mask & (offset < window)
    return (mask[None, None] & valid[:, None, None, :]) | (offset == 0)


def window_mask(
    window: int | None,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None,
    segments: torch.Tensor | None,
    cache: dict | None,
    cache_slots: torch.Tensor | None,
):
    """The mask of the layers with this `window` in one forward: over the generation cache
    (`cache_mask`) when there is one, else `build_mask`'s."""
    if cache is not None:
        return cache_mask(cache_slots, cache["valid"], window)
    return build_mask(positions, attention_mask, segments, window)


def hidden_states(
    params: Params,
    tokens: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    layer_fn=layer_forward,
    cache: dict | None = None,
    cache_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """The final-normed hidden states [batch, seq, hidden]; `layer_fn` lets training wrap each layer
    (activation checkpointing, torch.compile) without changing the math.

    cache: a KV cache from `fnlm.generate.init_cache` ({"k": [per layer], "v": [per layer], "valid":
        [batch, max_len] bool}); the tokens' keys and values are written into it (in place) at
        `cache_slots` [seq] and attention runs over the cache (see `cache_mask`).
    """
    config = params.config
    from fnlm.models import family  # late: family modules import this one

    own = getattr(family(config.model_type), "hidden_states", None)
    if own is not None:  # a family whose layers this loop does not run (Gemma 4)
        return own(
            params, tokens, positions=positions, attention_mask=attention_mask,
            segments=segments, layer_fn=layer_fn, cache=cache, cache_slots=cache_slots,
        )  # fmt: skip
    if positions is None:
        positions = default_positions(tokens, attention_mask)
    x = embedding(tokens, params["embed"])
    if config.embedding_scale is not None:
        # Gemma rounds sqrt(hidden) to the weight dtype before multiplying; transformers does the same.
        x = x * torch.tensor(config.embedding_scale, dtype=x.dtype)
    tables = {False: rope_tables(config, positions)}
    masks: dict[int | None, torch.Tensor | None] = {}
    linear_mask = deltanet.layer_mask(config, tokens, attention_mask, segments, cache, cache_slots)
    for i, layer in enumerate(params["layers"]):
        if config.layer_types and config.layer_types[i] == "linear_attention":
            # gated DeltaNet (Qwen3.5): no rope; a padding / document mask; a recurrent state
            args = (config, layer, x, None, None, linear_mask)
            x = layer_fn(*args) if cache is None else layer_fn(*args, deltanet.state(cache, i))
            continue
        window = config.window(i)
        local = config.local_rope(i)  # Gemma3's sliding layers have their own rope base
        if local not in tables:
            tables[local] = rope_tables(config, positions, local=True)
        cos, sin = tables[local] if i not in config.nope_layers else (None, None)
        if window not in masks:
            masks[window] = window_mask(
                window, positions, attention_mask, segments, cache, cache_slots
            )
        if cache is not None:
            kv = (cache["k"][i], cache["v"][i], cache_slots)
            x = layer_fn(config, layer, x, cos, sin, masks[window], kv)
            continue
        x = layer_fn(config, layer, x, cos, sin, masks[window])
    return norm(config, params["norm"], x, params.get("norm_bias"))


def logits_from_hidden(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits of final hidden states, with the config's logit scale (Cohere, Granite) and final
    soft-cap (Gemma2)."""
    config = params.config
    logits = linear(x, params["lm_head"])
    if config.logit_scale != 1.0:
        logits = logits * config.logit_scale
    if config.final_softcap is not None:
        logits = torch.tanh(logits / config.final_softcap) * config.final_softcap
    return logits


def forward(
    params: Params,
    tokens: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [batch, seq, vocab] for `tokens` [batch, seq]. Pure: no state is read or written.

    positions: explicit per-token positions (packed sequences restart at 0); default 0..seq-1, or
        counted over real tokens when `attention_mask` is given (left padding).
    attention_mask: [batch, seq], 1 for real tokens, 0 for padding.
    segments: [batch, seq] example ids for packed rows; attention stays within an example.
    Adapters arrive attached to `params` (`fnlm.lora.with_adapters`; `fnlm.forward` takes lora=).

    Raises ArgumentError for tokens that are not a 2-D integer tensor or lie outside the vocabulary.
    """
    check_tokens(params.config, tokens)
    x = hidden_states(
        params, tokens, positions=positions, attention_mask=attention_mask, segments=segments
    )
    return logits_from_hidden(params, x)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_tokens(config: ModelConfig, tokens: torch.Tensor) -> None:
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.dim() != 2
        or tokens.dtype not in (torch.int32, torch.int64)
    ):
        got = (
            f"{tuple(tokens.shape)} {tokens.dtype}"
            if isinstance(tokens, torch.Tensor)
            else type(tokens).__name__
        )
        raise ArgumentError(f"tokens must be an integer tensor [batch, seq]; got {got}")
    # (no host sync while compiling or capturing a CUDA graph: the trainer checks ids before)
    if tokens.numel() and not torch.compiler.is_compiling() and not _capturing():
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= config.vocab_size:
            raise ArgumentError(
                f"token ids must lie in [0, {config.vocab_size}) for this model; got ids from {low} to {high}"
            )
