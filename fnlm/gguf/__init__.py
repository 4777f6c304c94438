"""GGUF, llama.cpp's file format, both ways: `read` converts a .gguf into a transformers
checkpoint directory that `fnlm.load` reads; `write` writes a model as a .gguf for llama.cpp
(`fnlm.save(..., format="gguf")`), each family as the llama.cpp architecture `archs` names;
`ollama` writes the Modelfile that goes beside it; `pretokenizers` holds what llama.cpp means by
each `tokenizer.ggml.pre` name, which both sides follow."""

from fnlm.gguf.read import (
    ARCHITECTURES,
    CONVERTER_VERSION,
    GLOBAL_TENSORS,
    LAYER_TENSORS,
    ROPE_FREQS,
    cache_root,
    cached_checkpoint,
    convert_gguf,
    hf_config,
)
from fnlm.gguf.tokenizer import PRE_TOKENIZER_SPLITS, hf_tokenizer
from fnlm.gguf.write import (
    GGUF_ARCHITECTURES,
    GGUF_TYPES,
    check_gguf_support,
    gguf_name,
    llama3_rope_factors,
    write_gguf,
)

__all__ = [
    "ARCHITECTURES",
    "CONVERTER_VERSION",
    "GGUF_ARCHITECTURES",
    "GGUF_TYPES",
    "GLOBAL_TENSORS",
    "LAYER_TENSORS",
    "PRE_TOKENIZER_SPLITS",
    "ROPE_FREQS",
    "cache_root",
    "cached_checkpoint",
    "check_gguf_support",
    "convert_gguf",
    "gguf_name",
    "hf_config",
    "hf_tokenizer",
    "llama3_rope_factors",
    "write_gguf",
]
