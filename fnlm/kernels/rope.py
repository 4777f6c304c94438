"""Rotary position embedding: plain-torch reference (Triton kernels follow)."""

import torch


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    half = cos.shape[-1]
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    xf = x.float()
    rot, rest = xf[..., : 2 * half], xf[..., 2 * half :]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, rest), dim=-1).to(x.dtype)


def apply_rope_reference(q, k, cos, sin, interleaved: bool = False):
    """Rotate the first 2 * cos.shape[-1] dims of every head of q and k; fp32 math, one rounding."""
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
