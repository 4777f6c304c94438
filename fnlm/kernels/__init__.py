"""fnlm kernels: the one door to every Triton kernel, in front of their plain-torch references.

One file per op (Liger-Kernel's `ops/` layout): its `@triton.jit` kernels, a launcher per
direction, the torch custom-op registration and the plain-torch reference. The rest of fnlm calls
the functions here, never those files: rms_norm, apply_rope, swiglu, geglu,
fused_linear_cross_entropy (differentiable), and the frozen-weight NF4 ops nf4_dequantize, nf4_gemv,
nf4_small_gemm and nf4_expert_gemv (no autograd: fnlm.quant builds the differentiable linear on them). Kernels
read quantized weights through their attributes (`nf4.NF4Layout`) and never import fnlm.quant.

Every function here has the same signature on both paths. On CUDA tensors
the Triton kernels run (as torch custom ops, so torch.compile(fullgraph=True) traces them as
single nodes); elsewhere the references run, except the fused cross-entropy, which always uses its
chunked algorithm (with torch instead of Triton for the per-row part) so the full logits never exist.

The switch: the environment variable FNLM_KERNELS, read when this module is imported, or the
`kernel_backend` context manager: "auto" (default: Triton on CUDA, reference elsewhere),
"triton" (force, e.g. CPU tensors under TRITON_INTERPRET=1 in tests) or "torch" (reference).
"""

import contextlib
import os
from collections.abc import Iterator

import torch

from fnlm.errors import ArgumentError

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # macOS, Windows, CPU-only installs: the plain-torch references run
    HAS_TRITON = False


class _NoTriton:
    """Stands in for a triton object while the kernel files are imported without triton: their
    decorators (`@triton.jit`) and constants (`tl.constexpr(...)`, `tl.float16`) only need to
    exist; launching a kernel (`kernel[grid](...)`) raises."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _NoTriton(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        return _NoTriton(self._name)

    def __getitem__(self, grid):
        raise ArgumentError(
            f"{self._name}: Triton is not installed, so its kernels cannot run; install triton "
            "(Linux with a GPU) or use the plain-torch path (FNLM_KERNELS=torch, the default off CUDA)"
        )


@contextlib.contextmanager
def _triton_stand_in() -> Iterator[None]:
    """Without triton, a stand-in `triton` / `triton.language` in sys.modules while the kernel
    files are imported, removed afterwards so that nothing else (torch included) sees it."""
    if HAS_TRITON:
        yield
        return
    import sys
    import types

    modules = {}
    for name in ("triton", "triton.language"):
        module = types.ModuleType(name)
        module.__getattr__ = _NoTriton(name).__getattr__  # __file__ etc. stay absent
        modules[name] = module
    modules["triton"].language = modules["triton.language"]
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            sys.modules.pop(name, None)


with _triton_stand_in():
    from fnlm.kernels import deltanet as _deltanet
    from fnlm.kernels.cross_entropy import (
        fused_linear_cross_entropy_op,
        fused_linear_cross_entropy_reference,
    )
    from fnlm.kernels.deltanet import (
        gated_delta_rule_chunked,
        gated_delta_rule_recurrent,
    )
    from fnlm.kernels.glu import geglu_reference, glu_op, swiglu_reference
    from fnlm.kernels.nf4 import (
        NF4_CODE,
        NF4Layout,
        dequantize_nf4,
        dequantize_nf4_reference,
        nf4_args,
        nf4_dequantize_op,
    )
    from fnlm.kernels.nf4_gemm import (
        SMALL_GEMM_MAX_ROWS,
        nf4_small_gemm_fwd,
        nf4_small_gemm_op,
        nf4_small_gemm_reference,
    )
    from fnlm.kernels.nf4_gemm import small_gemm_supported as nf4_small_gemm_supported
    from fnlm.kernels.nf4_gemv import (
        GEMV_MAX_BATCH,
        nf4_gemv_fwd,
        nf4_gemv_op,
        nf4_gemv_reference,
    )
    from fnlm.kernels.nf4_gemv import gemv_supported as nf4_gemv_supported
    from fnlm.kernels.nf4_moe import (
        check_expert_gemv,
        expert_gemv_op,
        expert_gemv_reference,
    )
    from fnlm.kernels.nf4_moe import expert_gemv_supported as nf4_expert_gemv_supported
    from fnlm.kernels.rmsnorm import rms_norm_op, rms_norm_reference
    from fnlm.kernels.rope import apply_rope_reference, rope_op

__all__ = [
    "GEMV_MAX_BATCH",
    "NF4_CODE",
    "SMALL_GEMM_MAX_ROWS",
    "NF4Layout",
    "apply_rope",
    "apply_rope_reference",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "gated_delta_rule",
    "gated_delta_rule_recurrent",
    "geglu",
    "geglu_reference",
    "kernel_backend",
    "nf4_dequantize",
    "nf4_expert_gemv",
    "nf4_expert_gemv_supported",
    "nf4_gemv",
    "nf4_gemv_supported",
    "nf4_small_gemm",
    "nf4_small_gemm_supported",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "use_triton",
]

_BACKENDS = ("auto", "triton", "torch")


def _checked_backend(name: str, where: str) -> str:
    if name not in _BACKENDS:
        raise ArgumentError(
            f"{where}: unknown kernel backend {name!r}; expected one of {', '.join(_BACKENDS)}"
        )
    if name == "triton" and not HAS_TRITON:
        raise ArgumentError(f"{where}: backend 'triton' asked for, but triton is not installed")
    return name


_backend = _checked_backend(
    os.environ.get("FNLM_KERNELS", "auto"), "environment variable FNLM_KERNELS"
)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernel runs for an input tensor `t` under the current backend (never
    without triton installed)."""
    if not HAS_TRITON:
        return False
    if _backend == "auto":
        return t.is_cuda
    return _backend == "triton"


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """Inside the block, force the backend: "triton", "torch" or "auto".

    >>> with kernel_backend("triton"):  # CPU tensors too, under TRITON_INTERPRET=1
    ...     y = rms_norm(x, w, 1e-6)
    """
    global _backend
    previous, _backend = _backend, _checked_backend(name, "kernel_backend")
    try:
        yield
    finally:
        _backend = previous


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0
) -> torch.Tensor:
    """RMSNorm over the last dim with transformers' semantics (fp32 statistics).

    offset 0 (Llama, Qwen, Mistral): weight * normalized(x).to(x.dtype), dtype promoted with weight's;
    offset 1 (Gemma): (normalized(x) * (1 + weight)).to(x.dtype).
    x: [..., hidden], weight: [hidden]. Raises ArgumentError when the sizes disagree.
    """
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ArgumentError(
            f"rms_norm: weight of shape {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}"
        )
    if use_triton(x):
        return rms_norm_op(x, weight, float(eps), float(offset))[0]
    return rms_norm_reference(x, weight, eps, offset)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [batch, seq, q_heads, head_dim] and k [batch, seq, kv_heads, head_dim].

    cos, sin: [batch (or 1), seq, rotary_dim // 2], fp32, one row per token (packed sequences and
    left padding pass their own positions). The first rotary_dim dims of each head rotate, the rest
    pass through. Half-split pairs (x[i], x[i + rotary_dim/2]) as transformers' rotate_half, or
    interleaved pairs (x[2i], x[2i+1]) when interleaved=True. Returns (q, k) in their dtypes.
    """
    half = cos.shape[-1]
    if (
        q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape
        or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]
        or cos.shape[0] not in (1, q.shape[0]) or cos.shape[1] != q.shape[1] or 2 * half > q.shape[-1]
    ):  # fmt: skip
        raise ArgumentError(
            f"apply_rope: expected q [b, s, hq, d], k [b, s, hk, d], cos and sin [b or 1, s, r/2] with r <= d; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    if use_triton(q):
        return rope_op(q, k, cos, sin, interleaved, False)
    return apply_rope_reference(q, k, cos, sin, interleaved)


def _check_glu(name: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ArgumentError(
            f"{name}: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
            "must have the same shape and dtype"
        )


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Llama, Qwen, Mistral MLP). gate and up: same shape and dtype."""
    _check_glu("swiglu", gate, up)
    if use_triton(gate):
        return glu_op(gate, up, "silu")
    return swiglu_reference(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate) * up (Gemma MLP); approximate "tanh" (gelu_pytorch_tanh) or "none" (exact gelu)."""
    _check_glu("geglu", gate, up)
    if approximate not in ("tanh", "none"):
        raise ArgumentError(f"geglu: approximate must be 'tanh' or 'none', got {approximate!r}")
    if use_triton(gate):
        return glu_op(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
    return geglu_reference(gate, up, approximate)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    chunk: int = 64,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked gated delta rule (Gated DeltaNet; see fnlm.kernels.deltanet), q and k L2-normed
    inside, as transformers' torch_chunk_gated_delta_rule. Differentiable.

    q, k [batch, seq, key_heads, dk]; v [batch, seq, value_heads, dv] (value_heads a multiple of
    key_heads); g (log decay) and beta [batch, seq, value_heads]; initial_state [batch,
    value_heads, dk, dv] or None (zeros); reset [batch, seq] bool or None (True: the state is
    zeroed before that token — a packed document's start). Returns (o [batch, seq, value_heads, dv] in q's dtype,
    final state fp32). Where `use_triton(q)`, the scan over chunks is the Triton kernel, the split
    one (fnlm.kernels.deltanet_split) or torch's loop, as fnlm.kernels.deltanet.SCAN_BACKEND
    (FNLM_DELTANET_SCAN) says.
    """
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2:]
    if (
        k.shape != q.shape or v.shape[:2] != (b, t) or hv % hk
        or g.shape != (b, t, hv) or beta.shape != (b, t, hv)
        or (initial_state is not None and initial_state.shape != (b, hv, dk, dv))
        or (reset is not None and (reset.shape != (b, t) or reset.dtype != torch.bool))
    ):  # fmt: skip
        raise ArgumentError(
            "gated_delta_rule: expected q, k [b, t, hk, dk], v [b, t, hv, dv] (hv a multiple of "
            "hk), g and beta [b, t, hv], initial_state [b, hv, dk, dv], reset bool [b, t]; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
            f"beta {tuple(beta.shape)}, initial_state "
            f"{None if initial_state is None else tuple(initial_state.shape)}, reset "
            f"{None if reset is None else (tuple(reset.shape), reset.dtype)}"
        )
    backend = _deltanet.SCAN_BACKEND
    if backend not in _deltanet.SCAN_BACKENDS:
        raise ArgumentError(
            f"the gated delta rule's scan backend (FNLM_DELTANET_SCAN) is {backend!r}; expected "
            f"one of {_deltanet.SCAN_BACKENDS}"
        )
    triton_scan = use_triton(q) and backend != "torch"
    return gated_delta_rule_chunked(
        q, k, v, g, beta, initial_state, chunk=chunk, triton_scan=triton_scan,
        split=backend == "split", reset=reset,
    )  # fmt: skip


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """Cross-entropy of the logits (hidden @ weight.T (+ bias)) * logit_scale, soft-capped as
    softcap * tanh(logits / softcap) when softcap is set, without building the [N, vocab] logits.

    hidden [N, H] (or [..., H] with labels [...]), weight [vocab, H], labels int64 with
    ignore_index for tokens that do not count. reduction "mean": mean over non-ignored tokens (0
    when there are none); "sum": plain sum, for gradient accumulation with an external normalizer.
    Returns an fp32 scalar. Gradients flow to hidden, weight and bias where they require grad.
    chunk_rows: tokens per chunk (0: as many as fit fnlm.kernels.cross_entropy.CHUNK_LOGITS_BYTES).
    Raises ArgumentError on mismatched shapes or a label outside [0, vocab).
    """
    if reduction not in ("mean", "sum"):
        raise ArgumentError(
            f"fused_linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}"
        )
    if (
        weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or labels.shape != hidden.shape[:-1]
        or (bias is not None and bias.shape != weight.shape[:1])
    ):  # fmt: skip
        raise ArgumentError(
            "fused_linear_cross_entropy: expected hidden [N, H], weight [vocab, H], labels [N], bias [vocab]; got "
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}"
            + (f", bias {tuple(bias.shape)}" if bias is not None else "")
        )
    if hidden.dtype != weight.dtype or labels.dtype != torch.int64:
        raise ArgumentError(
            f"fused_linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype "
            f"and labels must be int64 (got {labels.dtype})"
        )
    if softcap is not None and softcap <= 0:
        raise ArgumentError(
            f"fused_linear_cross_entropy: softcap must be positive or None, got {softcap}"
        )
    grad_on = torch.is_grad_enabled()
    loss, *_ = fused_linear_cross_entropy_op(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        labels.reshape(-1),
        int(ignore_index),
        reduction,
        None if softcap is None else float(softcap),
        float(logit_scale),
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
        use_triton(hidden),
        int(chunk_rows),
    )
    return loss


def nf4_dequantize(w: NF4Layout, *, triton: bool | None = None) -> torch.Tensor:
    """w's weight [out, in] in w.dtype, bit-exact with bitsandbytes' dequantize_4bit.

    triton: force the kernel (True) or the reference (False); None: `use_triton(w.packed)`.
    Under torch.compile the kernel is its custom op; run eagerly (as inside the linear and LoRA
    custom ops of a compiled training step) the launcher is called directly, which saves the op
    dispatch on each of the step's ~20 dequantizes per layer.
    """
    if triton is None:
        triton = use_triton(w.packed)
    args = (*nf4_args(w), w.dtype)
    if not triton:
        return dequantize_nf4_reference(*args)
    if torch.compiler.is_compiling():
        return nf4_dequantize_op(*args)
    return dequantize_nf4(*args)


def nf4_gemv(
    x: torch.Tensor,
    w: NF4Layout,
    bias: torch.Tensor | None = None,
    *,
    triton: bool | None = None,
) -> torch.Tensor:
    """Fused NF4 GEMV for decode: x [batch <= ~8, in] @ dequantize(w).T (+ bias) -> [batch, out]
    in x's dtype, reading each weight byte once and never materializing the 16-bit weight; the
    weights are rounded to x's dtype first, as dequantize-then-matmul would see them.

    triton: as in `nf4_dequantize` (None: `use_triton(x)`). Raises ArgumentError unless
    `nf4_gemv_supported(x.dtype, w.shape, w.blocksize)` (bf16/fp16 x, whole blocks per row).
    """
    if triton is None:
        triton = use_triton(x)
    if not triton:
        return nf4_gemv_reference(x, *nf4_args(w), bias)
    if torch.compiler.is_compiling():
        return nf4_gemv_op(x, *nf4_args(w), bias)
    return nf4_gemv_fwd(x, *nf4_args(w), bias)


def nf4_small_gemm(
    x: torch.Tensor,
    w: NF4Layout,
    bias: torch.Tensor | None = None,
    *,
    triton: bool | None = None,
) -> torch.Tensor:
    """NF4 GEMM for a few dozen rows (batched decode): x [rows <= SMALL_GEMM_MAX_ROWS, in] @
    dequantize(w).T (+ bias) -> [rows, out] in x's dtype, W dequantized tile by tile in registers
    (never written out), rounded to x's dtype as dequantize-then-matmul would see it. triton: as
    in `nf4_dequantize`. Raises ArgumentError unless `nf4_small_gemm_supported(rows, x.dtype,
    w.shape, w.blocksize)`."""
    if triton is None:
        triton = use_triton(x)
    if not triton:
        return nf4_small_gemm_reference(x, *nf4_args(w), bias)
    if torch.compiler.is_compiling():
        return nf4_small_gemm_op(x, *nf4_args(w), bias)
    return nf4_small_gemm_fwd(x, *nf4_args(w), bias)


def nf4_expert_gemv(x: torch.Tensor, owner: torch.Tensor, w, experts: int) -> torch.Tensor:
    """out[i] = x[i] @ W[owner[i]]^T for x [rows, in], owner [rows] expert indices (on x's
    device), w an NF4 stack [E·out, in] (an NF4Weight: its tensors() and meta() are read); out
    [rows, out] in x's dtype. Reads only the chosen experts' bytes; the expert of each row is read
    on the device (CUDA-graph capturable). Not differentiable (a decode kernel). Raises
    ArgumentError unless `nf4_expert_gemv_supported(x, w, experts)` and owner is [rows]."""
    check_expert_gemv(x, owner, w, experts)
    if use_triton(x):
        return expert_gemv_op(x.contiguous(), owner, w.tensors(), w.meta(), experts)
    return expert_gemv_reference(x, owner, w.tensors(), w.meta(), experts)
