"""fnlm: load, fine-tune and run open LLMs on one GPU, as pure functions over pytrees of weights.

params, tok = fnlm.load()                      # embedded SmolLM2-135M-Instruct, offline
logits = fnlm.forward(params, tokens)          # [batch, seq, vocab]
loss = fnlm.loss(params, {"tokens": tokens})   # fused linear + cross-entropy
"""

from fnlm import data, lora, train  # noqa: F401  (fnlm.data, fnlm.train: submodules)
from fnlm.config import ModelConfig
from fnlm.errors import FnlmError
from fnlm.export import save
from fnlm.generate import generate
from fnlm.load import load
from fnlm.loss import loss
from fnlm.models.decoder import forward
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
