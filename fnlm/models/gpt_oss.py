"""gpt-oss: attention with a learned sink logit per head, q/k/v/o biases, sliding and full layers
alternating, yarn rope; every MLP is a mixture of experts with a biased router (softmax over the
top-k logits, the same as renormalized top-k), per-expert biases and a clamped SwiGLU
((up + 1) * gate * sigmoid(1.702 * gate), gate <= 7, |up| <= 7).

The checkpoint holds each expert stack transposed, [E, in, out], with gate and up interleaved
column by column (gate_up_proj [E, H, 2I]); the params hold fnlm's stacks [E, out, in] with the
gate rows before the up rows (`to_params` / `to_checkpoint` convert). Checkpoints as OpenAI ships
them store the expert stacks in MXFP4 (`*_blocks` + `*_scales`): `checkpoint_stream` dequantizes
each pair as it streams by, so the model loads 16-bit or, with quant="nf4", re-quantized to NF4.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fnlm.config import ModelConfig
from fnlm.errors import CheckpointError
from fnlm.models import gemma2, llama

MODEL_TYPES = ("gpt_oss",)

STACKS = {"gate_up_proj": "gate_up", "down_proj": "down"}
DEFAULT_ROPE = {
    "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
    "original_max_position_embeddings": 4096,
}  # fmt: skip


def config_from_hf(hf: dict) -> ModelConfig:
    hf = {
        **hf,
        "rope_parameters": hf.get("rope_parameters") or hf.get("rope_scaling") or DEFAULT_ROPE,
    }
    hf.setdefault("rope_theta", hf["rope_parameters"].get("rope_theta", 150000.0))
    return llama.translate(
        hf,
        attention_bias=bool(hf.get("attention_bias", True)),
        o_bias=bool(hf.get("attention_bias", True)),
        sliding_window=hf.get("sliding_window", 128),
        layer_types=gemma2.layer_types(hf, 2),
        num_experts=llama.require(hf, "num_local_experts"),
        experts_per_token=llama.require(hf, "num_experts_per_tok"),
        moe_layers=tuple(range(hf["num_hidden_layers"])),
        moe_renormalize=True,
        glu_limit=float(hf.get("swiglu_limit", 7.0)),
        glu_alpha=float(hf.get("swiglu_alpha", 1.702)),
    )


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Llama's attention names plus sinks; per layer a biased router and the four expert tensors
    (checkpoint shapes; `to_params` gives the stacks their fnlm layout)."""
    names = {k: v for k, v in llama.weight_names(config).items() if ".mlp." not in k}
    e, h, i = config.num_experts, config.hidden_size, config.expert_size
    for n in range(config.num_layers):
        pre, at = f"model.layers.{n}.", ("layers", n)
        names[pre + "self_attn.sinks"] = ((*at, "attn", "sinks"), (config.num_heads,))
        names[pre + "mlp.router.weight"] = ((*at, "mlp", "router"), (e, h))
        names[pre + "mlp.router.bias"] = ((*at, "mlp", "router_bias"), (e,))
        names[pre + "mlp.experts.gate_up_proj"] = (
            (*at, "mlp", "experts", "gate_up"),
            (e, h, 2 * i),
        )
        names[pre + "mlp.experts.gate_up_proj_bias"] = (
            (*at, "mlp", "experts_gate_up_bias"),
            (e, 2 * i),
        )
        names[pre + "mlp.experts.down_proj"] = ((*at, "mlp", "experts", "down"), (e, i, h))
        names[pre + "mlp.experts.down_proj_bias"] = ((*at, "mlp", "experts_down_bias"), (e, h))
    return names


def _stack(name: str) -> str | None:
    """ "gate_up_proj" / "down_proj" (or their "_bias") for an expert tensor's name, else None."""
    if ".mlp.experts." not in name:
        return None
    return name.rsplit(".", 1)[1]


def to_params(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor in the params' layout: expert stacks [E, in, out] -> [E, out, in], the
    gate_up stack's (and bias's) interleaved gate/up columns -> gate rows, then up rows."""
    part = _stack(name)
    if part is None:
        return tensor
    if part in STACKS:
        tensor = tensor.transpose(1, 2)
    if part.startswith("gate_up"):
        tensor = torch.cat([tensor[:, 0::2], tensor[:, 1::2]], dim=1)
    return tensor.contiguous()


def to_checkpoint(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_params`."""
    part = _stack(name)
    if part is None:
        return tensor
    if part.startswith("gate_up"):
        gate, up = tensor.chunk(2, dim=1)
        tensor = torch.stack([gate, up], dim=2).flatten(1, 2)
    if part in STACKS:
        tensor = tensor.transpose(1, 2)
    return tensor.contiguous()


# MXFP4 (OCP microscaling): 4-bit e2m1 values, two per byte (low nibble first), 32 per block with
# one power-of-two scale byte (biased by 127). transformers.integrations.mxfp4's FP4_VALUES.
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [E, out, G, 16] uint8 and scales [E, out, G] uint8 -> the stack in the checkpoint's
    layout [E, in = G·32, out], bf16 (as transformers dequantizes)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.bfloat16, device=blocks.device)
    values = torch.stack([lut[(blocks & 0x0F).int()], lut[(blocks >> 4).int()]], dim=-1)
    values = values.flatten(-2)  # [E, out, G, 32]
    values = torch.ldexp(values, (scales.int() - 127)[..., None].to(torch.bfloat16))
    return values.flatten(-2).transpose(1, 2).contiguous()


def checkpoint_stream(stream: Iterator, config: ModelConfig | None = None) -> Iterator:
    """(name, tensor, file) as the loader reads them, with each MXFP4 pair ("...gate_up_proj_blocks",
    "..._scales") replaced by the dequantized stack under its 16-bit name (`config` unused)."""
    pending: dict[str, torch.Tensor] = {}
    for name, tensor, file in stream:
        if not name.endswith(("_blocks", "_scales")) or ".mlp.experts." not in name:
            yield name, tensor, file
            continue
        base, kind = name.rsplit("_", 1)
        other = pending.pop(f"{base}_{'scales' if kind == 'blocks' else 'blocks'}", None)
        if other is None:
            pending[name] = tensor
            continue
        blocks, scales = (tensor, other) if kind == "blocks" else (other, tensor)
        if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
            raise CheckpointError(
                f"{file.name}: MXFP4 tensors {base}_blocks {tuple(blocks.shape)} and _scales "
                f"{tuple(scales.shape)} do not pair up (expected [E, out, G, 16] and [E, out, G])"
            )
        yield base, dequantize_mxfp4(blocks, scales), file
    if pending:
        raise CheckpointError(f"MXFP4 tensor {next(iter(pending))!r} has no matching blocks/scales")


# Read by fnlm.lora: peft adapts the router ("mlp.router.weight") and the expert stacks
# ("mlp.experts.gate_up_proj" / "down_proj") through target_parameters, in the checkpoint's
# layout ([E, in, out], is_transposed): the factors are fnlm's up to gate_up's row order.
PEFT_ROUTER = "router"


def peft_stack_rows(config: ModelConfig, stack: str) -> tuple[int, ...] | None:
    """peft's output row j of the "gate_up" stack is fnlm's row peft_stack_rows[j]: the checkpoint
    interleaves gate and up columns (2r gate r, 2r + 1 up r), fnlm holds gate rows, then up rows
    (see `to_params`). None for "down", whose rows agree."""
    if stack != "gate_up":
        return None
    size = config.expert_size
    return tuple(j // 2 + (size if j % 2 else 0) for j in range(2 * size))


# peft's bias="all" trains every parameter named *bias*, the router's and experts' too; fnlm
# refuses it here rather than train fewer biases than peft would.
PEFT_BIAS_ALL = False
