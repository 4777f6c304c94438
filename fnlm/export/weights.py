"""The weights of params with their LoRA folded in, computed one tensor at a time under the
checkpoint's names (`MergedWeights`): what fnlm.save's merged and GGUF writers stream into
their files. A quantized base's weights come from its 16-bit source checkpoint when there is
one, checked against the quantized ones, else from dequantization.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fnlm import models, quant
from fnlm.config import ModelConfig
from fnlm.errors import ExportError, FnlmError
from fnlm.lora import Lora, LoraEmbedding, LoraExperts, LoraLinear, SavedEmbedding, attach
from fnlm.models import moe
from fnlm.params import Params, get_path, path_name

# A quantized weight and the 16-bit source weight it came from differ by the quantization error:
# about 10% of the weight's norm for NF4 (4 bits), ~1% for int8 / fp8. Weights of another model
# differ by ~140%. Above this, the source is not this model's and merging into it would be wrong.
SOURCE_MATCH_REL_TOL = 0.25


class MergedWeights:
    """The weights of `params` with `lora` folded in, under the checkpoint's tensor names, each
    computed on request in fp32: `weights("model.layers.0.self_attn.q_proj.weight")`.

    `config` is the merged model's (adapting a tied embed / lm_head unties them, as
    fnlm.lora.merge does); `names` maps each tensor name to (param path, shape), in the order
    the family's weight_names gives. Quantized leaves come from the 16-bit source checkpoint
    when there is one (`base`, else `params.source`), else from dequantization.
    """

    def __init__(self, params: Params, lora: Lora | None, base=None):
        self.params = params
        self.attached = attach(params, lora, training=False) if lora is not None else params
        config = params.config
        tied = [p for p in (("embed",), ("lm_head",)) if _is_replaced(self.attached, params, p)]
        if config.tie_word_embeddings and tied:
            config = config.replace(tie_word_embeddings=False)
        self.config: ModelConfig = config
        self.names = models.family(config.model_type).weight_names(config)
        quantized = [p for _, (p, _) in self.names.items() if _quantized(params, p)]
        self.source = _SourceWeights.find(params, base) if quantized else None
        self._stack_cache: tuple = (None,)
        if quantized:
            kind = getattr(_leaf(params, quantized[0]), "kind", "quantized")
            where = (
                f"the 16-bit weights of {self.source.directory}"
                if self.source
                else f"the dequantized {kind} weights (no local 16-bit checkpoint; pass base=...)"
            )
            verb = "merging into" if lora is not None else "writing"
            print(f"fnlm.save: {len(quantized)} quantized weights: {verb} {where}")

    @torch.no_grad()
    def __call__(self, name: str) -> torch.Tensor:
        path = self.names[name][0]
        slot = moe.stack_slot(path)
        if slot is not None:
            return self._expert(name, path, slot)
        leaf = get_path(self.attached, path)
        if isinstance(leaf, SavedEmbedding):
            return leaf.weight.detach().float().cpu()
        adapted = isinstance(leaf, LoraLinear | LoraEmbedding)
        dense = self._dense(name, path, leaf.weight if adapted else leaf)
        if adapted:
            dense = dataclasses.replace(leaf, weight=dense).merged_weight()
        dense = dense.detach().float().cpu()
        if dense.dim() == 2 and len(self.names[name][1]) == 3:  # a quantized stack [E·out, in]
            dense = dense.view(self.config.num_experts, -1, dense.shape[1])
        return models.to_checkpoint(self.config, name, dense).contiguous()

    def _dense(self, name: str, path: tuple, leaf) -> torch.Tensor:
        if not quant.is_quantized(leaf):
            return leaf.float()
        return self._original(name, path, quant.dequantize(leaf).float())

    def _original(self, name: str, path: tuple, dequantized: torch.Tensor) -> torch.Tensor:
        """The source checkpoint's 16-bit tensor for a dequantized weight, after checking that it
        is the weight that was quantized; the dequantized weight when there is no source."""
        if self.source is None:
            return dequantized
        original = self.source.get(path).to(dequantized.device)
        if original.shape != dequantized.shape and original.numel() == dequantized.numel():
            original = original.reshape(dequantized.shape)  # a stack [E, out, in] as [E·out, in]
        if original.shape != dequantized.shape:
            error = float("inf")
        else:
            error = float((original - dequantized).norm() / original.norm().clamp_min(1e-12))
        if error > SOURCE_MATCH_REL_TOL:
            raise ExportError(
                f"the 16-bit checkpoint {self.source.directory} does not hold the weights of this "
                f"model: {name} differs from the quantized {path_name(path)} by {error:.0%} "
                f"(quantization explains at most {SOURCE_MATCH_REL_TOL:.0%}); pass base= the "
                "checkpoint the model was loaded from"
            )
        return original

    def _expert(self, name: str, path: tuple, slot: moe.Slot) -> torch.Tensor:
        """One expert's matrix, cut from its stack (dequantized once for all its experts' names),
        plus that expert's LoRA delta."""
        leaf = get_path(self.attached, slot.stack)
        adapted = isinstance(leaf, LoraExperts)
        weight = leaf.weight if adapted else leaf
        if self._stack_cache[0] != slot.stack:
            self._stack_cache = (slot.stack, moe.dense(weight, self.config.num_experts).detach())
        piece = moe.rows(slot, self._stack_cache[1]).float()
        if quant.is_quantized(weight):
            piece = self._original(name, path, piece)
        if adapted:
            piece = piece + moe.half(slot, leaf.delta(slot.expert).detach())
        return piece.cpu().contiguous()


def _is_replaced(attached: Params, params: Params, path: tuple) -> bool:
    try:
        return _leaf(attached, path) is not _leaf(params, path)
    except (KeyError, IndexError):
        return False


def _quantized(params: Params, path: tuple) -> bool:
    try:
        return quant.is_quantized(_leaf(params, path))
    except (KeyError, IndexError):
        return False


def _leaf(params: Params, path: tuple):
    """The leaf holding a checkpoint tensor's weight (an expert's: its stack)."""
    slot = moe.stack_slot(path)
    return get_path(params, slot.stack if slot else path)


class _SourceWeights:
    """Tensors of a local 16-bit checkpoint, read one at a time by param path."""

    def __init__(self, directory: Path, config: ModelConfig):
        from safetensors import safe_open

        from fnlm.load import weight_files

        self.directory, self.config = directory, config
        self.file_of: dict[str, tuple[Path, str]] = {}  # weight_names' name -> (file, its key)
        for file in weight_files(directory):
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    self.file_of[models.checkpoint_name(config, key) or key] = (file, key)
        names = models.family(config.model_type).weight_names(config)
        self.name_of = {path: name for name, (path, _) in names.items()}

    @classmethod
    def find(cls, params: Params, base) -> _SourceWeights | None:
        """The checkpoint named by `base`, else params.source when it is a local directory."""
        if base is not None:
            from fnlm.hub import resolve

            return cls(resolve(base), params.config)
        source = getattr(params, "source", None)
        if source is None or not Path(source, "config.json").is_file():
            return None
        try:
            return cls(Path(source), params.config)
        except FnlmError:
            return None

    def get(self, path: tuple) -> torch.Tensor:
        name = self.name_of.get(path)
        if name is not None and f"{name}_blocks" in self.file_of:  # gpt-oss's MXFP4 experts
            parts = [
                (f"{name}_{kind}", *self.file_of[f"{name}_{kind}"]) for kind in ("blocks", "scales")
            ]
            tensors = ((key, _read(file, inner), file) for key, file, inner in parts)
            _, tensor, _ = next(models.checkpoint_stream(self.config, tensors))
            return models.to_params(self.config, name, tensor.float())
        if name is None or name not in self.file_of:
            raise ExportError(
                f"the 16-bit checkpoint {self.directory} has no tensor for {path_name(path)} "
                f"({name or 'no name'}); pass base= the checkpoint the model was loaded from"
            )
        file, key = self.file_of[name]
        return models.to_params(self.config, name, _read(file, key).float())


def _read(file: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        return handle.get_tensor(key)
