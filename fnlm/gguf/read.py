"""GGUF files, converted once into an ordinary transformers checkpoint directory.

A .gguf file (llama.cpp's format) holds the weights, often quantized, and in its metadata the
model config, the tokenizer and the chat template. `convert_gguf` writes those out as config.json,
model.safetensors (dequantized), generation_config.json, tokenizer.json and tokenizer_config.json,
so `fnlm.load` reads a GGUF through the same code path as any local checkpoint.
`cached_checkpoint` does that once per file, into a cache directory.

transformers is the reference: the config, the tensors (Q/K rows un-permuted as its GGUF loader
does) and the tokenizer are those `from_pretrained(..., gguf_file=...)` builds from the same file;
the few places where we deliberately differ say so where they happen. The largest: a byte-level
vocabulary is cut into words as llama.cpp reads its `tokenizer.ggml.pre` (fnlm.gguf.pretokenizers),
so fnlm runs the file as llama.cpp does, where transformers reads most names as GPT-2's split.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fnlm import files
from fnlm.errors import (
    CheckpointError,
    ConfigError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from fnlm.gguf.tokenizer import hf_tokenizer

# Part of the cache key: bump it whenever the converted files change, so old caches are rebuilt.
CONVERTER_VERSION = 2  # 2: tokenizer.ggml.pre read with llama.cpp's meaning

# GGUF `general.architecture` -> HF model_type. llama.cpp writes Mistral and SmolLM2 as "llama".
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# `<arch>.<key>` metadata -> HF config key (the keys transformers' GGUF loader maps for these archs).
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

# `tokenizer.ggml.<key>` -> HF config/special-token id key.
TOKEN_ID_KEYS = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id",
}

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# `blk.<i>.<part>.<weight|bias>` -> `model.layers.<i>.<part>.<weight|bias>`
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# llama.cpp's llama-3 rope factors, folded back into an HF `rope_scaling` (see `_llama3_rope`).
ROPE_FREQS = "rope_freqs.weight"

# How far the factors rebuilt from the recovered llama3 parameters may sit from the file's: they
# were computed in fp32 by llama.cpp's converter, so a few ulps near 1..32 is all a true fit leaves.
ROPE_FACTOR_RTOL = 1e-4

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


# ---------------------------------------------------------------------------------------------
# public API


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a .gguf file into a transformers checkpoint directory and return its path.

    Writes config.json, model.safetensors (every tensor dequantized to fp32 with the gguf
    package, or kept in the file's own F32/F16/BF16), generation_config.json, tokenizer.json and
    tokenizer_config.json (with the chat template). The files are written into a temporary
    directory next to `out_dir` and moved into place at the end, so `out_dir` is never left
    half-written; an existing `out_dir` is replaced.

    Raises ModelNotFoundError (no such file), CheckpointError (not a GGUF file, truncated or
    corrupt), ConfigError (metadata lacks a size), UnsupportedModelError (architecture, tensor,
    quantization or tokenizer type not supported), TokenizerError (malformed vocabulary).

    >>> convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")  # doctest: +SKIP
    PosixPath('smollm2')
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open(gguf_path)
    try:
        metadata = _metadata(reader)
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{gguf_path} is corrupt: a metadata string is not UTF-8 ({e})"
        ) from None
    tensor_names = [tensor.name for tensor in reader.tensors]
    config = hf_config(metadata, tensor_names, gguf_path)
    _check_tensor_names(tensor_names, gguf_path, metadata["general.architecture"])
    config.update(_config_from_tensors(reader, config, gguf_path))
    tokenizer, tokenizer_config = hf_tokenizer(metadata, gguf_path)

    with files.atomic_directory(out_dir) as work:
        files.write_json(work / "config.json", config, fsync=False)
        files.write_json(work / "generation_config.json", _generation_config(config), fsync=False)
        tokenizer.save(str(work / "tokenizer.json"))
        files.write_json(work / "tokenizer_config.json", tokenizer_config, fsync=False)
        _write_weights(reader, config, gguf_path, work / "model.safetensors")
    return out_dir


def cached_checkpoint(gguf_path: str | os.PathLike) -> Path:
    """The converted checkpoint directory for `gguf_path`, converting it on first use.

    The cache lives under $FNLM_CACHE (default ~/.cache/fnlm) in `gguf/<stem>-<key>`, keyed by
    the file's resolved path, size and modification time plus the converter version, so an
    edited or replaced file is converted again. Raises what `convert_gguf` raises.
    """
    path = Path(gguf_path).expanduser()
    try:
        stat = path.resolve(strict=True).stat()
    except FileNotFoundError:
        raise ModelNotFoundError(f"GGUF file not found: {path}") from None
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    out_dir = cache_root() / "gguf" / f"{path.stem}-{digest}"
    # config.json and model.safetensors are moved into place together, so both or neither exist.
    if not (out_dir / "model.safetensors").is_file():
        convert_gguf(path, out_dir)
    return out_dir


def cache_root() -> Path:
    """$FNLM_CACHE, or ~/.cache/fnlm."""
    return Path(os.environ.get("FNLM_CACHE") or Path.home() / ".cache" / "fnlm").expanduser()


# ---------------------------------------------------------------------------------------------
# reading the file


def _open(gguf_path: Path):
    import gguf

    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path}")
    with open(gguf_path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(
            f"{gguf_path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'"
        )
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error) as e:
        # The reader memory-maps the file and slices every tensor out of it: a file cut short
        # ends up here (a reshape of a short slice), as does a damaged header.
        raise CheckpointError(
            f"{gguf_path} is truncated or corrupt ({type(e).__name__}: {e}); download it again"
        ) from None
    size = gguf_path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise CheckpointError(
                f"{gguf_path} is truncated: tensor {tensor.name!r} ends at byte "
                f"{tensor.data_offset + tensor.n_bytes}, the file has {size}; download it again"
            )
    return reader


def _metadata(reader) -> dict:
    """Every metadata key -> its Python value (str, int, float, bool or a list of them)."""
    from gguf import GGUFValueType

    def scalar(part, value_type):
        if value_type == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part[0].item()

    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # version and counts, not metadata
        types = field.types
        if types[0] == GGUFValueType.ARRAY:
            metadata[key] = [scalar(field.parts[i], types[-1]) for i in field.data]
        else:
            metadata[key] = scalar(field.parts[field.data[0]], types[0])
    return metadata


def _check_tensor_names(names: list[str], gguf_path: Path, arch: str) -> None:
    for name in names:
        if name != ROPE_FREQS and _hf_name(name) is None:
            raise UnsupportedModelError(
                f"{gguf_path}: tensor {name!r} of architecture {arch!r} has no transformers "
                "equivalent that fnlm knows; this GGUF variant is not supported"
            )


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if (
        len(parts) == 4
        and parts[0] == "blk"
        and parts[1].isdigit()
        and parts[3] in ("weight", "bias")
    ):
        part = LAYER_TENSORS.get(parts[2])
        if part is not None:
            return f"model.layers.{parts[1]}.{part}.{parts[3]}"
    return None


# ---------------------------------------------------------------------------------------------
# config


def hf_config(metadata: dict, tensor_names: list[str], gguf_path: Path | str = "<gguf>") -> dict:
    """The transformers config.json dict that the GGUF metadata describes.

    Raises UnsupportedModelError for an architecture outside ARCHITECTURES (or an unknown rope
    scaling), ConfigError when a size the model needs is missing.
    """
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    model_type = ARCHITECTURES[arch]
    # transformers' rule, reproduced: a llama-architecture file is Mistral only when its
    # general.name is exactly "mistral" (the two share llama.cpp's architecture).
    if arch == "llama" and metadata.get("general.name") == "mistral":
        model_type = "mistral"

    config: dict = {"architectures": [HF_CLASSES[model_type]], "model_type": model_type}
    for gguf_key, hf_key in CONFIG_KEYS.items():
        if f"{arch}.{gguf_key}" in metadata:
            config[hf_key] = metadata[f"{arch}.{gguf_key}"]
    missing = [
        f"{arch}.{k}"
        for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
        if f"{arch}.{k}" not in metadata
    ]
    if missing:
        raise ConfigError(f"{gguf_path}: GGUF metadata lacks {', '.join(missing)}")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])

    # head_dim: the attention key length where the file states it; llama.cpp's llama files state
    # the rotary width instead, which transformers reads as head_dim for llama/mistral.
    if f"{arch}.attention.key_length" in metadata:
        config["head_dim"] = metadata[f"{arch}.attention.key_length"]
    elif arch == "llama" and f"{arch}.rope.dimension_count" in metadata:
        config["head_dim"] = metadata[f"{arch}.rope.dimension_count"]
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])

    config["hidden_act"] = "silu"
    # llama.cpp writes output.weight only when it is not the embedding matrix.
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    if model_type in ("llama", "mistral"):
        # transformers' GGUF loader leaves this False and so drops q/k/v biases; we keep them.
        config["attention_bias"] = any(n.endswith(".attn_q.bias") for n in tensor_names)
    if model_type == "mistral":
        # GGUF states no window for Mistral (transformers then uses MistralConfig's 4096).
        config["sliding_window"] = metadata.get(f"{arch}.attention.sliding_window")
    rope_scaling = _rope_scaling(metadata, arch)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling

    for gguf_key, hf_key in TOKEN_ID_KEYS.items():
        if f"tokenizer.ggml.{gguf_key}" in metadata:
            config[hf_key] = metadata[f"tokenizer.ggml.{gguf_key}"]
    config["torch_dtype"] = config["dtype"] = (
        "float32"  # a half file says so in _config_from_tensors
    )
    return config


def _rope_scaling(metadata: dict, arch: str) -> dict | None:
    """linear / yarn scaling stated in the metadata (transformers' GGUF loader ignores these)."""
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise UnsupportedModelError(f"GGUF rope scaling type {kind!r} is not supported")
    scaling = {"rope_type": kind, "factor": float(metadata[f"{arch}.rope.scaling.factor"])}
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _llama3_rope(factors: np.ndarray, config: dict, gguf_path: Path) -> dict:
    """The HF `rope_scaling` of type llama3 that llama.cpp's `rope_freqs` factors encode.

    llama.cpp stores, per rotary frequency f, the divisor r(f): 1 for short wavelengths, `factor`
    for long ones and 1 / ((1 - s) / factor + s) between, with s = (L / wavelen - lo) / (hi - lo)
    linear in 1 / wavelen (L the original context, lo/hi the low/high frequency factors). Only
    `factor`, L / (hi - lo) and lo / (hi - lo) change the frequencies, so lo = 1 is chosen (Meta's
    value for every Llama 3.x) and the other two are solved from the factors between the plateaus;
    the factors rebuilt from the result must match the file's.
    """
    theta = float(config.get("rope_theta", 10000.0))
    dim = 2 * len(factors)
    inv_freq = theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / inv_freq
    factors = factors.astype(np.float64)
    factor = float(factors.max())
    between = (factors > 1 + ROPE_FACTOR_RTOL) & (factors < factor * (1 - ROPE_FACTOR_RTOL))
    if factor <= 1 + ROPE_FACTOR_RTOL:
        return {}
    if between.sum() < 2:
        raise UnsupportedModelError(
            f"{gguf_path}: rope_freqs has too few interpolated frequencies to recover llama3 "
            "rope scaling"
        )
    smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[between], smooth, 1)  # s = slope/wavelen + intercept
    low = 1.0
    high = low - 1 / intercept
    original = slope * (high - low)
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": float(high),
        "original_max_position_embeddings": int(round(original)),
    }
    rebuilt = llama3_factors(wavelen, factor, low, high, round(original))
    if not np.allclose(rebuilt, factors, rtol=ROPE_FACTOR_RTOL, atol=0):
        raise UnsupportedModelError(
            f"{gguf_path}: rope_freqs does not follow llama3 rope scaling; not supported"
        )
    return scaling


def llama3_factors(wavelen, factor, low, high, original) -> np.ndarray:
    """llama.cpp's rope factors for Llama 3 scaling (convert_hf_to_gguf.py, LlamaModel)."""
    low_wavelen, high_wavelen = original / low, original / high
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    interpolated = 1 / ((1 - smooth) / factor + smooth)
    return np.where(
        wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, interpolated)
    )


def _generation_config(config: dict) -> dict:
    """What transformers derives from the config: the special token ids it has."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config.get(k) is not None}


# ---------------------------------------------------------------------------------------------
# weights


def _config_from_tensors(reader, config: dict, gguf_path: Path) -> dict:
    """Config entries the tensors decide: llama3 rope scaling and the dtype of a half file."""
    from gguf import GGMLQuantizationType as Q

    update = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            scaling = _llama3_rope(_tensor(tensor, gguf_path).numpy(), config, gguf_path)
            if scaling:
                update["rope_scaling"] = scaling
    types = {tensor.tensor_type for tensor in reader.tensors}
    # an unquantized half file: its model dtype is the half one (its norms stay F32)
    if types <= {Q.F32, Q.F16, Q.BF16} and types != {Q.F32}:
        update["torch_dtype"] = update["dtype"] = "bfloat16" if Q.BF16 in types else "float16"
    return update


def _write_weights(reader, config: dict, gguf_path: Path, out: Path) -> None:
    """Dequantize tensor by tensor into one safetensors file; peak memory near one tensor."""
    from gguf import GGMLQuantizationType as Q

    kept = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    tensors = [t for t in reader.tensors if t.name != ROPE_FREQS]
    layout = [
        (
            _hf_name(t.name),
            kept.get(t.tensor_type, torch.float32),
            tuple(int(d) for d in reversed(t.shape)),
        )
        for t in tensors
    ]
    producers = [lambda t=t: _hf_tensor(t, config, gguf_path) for t in tensors]
    save_streaming(out, layout, producers)


def _tensor(tensor, gguf_path: Path) -> torch.Tensor:
    """One GGUF tensor as torch, in torch's dimension order: dequantized to fp32 unless stored
    F32/F16/BF16, which stay as they are."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    shape = tuple(int(d) for d in reversed(tensor.shape))
    if tensor.tensor_type in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(tensor.data)).reshape(shape)
    if tensor.tensor_type == Q.BF16:
        raw = np.array(tensor.data).view(np.int16)  # numpy has no bfloat16: move the bits
        return torch.from_numpy(raw).view(torch.bfloat16).reshape(shape)
    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UnsupportedModelError(
            f"{gguf_path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which "
            "the gguf package cannot dequantize; use a file with another quantization"
        ) from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _hf_tensor(tensor, config: dict, gguf_path: Path) -> torch.Tensor:
    values = _tensor(tensor, gguf_path)
    if config["model_type"] in ("llama", "mistral"):
        # llama.cpp permutes Q/K rows (weights and biases) of llama-family models for its rotary
        # layout; transformers' GGUF loader undoes it this way.
        if ".attn_q." in tensor.name:
            values = _unpermute(values, config["num_attention_heads"])
        elif ".attn_k." in tensor.name:
            values = _unpermute(values, config["num_key_value_heads"])
    return values


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute`: per head, rows [pairs, 2] -> [2, pairs]."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def save_streaming(
    out: Path,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    producers: list[Callable[[], torch.Tensor]],
) -> None:
    """Write a safetensors file one tensor at a time.

    safetensors' own writers take every tensor at once; the format is an 8-byte header length, a
    JSON header of names, dtypes, shapes and byte ranges, then the tensors' bytes in that order —
    so knowing the shapes up front, we write the header first and stream the data after it.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in layout:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data must start 8-byte aligned
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, dtype, shape), produce in zip(layout, producers, strict=True):
            tensor = produce()
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"tensor {name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                    f"expected {dtype} {shape}"
                )
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
