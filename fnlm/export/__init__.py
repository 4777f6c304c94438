"""`fnlm.save`: a model (and its LoRA) written back in the formats the ecosystem reads.

    fnlm.save("out/adapter", params, tok, lora=lora, format="adapter")   # PEFT adapter + tokenizer
    fnlm.save("out/merged", params, tok, lora=lora, format="merged")     # transformers checkpoint
    fnlm.save("out/gguf", params, tok, lora=lora, format="gguf", gguf_type="q8_0")  # llama.cpp

"merged" and "gguf" fold the adapters into the weights (W + scale·B·A in fp32). An NF4 / int8 /
fp8 base is dequantized for that, unless the 16-bit checkpoint it was loaded from is still on disk
(`fnlm.load` records it as `params.source`; `base=` names one): then its weights are used, which
is more exact. Tensors are produced one at a time and streamed into the files, so host memory
stays near one tensor. Every file is written under a temporary name in its directory and renamed
into place; a failed write (disk full, no permission) raises ExportError naming the file and
leaves nothing under the final name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fnlm import files, quant
from fnlm.config import ModelConfig
from fnlm.errors import ArgumentError, ExportError
from fnlm.export.weights import MergedWeights  # re-exported: fnlm.gguf.write, tests
from fnlm.gguf.kquant import K_QUANTS, llama_quantize, requantize
from fnlm.gguf.ollama import modelfile
from fnlm.gguf.read import save_streaming
from fnlm.gguf.write import GGUF_TYPES as WRITTEN_GGUF_TYPES
from fnlm.gguf.write import check_gguf_support, write_gguf
from fnlm.lora import Lora
from fnlm.models import moe
from fnlm.params import Params

FORMATS = ("adapter", "merged", "gguf")
# written by fnlm, or (K-quants) by llama.cpp's llama-quantize from fnlm's f16 file
GGUF_TYPES = WRITTEN_GGUF_TYPES + tuple(K_QUANTS)
DEFAULT_SHARD_SIZE = "5GB"

SAFETENSORS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip
_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def save(
    directory: str | os.PathLike,
    params: Params,
    tok=None,
    lora: Lora | None = None,
    *,
    format: str = "merged",
    dtype: torch.dtype | str | None = None,
    gguf_type: str = "f16",
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
    ollama: bool = True,
) -> Path:
    """Write `params` (+ `lora`) and the tokenizer `tok` as `format`; returns what was written.

    format="adapter": the PEFT adapter (adapter_config.json + adapter_model.safetensors) and the
        tokenizer files, into `directory`. Needs `lora`.
    format="merged": a transformers checkpoint in `directory`: config.json (the original, dtype
        updated), model.safetensors or shards of at most `shard_size` ("5GB", "200MB", bytes)
        with model.safetensors.index.json, generation_config.json, tokenizer files and chat
        template. `dtype`: of the weights (default: the params' compute dtype).
    format="gguf": one llama.cpp file, `directory` itself when it ends in .gguf, else
        `directory/model-<gguf_type>.gguf`; gguf_type "f16" | "bf16" | "q8_0" | "q5_1" | "q5_0" |
        "q4_1" | "q4_0" (norms stay
        F32; rows whose length is not a multiple of 32 stay F16), or the K-quants "q4_k_m" |
        "q5_k_m" | "q6_k", made by llama.cpp's llama-quantize from fnlm's f16 file (see
        fnlm.gguf.kquant; ExportError when the tool is not found). Llama / Mistral (as llama),
        Qwen2, Qwen3 and every family fnlm.gguf.archs lists, with their tokenizer and chat
        template. Needs `tok`. With `ollama` (default), an Ollama Modelfile beside it
        (`Modelfile` in `directory`, `<name>.Modelfile` beside a .gguf path; fnlm.gguf.ollama):
        FROM the file, the chat template as a TEMPLATE, SYSTEM, and the stop tokens.
    base: the 16-bit checkpoint (directory or hub id) to merge into instead of dequantizing a
        quantized base; default `params.source` (recorded by fnlm.load) when it is a directory.
    overwrite: allow a target directory that is not empty (or an existing .gguf file).

    Raises ArgumentError (bad format / gguf_type / dtype / shard_size, missing lora or tok),
    ExportError (target not writable, disk full, an architecture or feature the format cannot
    hold), LoraError (adapter does not fit params).

    >>> fnlm.save("out", params, tok, lora=lora, format="merged", shard_size="2GB")  # doctest: +SKIP
    """
    if format not in FORMATS:
        raise ArgumentError(f"save: format must be one of {FORMATS}, got {format!r}")
    if not isinstance(params, Params):
        raise ArgumentError(
            f"save: params must be the Params that fnlm.load returns, got {type(params).__name__}"
        )
    if format == "adapter":
        if lora is None:
            raise ArgumentError("save: format='adapter' needs lora=... (the adapters to write)")
        target = _prepare_dir(Path(directory), overwrite)
        return _save_adapter(target, params, tok, lora)
    if format == "merged":
        out_dtype = _export_dtype(dtype, params)
        limit = parse_size(shard_size)
        weights = MergedWeights(params, lora, base)  # a lora that does not fit fails here
        return _save_merged(
            _prepare_dir(Path(directory), overwrite), weights, tok, out_dtype, limit
        )
    if gguf_type not in GGUF_TYPES:
        raise ArgumentError(f"save: gguf_type must be one of {GGUF_TYPES}, got {gguf_type!r}")
    if tok is None:
        raise ArgumentError("save: format='gguf' needs tok=... (a GGUF carries its tokenizer)")
    check_gguf_support(params.config)
    binary = llama_quantize() if gguf_type in K_QUANTS else None  # missing: fail before writing
    weights = MergedWeights(params, lora, base)
    target = _prepare_gguf_path(Path(directory), gguf_type, overwrite)
    modelfile_at = _modelfile_path(Path(directory), target, overwrite) if ollama else None
    if binary is None:
        _write_file(target, lambda tmp: write_gguf(Path(tmp), weights, tok, gguf_type))
        _write_modelfile(modelfile_at, target, tok)
        return target

    def write_k_quant(tmp: Path) -> None:
        f16 = Path(tmp).with_name(Path(tmp).name + ".f16.gguf")
        try:
            write_gguf(f16, weights, tok, "f16")
            requantize(f16, Path(tmp), gguf_type, binary)
        finally:
            f16.unlink(missing_ok=True)

    _write_file(target, write_k_quant)
    _write_modelfile(modelfile_at, target, tok)
    return target


def _modelfile_path(directory: Path, target: Path, overwrite: bool) -> Path:
    """`Modelfile` in the export directory, `<name>.Modelfile` beside a .gguf path."""
    gguf_path = directory.suffix == ".gguf"
    path = target.with_suffix(".Modelfile") if gguf_path else target.parent / "Modelfile"
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    return path


def _write_modelfile(path: Path | None, target: Path, tok) -> None:
    if path is not None:
        _write_text(path, modelfile(tok, target.name, add_bos=bool(tok.add_bos_token)))


# ---------------------------------------------------------------------------------------------
# targets and errors


def _prepare_dir(target: Path, overwrite: bool) -> Path:
    """Create `target` (parents too); refuse a file, or a non-empty directory without overwrite."""
    if target.exists() and not target.is_dir():
        raise ExportError(f"cannot export into {target}: it is a file, expected a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ExportError(
            f"{target} exists and is not empty; pass overwrite=True (--overwrite) to write into "
            "it, or choose a new directory"
        )
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _export_error(target, e) from e
    if not os.access(target, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write into {target}: permission denied")
    return target


def _prepare_gguf_path(path: Path, gguf_type: str, overwrite: bool) -> Path:
    if path.suffix != ".gguf":
        path = _prepare_dir(path, overwrite) / f"model-{gguf_type}.gguf"
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if path.is_dir():
        raise ExportError(f"cannot write the GGUF file {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _export_error(path.parent, e) from e
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write into {path.parent}: permission denied")
    return path


def _export_error(path: Path, error: OSError) -> ExportError:
    if error.errno == errno.ENOSPC:
        why = "the disk is full (no space left on device); free some space or choose another target"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied (or a read-only file system); choose a writable directory"
    else:
        why = f"{error.strerror or error}"
    return ExportError(f"cannot write {path}: {why}. Nothing was left under that name.")


def _write_file(target: Path, write: Callable[[Path], None]) -> None:
    """`write(temp_path)`, then rename into `target`; an OSError becomes an ExportError naming it."""
    try:
        files.write_atomic(target, write)
    except OSError as e:
        raise _export_error(target, e) from e


def _write_text(target: Path, text: str) -> None:
    _write_file(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _save_tokenizer(tok, target: Path) -> None:
    try:
        tok.save(target)
    except OSError as e:
        raise _export_error(Path(e.filename or target), e) from e


# ---------------------------------------------------------------------------------------------
# adapter


def _save_adapter(target: Path, params: Params, tok, lora: Lora) -> Path:
    from fnlm import lora as lora_lib

    source = getattr(params, "source", None)
    name = lora.config.base_model_name_or_path or (str(source) if source else None)
    try:
        lora_lib.save(target, lora, params=params, base_model_name_or_path=name)
    except OSError as e:
        raise _export_error(target / lora_lib.WEIGHTS_FILE, e) from e
    if tok is not None:
        _save_tokenizer(tok, target)
    return target


# ---------------------------------------------------------------------------------------------
# merged: a transformers checkpoint


def _export_dtype(dtype, params: Params) -> torch.dtype:
    """The weights' dtype: as asked, else that of the (never quantized) embedding."""
    if dtype is None:
        return quant.dequantize(params["embed"]).dtype
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ArgumentError(f"save: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")


def parse_size(size: int | str) -> int:
    """ "5GB" -> 5_000_000_000, "200MiB" -> 209_715_200, 1000 -> 1000 (transformers' units)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not match or float(match.group(1)) <= 0:
        raise ArgumentError(
            f"save: shard_size must be a positive byte count or a size like '5GB' / '500MB', got {size!r}"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def plan_shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Tensor names in order, cut into shards of at most `limit` bytes (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _save_merged(
    target: Path, weights: MergedWeights, tok, dtype: torch.dtype, shard_size: int
) -> Path:
    """Write the merged checkpoint into a directory beside `target` and swap it in at the end
    (`files.atomic_directory`): a failure partway (disk full) leaves `target` as it was, never
    new shards beside old ones. With overwrite, what an existing target holds besides an earlier
    export's weights (a README, ...) is carried into the new directory."""
    names = weights.names
    # the routers of sigmoid-scored MoE (and their correction biases) stay fp32 (moe.param_dtype)
    dtypes = {n: moe.param_dtype(weights.config, path, dtype) for n, (path, _) in names.items()}
    sizes = {n: int(np.prod(shape)) * dtypes[n].itemsize for n, (_, shape) in names.items()}
    shards = plan_shards(sizes, shard_size)
    shard_files = _shard_names(len(shards))

    def write(work: Path, name: str, writer: Callable[[Path], None]) -> None:
        try:
            files.write_atomic(work / name, writer, fsync=False)  # the tree is fsynced once
        except OSError as e:
            raise _export_error(target / name, e) from e

    def text(value: dict) -> Callable[[Path], None]:
        return lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")

    try:
        with files.atomic_directory(target) as work:
            for file, shard in zip(shard_files, shards, strict=True):
                write(work, file, _shard_writer(weights, shard, dtypes))
            if len(shard_files) > 1:
                index = {
                    "metadata": {"total_size": sum(sizes.values())},
                    "weight_map": {n: f for f, shard in zip(shard_files, shards) for n in shard},
                }
                write(work, SAFETENSORS_INDEX, text(index))
            write(work, "config.json", text(hf_config(weights.config, dtype)))
            write(work, GENERATION_CONFIG, text(generation_config(weights.config, tok)))
            if tok is not None:
                try:
                    tok.save(work)
                except OSError as e:
                    raise _export_error(target / Path(e.filename or "tokenizer").name, e) from e
            _carry_over(target, work)
    except OSError as e:  # the directory swap itself, or carrying files over
        raise _export_error(target, e) from e
    return target


def _shard_writer(weights: MergedWeights, shard: list[str], dtypes: dict[str, torch.dtype]):
    """write(path) of one safetensors shard, header first, then tensor by tensor (`dtypes`: each
    tensor's)."""
    layout = [(n, dtypes[n], weights.names[n][1]) for n in shard]
    producers = [lambda n=n: weights(n).to(dtypes[n]) for n in shard]
    return lambda path: save_streaming(Path(path), layout, producers)


def _is_weights(name: str) -> bool:
    """An export's weight file or shard index."""
    return name == SAFETENSORS_INDEX or bool(
        re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", name)
    )


def _carry_over(target: Path, work: Path) -> None:
    """Entries of an existing `target` that the new export in `work` does not write, except an
    earlier export's weight files (a stale shard would be read beside the new ones): hard-linked
    (or copied) into `work`, so the swap keeps them and a failure before it changes nothing."""
    if not target.is_dir():
        return
    for path in target.iterdir():
        if (work / path.name).exists() or _is_weights(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, work / path.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(path, work / path.name)


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """The checkpoint's original config.json (`config.hf_dict()`) with the exported dtype and
    tying, and without the source's quantization_config (MXFP4, FP8, bitsandbytes): the exported
    weights are 16-bit, and a reader that believed the old config would quantize or fetch kernels
    for them (transformers 5.25 downloads MXFP4 kernels from the hub)."""
    hf = config.hf_dict()
    hf.pop("quantization_config", None)
    if not hf:
        raise ExportError(
            f"the {config.model_type} params carry no original config.json (ModelConfig.hf_config); "
            "load the model with fnlm.load to export it"
        )
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in hf:
            hf[key] = name
    hf.setdefault("dtype", name)
    hf["tie_word_embeddings"] = config.tie_word_embeddings
    return hf


def generation_config(config: ModelConfig, tok=None) -> dict:
    """generation_config.json: bos / eos / pad ids from the model config, else the tokenizer;
    eos lists the config's ids then the tokenizer's (its eos and the checkpoint's generation eos)."""
    doc: dict = {}
    bos = (
        config.bos_token_id
        if config.bos_token_id is not None
        else getattr(tok, "bos_token_id", None)
    )
    eos = list(dict.fromkeys([*config.eos_token_id, *getattr(tok, "eos_token_ids", ())]))
    pad = (
        config.pad_token_id
        if config.pad_token_id is not None
        else getattr(tok, "pad_token_id", None)
    )
    if bos is not None:
        doc["bos_token_id"] = bos
    if eos:
        doc["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if pad is not None:
        doc["pad_token_id"] = pad
    return doc
