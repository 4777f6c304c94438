"""Multi-head latent attention (MLA): DeepSeek-V2/V3's attention (transformers'
DeepseekV3Attention), run by the shared decoder in place of its q/k/v projections.

One layer's params (under "attn", so LoRA paths read like attention's), with H heads, dn / dr the
no-rope / rope part of each q and k head, dv the value head and the two latent ranks:
    q [H·(dn+dr), hidden]                        without q_lora_rank, else
    q_a [q_rank, hidden] (+ q_a_bias), q_a_norm [q_rank], q_b [H·(dn+dr), q_rank]
    kv_a [kv_rank + dr, hidden] (+ kv_a_bias)    the compressed kv, then the rope key k_pe
    kv_a_norm [kv_rank]
    kv_b [H·(dn+dv), kv_rank]                    per head: its k_nope rows, then its v rows
    o [hidden, H·dv] (+ o_bias)

q = q_b(norm(q_a(x))) (or q(x)), per head [q_nope | q_rope]; k per head [k_nope | k_pe], k_pe
one rope key that every head shares; rotary runs on the rope parts only (interleaved pairs when
`rope_interleave`: transformers writes the rotated pairs as halves, fnlm in place — the same
permutation of q and k, so the same scores). The latent norms use eps 1e-6 whatever rms_norm_eps
says (transformers builds them with the default). The softmax scale is `config.attention_scale`:
(dn+dr)^-1/2, times yarn's mscale(factor, mscale_all_dim)^2 (fnlm.models.deepseek_v3).

KV cache: each layer stores the decompressed keys and values per head, [batch, H, len, width]
with width = max(dn+dr, dv) (the narrower one zero-padded), the cache every other family uses.
That is simple and exact, not small: the compressed latent (kv_rank + dr values per token, what
transformers caches) would be H·2·width / (kv_rank + dr) times smaller (DeepSeek-V3:
2·128·192 / 576, ~85x), at the cost of decompressing the whole prefix every step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fnlm import kernels
from fnlm.config import ModelConfig
from fnlm.models import decoder  # imports this module back: see its import of it

# transformers' DeepseekV3RMSNorm(q_lora_rank) / (kv_lora_rank): the default eps, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


class Sizes(NamedTuple):
    q_rank: int  # 0: a plain q projection
    kv_rank: int
    nope: int  # dn
    rope: int  # dr
    value: int  # dv


def sizes(config: ModelConfig) -> Sizes:
    return Sizes(*config.latent_attention)


def cache_width(config: ModelConfig) -> int:
    """The head width of one layer's KV cache: keys and values share it (see the module doc)."""
    n = sizes(config)
    return max(n.nope + n.rope, n.value)


def attention(
    config: ModelConfig,
    p: dict,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask,
    kv: tuple | None = None,
) -> torch.Tensor:
    """One MLA layer: x [batch, seq, hidden] -> [batch, seq, hidden]. cos, sin, mask and kv as
    fnlm.models.decoder.attention takes them (kv's caches [batch, H, max_len, cache_width])."""
    n, heads = sizes(config), config.num_heads
    batch, seq, _ = x.shape
    if "q" in p:
        q = decoder.linear(x, p["q"])
    else:
        q_latent = decoder.linear(x, p["q_a"], p.get("q_a_bias"))
        q = decoder.linear(kernels.rms_norm(q_latent, p["q_a_norm"], LATENT_NORM_EPS), p["q_b"])
    q_nope, q_rope = q.view(batch, seq, heads, n.nope + n.rope).split([n.nope, n.rope], dim=-1)
    latent, k_rope = decoder.linear(x, p["kv_a"], p.get("kv_a_bias")).split(
        [n.kv_rank, n.rope], dim=-1
    )
    latent = kernels.rms_norm(latent, p["kv_a_norm"], LATENT_NORM_EPS)
    k_nope, v = (
        decoder.linear(latent, p["kv_b"])
        .view(batch, seq, heads, n.nope + n.value)
        .split([n.nope, n.value], dim=-1)
    )
    q_rope, k_rope = kernels.apply_rope(
        q_rope, k_rope.reshape(batch, seq, 1, n.rope), cos, sin, interleaved=config.rope_interleaved
    )
    q = torch.cat([q_nope, q_rope], dim=-1)
    k = torch.cat([k_nope, k_rope.expand(-1, -1, heads, -1)], dim=-1)
    # [batch, heads, seq, width]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kv is not None:
        width = kv[0].shape[-1]
        k, v = decoder.update_cache(
            kv, F.pad(k, (0, width - k.shape[-1])), F.pad(v, (0, width - v.shape[-1]))
        )
        k, v = k[..., : n.nope + n.rope], v[..., : n.value]
    out = decoder.attend(config, q, k, v, mask)
    out = out.transpose(1, 2).reshape(batch, seq, heads * n.value)
    return decoder.linear(out, p["o"], p.get("o_bias"))
