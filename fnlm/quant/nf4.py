"""NF4 weights: bitsandbytes 4-bit NormalFloat, blocksize 64, double-quantized absmax.

`quantize_nf4` calls bitsandbytes itself, so the bytes are exactly those of `bnb.nn.Linear4bit` /
transformers `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)`. Dequantizing never calls bitsandbytes: on CUDA the Triton kernel
(`fnlm.kernels.nf4_dequantize`), elsewhere its plain-torch reference, both bit-exact with bitsandbytes.
"""

from __future__ import annotations

import torch

from fnlm import kernels
from fnlm.errors import ArgumentError, CheckpointError
from fnlm.params import register_pytree

BLOCKSIZE = 64  # values per absmax, as bitsandbytes' and transformers' 4-bit default
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class NF4Weight:
    """A frozen linear weight [out, in] in bitsandbytes' NF4 layout (see `fnlm.kernels.nf4`).

    A pytree node: its children are its tensors (`packed` uint8 [(n + 1) // 2, 1], `absmax`,
    `code` fp32 [16], and with double quantization `nested_absmax`, `nested_code`, `offset`), its
    context the static metadata (shape, compute dtype, block sizes). `dtype` is the compute dtype:
    what `dequantize()` returns and what the linear layers compute in.
    """

    kind = "nf4"

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        code: torch.Tensor,
        nested_absmax: torch.Tensor | None,
        nested_code: torch.Tensor | None,
        offset: torch.Tensor | None,
        *,
        shape: tuple[int, int],
        dtype: torch.dtype,
        blocksize: int = BLOCKSIZE,
        nested_blocksize: int = 256,
    ):
        self.packed = packed
        self.absmax = absmax
        self.code = code
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.offset = offset
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.nested_blocksize = nested_blocksize

    @property
    def nested(self) -> bool:
        """Whether absmax is double-quantized."""
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the weight (the pytree children)."""
        if self.nested:
            return [
                self.packed,
                self.absmax,
                self.code,
                self.nested_absmax,
                self.nested_code,
                self.offset,
            ]
        return [self.packed, self.absmax, self.code]

    def meta(self) -> list[int]:
        """Static metadata as ints, for custom-op schemas (inverse: `from_parts`)."""
        return [*self.shape, self.blocksize, self.nested_blocksize, int(self.nested)]

    @classmethod
    def from_parts(
        cls, tensors: list[torch.Tensor], meta: list[int], dtype: torch.dtype
    ) -> NF4Weight:
        """Rebuild from `tensors()` and `meta()`."""
        out_features, in_features, blocksize, nested_blocksize, nested = meta
        if not nested:
            tensors = [*tensors, None, None, None]
        return cls(
            *tensors,
            shape=(out_features, in_features),
            dtype=dtype,
            blocksize=blocksize,
            nested_blocksize=nested_blocksize,
        )

    @property
    def nbytes(self) -> int:
        """Bytes the weight occupies on its device."""
        return sum(t.nbytes for t in self.tensors())

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy with every tensor on `device`."""
        return NF4Weight.from_parts([t.to(device) for t in self.tensors()], self.meta(), self.dtype)

    def dequantize(self, triton: bool | None = None) -> torch.Tensor:
        """The weight in its compute dtype, [out, in], bit-exact with bitsandbytes' dequantize_4bit.

        `triton` forces the kernel (True) or the plain-torch reference (False); None lets
        `fnlm.kernels.use_triton` decide (Triton on CUDA).
        """
        return kernels.nf4_dequantize(self, triton=triton)

    # -- bitsandbytes interchange ---------------------------------------------------------------

    def to_bnb(self):
        """(packed uint8, `bitsandbytes.functional.QuantState`) as bnb's quantize_4bit returns them."""
        # bitsandbytes here only: it takes seconds to import (it probes its backends), and
        # loading or running quantized weights never needs it
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(
                absmax=self.nested_absmax,
                code=self.nested_code,
                blocksize=self.nested_blocksize,
                dtype=torch.float32,
            )
        state = QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=self.code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )
        return self.packed, state

    @classmethod
    def from_bnb(
        cls, packed: torch.Tensor, quant_state, compute_dtype: torch.dtype | None = None
    ) -> NF4Weight:
        """Wrap bitsandbytes' (packed, QuantState) without copying; compute dtype defaults to the
        state's dtype. Raises CheckpointError for anything but a 2-D NF4 state."""
        if quant_state.quant_type != "nf4":
            raise CheckpointError(
                f"NF4Weight.from_bnb: quant_type is {quant_state.quant_type!r}, expected 'nf4'"
            )
        if quant_state.shape is None or len(quant_state.shape) != 2:
            raise CheckpointError(
                f"NF4Weight.from_bnb: expected a 2-D weight, got shape {quant_state.shape}"
            )
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)  # bnb's quant_storage may be another dtype
        # the Triton kernels hold the NF4 table as constants (one host sync per weight, at load)
        if not torch.equal(quant_state.code.float().cpu(), torch.tensor(kernels.NF4_CODE)):
            raise CheckpointError(
                f"NF4Weight.from_bnb: the quant_map is not bitsandbytes' NF4 table: {quant_state.code.tolist()}"
            )
        dtype = compute_dtype or quant_state.dtype
        if quant_state.nested:
            state2 = quant_state.state2
            offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device)
            nested = (state2.absmax.float(), state2.code.float(), offset)
            nested_blocksize = state2.blocksize
        else:
            nested, nested_blocksize = (None, None, None), 256
        absmax = quant_state.absmax if quant_state.nested else quant_state.absmax.float()
        return cls(
            packed,
            absmax,
            quant_state.code.float(),
            *nested,
            shape=tuple(quant_state.shape),
            dtype=dtype,
            blocksize=quant_state.blocksize,
            nested_blocksize=nested_blocksize,
        )

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, torch.Tensor],
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> NF4Weight:
        """Load one weight of a pre-quantized ("-bnb-4bit") checkpoint.

        `state_dict` holds the tensors of one module, keys ending in "weight", "weight.absmax",
        "weight.quant_map", "weight.quant_state.bitsandbytes__nf4" (and "weight.nested_absmax",
        "weight.nested_quant_map" with double quantization), with any common prefix.
        """
        # bitsandbytes here only: it takes seconds to import (it probes its backends), and
        # loading or running quantized weights never needs it
        from bitsandbytes.functional import QuantState

        marker = "weight.quant_state.bitsandbytes__nf4"
        keys = [k for k in state_dict if k.endswith(marker)]
        if len(keys) != 1:
            raise CheckpointError(
                f"NF4Weight.from_state_dict: expected exactly one key ending in {marker!r}, found {keys or 'none'} "
                f"among {sorted(state_dict)[:8]}"
            )
        prefix = keys[0][: -len(marker)]
        if prefix + "weight" not in state_dict:
            raise CheckpointError(
                f"NF4Weight.from_state_dict: {prefix}weight is missing next to {keys[0]}"
            )
        device = device or state_dict[prefix + "weight"].device
        parts = {
            k[len(prefix) + len("weight.") :]: v
            for k, v in state_dict.items()
            if k.startswith(prefix + "weight.")
        }
        try:
            state = QuantState.from_dict(parts, device=torch.device(device))
        except (ValueError, KeyError, AssertionError) as error:
            raise CheckpointError(
                f"NF4Weight.from_state_dict: bad quant state under {prefix!r}weight: {error}"
            ) from error
        return cls.from_bnb(state_dict[prefix + "weight"].to(device), state, compute_dtype)

    def __repr__(self) -> str:
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"blocksize={self.blocksize}, nested={self.nested})"
        )


def quantize_nf4(w: torch.Tensor, compute_dtype: torch.dtype) -> NF4Weight:
    """Quantize a 16/32-bit weight [out, in] with bitsandbytes (NF4, blocksize 64, double quant)
    on w's device."""
    # bitsandbytes here only: it takes seconds to import, and dequantizing never needs it
    import bitsandbytes.functional as bnb

    if compute_dtype not in COMPUTE_DTYPES:
        raise ArgumentError(
            f"quantize_nf4: compute_dtype {compute_dtype} is not one of {COMPUTE_DTYPES}"
        )
    packed, state = bnb.quantize_4bit(
        w.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
    )
    return NF4Weight.from_bnb(packed, state, compute_dtype)


register_pytree(
    NF4Weight,
    children=("packed", "absmax", "code", "nested_absmax", "nested_code", "offset"),
    static=("shape", "dtype", "blocksize", "nested_blocksize"),
)
