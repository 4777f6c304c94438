"""Adapted leaves: what the decoder sees after `attach` in place of an adapted weight.

Each carries its own computation (`linear`, `embedding`, `expert_matmul`) and `merged_weight`:
they implement the weight-leaf protocols of fnlm.params (LinearLeaf, EmbeddingLeaf, ExpertsLeaf),
named as bases so that the decoder's check is a lookup; the decoder never knows a weight is
adapted. Pytree children are the tensors; the scale and flags are static context (`static_field`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fnlm import quant
from fnlm.lora.linear import lora_linear
from fnlm.models import moe
from fnlm.params import EmbeddingLeaf, ExpertsLeaf, LinearLeaf, register_pytree, static_field


@register_pytree
@dataclass(frozen=True, eq=False)
class LoraLinear(LinearLeaf):
    """A linear weight W (dense or quantized) plus scale·B·A, with dropout on the adapter input
    in training: y = x W^T + bias + scale · (dropout(x) A^T) B^T, as PEFT's lora.Linear computes it
    (the adapter path in the adapters' dtype, the sum cast back to the base output's dtype)."""

    weight: Any  # [out, in] tensor or quantized leaf
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float = static_field()
    dropout: float = static_field(0.0)
    training: bool = static_field(False)

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


@register_pytree
@dataclass(frozen=True, eq=False)
class LoraEmbedding(EmbeddingLeaf):
    """An embedding table W [vocab, hidden] plus PEFT's embedding adapter: rows of A^T [vocab, r]
    looked up per token, times B^T [r, hidden], times scale. PEFT applies no dropout here."""

    weight: Any  # [vocab, hidden]
    a: torch.Tensor  # [r, vocab]
    b: torch.Tensor  # [hidden, r]
    scale: float = static_field()
    padding_idx: int | None = static_field(None)

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


@register_pytree
@dataclass(frozen=True, eq=False)
class LoraExperts(ExpertsLeaf):
    """An expert stack W (dense [E, out, in] or quantized [E·out, in]) plus, per expert e,
    scale·B_e·A_e: each sorted row x of expert e gives x W_e^T + scale · (x A_e^T) B_e^T, the
    adapter path in the adapters' dtype and the sum cast back to the base output's dtype (as
    LoraLinear). The decoder calls `expert_matmul` instead of `moe.matmul` for such a leaf.
    peft's ParamWrapper adds the same delta to W before its matmul; no dropout (peft refuses it)."""

    weight: Any  # [E, out, in] tensor or quantized [E·out, in]
    a: torch.Tensor  # [E, r, in]
    b: torch.Tensor  # [E, out, r]
    scale: float = static_field()

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


@register_pytree
@dataclass(frozen=True, eq=False)
class SavedEmbedding(EmbeddingLeaf):
    """A trainable copy of the embedding table (modules_to_save). transformers' nn.Embedding has
    padding_idx = pad_token_id, so the pad row gets no gradient; the copy keeps that."""

    weight: torch.Tensor  # [vocab, hidden]
    padding_idx: int | None = static_field(None)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight, padding_idx=self.padding_idx)

    def merged_weight(self) -> torch.Tensor:
        return self.weight
