"""fnlm: load, fine-tune and run open LLMs on one GPU, as pure functions over pytrees of weights.

params, tok = fnlm.load()                      # embedded SmolLM2-135M-Instruct, offline
logits = fnlm.forward(params, tokens)          # [batch, seq, vocab]
loss = fnlm.loss(params, {"tokens": tokens})   # fused linear + cross-entropy
"""

import torch

from fnlm import data, lora, train  # noqa: F401  (fnlm.data, fnlm.train: submodules)
from fnlm.config import ModelConfig
from fnlm.errors import FnlmError
from fnlm.export import save
from fnlm.generate import generate
from fnlm.load import load
from fnlm.lora import with_adapters as _with_adapters
from fnlm.loss import loss
from fnlm.models import decoder
from fnlm.params import Params

__all__ = [
    "FnlmError",
    "ModelConfig",
    "Params",
    "forward",
    "generate",
    "load",
    "lora",
    "loss",
    "save",
]
__version__ = "0.1.0"


def forward(
    params: Params, tokens: torch.Tensor, *, lora: lora.Lora | None = None, **inputs
) -> torch.Tensor:
    """Logits [batch, seq, vocab] for `tokens` [batch, seq]. Pure: no state is read or written.

    lora: adapters from `fnlm.lora.init` / `fnlm.lora.load`, applied unmerged.
    inputs: positions, attention_mask, segments, as `fnlm.models.decoder.forward` takes them.
    Raises ArgumentError for bad tokens, LoraError for adapters that do not fit `params`.
    """
    return decoder.forward(_with_adapters(params, lora), tokens, **inputs)
