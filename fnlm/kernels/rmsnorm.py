"""RMSNorm: plain-torch reference (Triton kernels follow)."""

import torch


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> torch.Tensor:
    """RMSNorm exactly as transformers computes it (fp32 statistics, then the dtype dance)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * y.to(x.dtype)
    return (y * (offset + weight.float())).to(x.dtype)
