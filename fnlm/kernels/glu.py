"""Gated linear units (SwiGLU, GeGLU): plain-torch reference (Triton kernels follow)."""

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed as transformers does (in the input dtype)."""
    return F.silu(gate) * up


def geglu_reference(
    gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh"
) -> torch.Tensor:
    """gelu(gate) * up with gelu exact ("none") or tanh-approximated ("tanh")."""
    return F.gelu(gate, approximate=approximate) * up
