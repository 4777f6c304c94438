"""fnlm kernels: one dispatch switch in front of Triton kernels and their plain-torch references."""

import contextlib
import os

import torch

from fnlm.errors import ArgumentError
from fnlm.kernels.cross_entropy import fused_linear_cross_entropy_reference
from fnlm.kernels.glu import geglu_reference, swiglu_reference
from fnlm.kernels.rmsnorm import rms_norm_reference
from fnlm.kernels.rope import apply_rope_reference

_BACKENDS = ("auto", "triton", "torch")
_backend = os.environ.get("FNLM_KERNELS", "auto")


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernel runs for tensor `t` (FNLM_KERNELS / kernel_backend decide)."""
    return False


@contextlib.contextmanager
def kernel_backend(name: str):
    """Force "triton", "torch" or "auto" inside the block."""
    global _backend
    if name not in _BACKENDS:
        raise ArgumentError(
            f"kernel_backend: unknown backend {name!r}; expected one of {_BACKENDS}"
        )
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def rms_norm(x, weight, eps: float, *, offset: float = 0.0):
    return rms_norm_reference(x, weight, eps, offset)


def apply_rope(q, k, cos, sin, *, interleaved: bool = False):
    return apply_rope_reference(q, k, cos, sin, interleaved)


def swiglu(gate, up):
    return swiglu_reference(gate, up)


def geglu(gate, up, *, approximate: str = "tanh"):
    return geglu_reference(gate, up, approximate)


def fused_linear_cross_entropy(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    softcap=None,
    logit_scale=1.0,
):
    return fused_linear_cross_entropy_reference(
        hidden, weight, labels, bias, ignore_index, reduction, softcap, logit_scale
    )
