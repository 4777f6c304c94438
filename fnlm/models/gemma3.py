"""Gemma 3 (text): Gemma 2's block with q/k RMSNorm, no attention soft-capping (transformers does
not apply it), five sliding layers per global one, and a separate rope base for sliding layers."""

from fnlm.config import ModelConfig
from fnlm.errors import UnsupportedModelError
from fnlm.models import gemma2, llama
from fnlm.models.gemma import gemma_fields

MODEL_TYPES = ("gemma3_text",)


def rope_fields(hf: dict) -> dict:
    """Global and local rope from transformers v5's per-layer-type `rope_parameters`, or from v4's
    rope_theta (global), rope_local_base_freq (local) and rope_scaling (global only)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
        full, local = {**(hf.get("rope_scaling") or {}), **params}, {}
    full = llama.rope_fields({"rope_parameters": full, "rope_theta": hf.get("rope_theta", 1e6)})
    local = llama.rope_fields(
        {"rope_parameters": local, "rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    )
    return {
        **full,
        "local_rope_theta": local["rope_theta"],
        "local_rope_scaling": local["rope_scaling"],
    }


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(
            "gemma3_text with use_bidirectional_attention (an embedding model) is not supported; "
            "fnlm runs causal decoders"
        )
    fields = dict(
        activation="silu",
        qk_norm=True,
        post_norms=True,
        attention_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
        final_softcap=hf.get("final_logit_softcapping"),
        sliding_window=hf.get("sliding_window", 4096),
        layer_types=gemma2.layer_types(hf, hf.get("sliding_window_pattern", 6)),
        partial_rotary_factor=1.0,
        **gemma_fields(hf),
        **rope_fields(hf),
    )
    return llama.translate(hf, **fields).replace(
        activation=hf.get("hidden_activation") or "gelu_pytorch_tanh"
    )


weight_names = gemma2.weight_names  # Gemma 2's names; q_norm / k_norm come from config.qk_norm
