"""`fnlm.load`: checkpoint -> (params pytree, tokenizer), streamed tensor by tensor."""

from __future__ import annotations

import json
import os
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fnlm import models
from fnlm.config import ModelConfig, freeze
from fnlm.errors import (
    ArgumentError,
    CheckpointError,
    ConfigError,
    LoraError,
    ModelNotFoundError,
    QuantError,
)
from fnlm.hub import resolve
from fnlm.models import moe
from fnlm.params import Params, path_name, set_path

# Tensors a checkpoint may carry that the functional model recomputes instead.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

QUANT_MODES = ("auto", "nf4", "int8", "fp8", None)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(
        f"dtype must be one of {sorted(DTYPES)} or a torch float dtype; got {dtype!r}"
    )


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def read_config(directory: Path, max_seq_length: int | None = None) -> ModelConfig:
    """config.json -> ModelConfig, with RoPE scaling added when max_seq_length passes the native length."""
    path = directory / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    config = models.config_from_hf(hf, source=str(path))
    return extend_context(config, max_seq_length)


def extend_context(config: ModelConfig, max_seq_length: int | None) -> ModelConfig:
    """Beyond the native length, scale RoPE linearly by L / native (kept if the config scales already)."""
    native = config.max_position_embeddings
    if max_seq_length is None or max_seq_length <= native:
        return config
    if config.rope_scaling:
        print(
            f"fnlm: max_seq_length {max_seq_length} > {native}; keeping the checkpoint's rope scaling {config.rope}"
        )
        return config.replace(max_position_embeddings=max_seq_length)
    factor = max_seq_length / native
    print(
        f"fnlm: max_seq_length {max_seq_length} > native {native}: linear RoPE scaling, factor {factor:g}"
    )
    return config.replace(
        rope_scaling=freeze({"rope_type": "linear", "factor": factor}),
        max_position_embeddings=max_seq_length,
    )


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from the shard index when there is one."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid shard index ({e})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(directory.glob("*.safetensors"))
        files = [f for f in files if not f.name.startswith("adapter_")]
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {directory}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is listed in the shard index but missing")
    return files


def stream_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (name, tensor, file) one tensor at a time, so host memory stays near one tensor."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name), f
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f} is corrupt or truncated: {e}") from None


def pinned_ahead(
    items: Iterator[tuple[str, torch.Tensor, Path]],
    depth: int | None = None,
    copy=torch.Tensor.pin_memory,
) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """The same stream with each tensor copied into pinned host memory by `depth` worker threads
    running ahead of the consumer.

    safetensors hands out tensors mapped from the file: touching them faults the pages in, one
    thread at a time if the copy to the GPU does it. Copying on several threads into pinned
    memory overlaps the page-cache reads with each other and with the consumer's host-to-device
    copy (asynchronous from pinned memory) and quantization of earlier tensors. Host memory stays
    near `depth` tensors. `copy` is the per-tensor work (tests pass a CPU clone)."""
    depth = depth or max(1, min(8, os.cpu_count() or 1))
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="fnlm-load") as pool:
        for name, tensor, file in items:
            pending.append((name, pool.submit(copy, tensor), file))
            if len(pending) > depth:
                name, future, file = pending.popleft()
                yield name, future.result(), file
        while pending:
            name, future, file = pending.popleft()
            yield name, future.result(), file


def is_quantizable(path: tuple, tensor: torch.Tensor) -> bool:
    """Linear weights inside the decoder layers; embeddings, norms, biases, MoE routers, Qwen3.5's
    depthwise conv1d (not a Linear: bitsandbytes leaves it too) and lm_head stay 16-bit."""
    return (
        path[0] == "layers"
        and tensor.dim() >= 2
        and not str(path[-1]).endswith(("norm", "bias"))
        and path[-1] not in ("router", "shared_gate", "conv")
    )


def load(
    name_or_path: str | os.PathLike | None = None,
    *,
    quant: str | None = "auto",
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    max_seq_length: int | None = None,
    revision: str | None = None,
    token: str | None = None,
    skip: tuple[str, ...] = (),
):
    """Load a model and its tokenizer: `params, tok = fnlm.load("Qwen/Qwen2.5-0.5B-Instruct")`.

    name_or_path: local checkpoint directory, hub id, `.gguf` file, or None for the embedded
        default (SmolLM2-135M-Instruct, offline). A LoRA adapter directory (adapter_config.json,
        as peft or `fnlm train` write it) loads the base it names (`base_model_name_or_path`)
        with the adapter attached (`fnlm.lora.attach`), as peft's AutoPeftModel does; the
        adapter's own tokenizer, when it has one, is returned.
    quant: "auto" (NF4 on CUDA, 16-bit elsewhere: NF4 matmuls on a CPU are several times
        slower), "nf4" (bitsandbytes NF4, double quant), "int8", "fp8" or None (16-bit) for the
        linear weights of the decoder layers; names in `skip` (e.g. "down", "layers.0.attn.q")
        stay 16-bit.
    dtype: compute/storage dtype; None picks bf16 on capable GPUs, fp16 on older ones, fp32 on CPU.
    max_seq_length: beyond the native context, RoPE is scaled (linear, factor L / native).
    Returns (Params, Tokenizer or None when the checkpoint has no tokenizer.json); `params.source`
    is the checkpoint directory read (for `fnlm.save`).
    Raises ModelNotFoundError, OfflineError, ConfigError, UnsupportedModelError, CheckpointError.
    """
    if quant not in QUANT_MODES:
        raise QuantError(f"quant must be one of {QUANT_MODES}; got {quant!r}")
    if max_seq_length is not None and (
        not isinstance(max_seq_length, int)
        or isinstance(max_seq_length, bool)
        or max_seq_length < 1
    ):
        raise ArgumentError(
            f"load: max_seq_length must be a positive integer or None, got {max_seq_length!r}"
        )
    options = dict(quant=quant, dtype=dtype, device=device, max_seq_length=max_seq_length,
                   revision=revision, token=token, skip=skip)  # fmt: skip
    device = resolve_device(device)
    if quant == "auto":
        quant = "nf4" if device.type == "cuda" else None
    dtype = resolve_dtype(dtype, device)
    directory = resolve(name_or_path, revision=revision, token=token)
    if is_adapter_directory(directory):
        return load_adapter_directory(directory, **options)
    config = read_config(directory, max_seq_length)
    quantize = None
    if quant is not None:
        from fnlm import quant as quant_lib

        quantize = lambda w: quant_lib.quantize(w, quant, compute_dtype=dtype)
    params = load_params(
        directory, config, dtype=dtype, device=device, quantize=quantize, skip=skip
    )
    # The checkpoint directory, so fnlm.save can merge adapters into its 16-bit weights instead
    # of dequantized ones. Only this Params object carries it (tree maps build new ones).
    params.source = directory
    # What an adapter trained on it records as its base (fnlm.train): a hub id, an absolute
    # path, or the embedded model's EMBEDDED_ID, which `load` resolves back to it.
    params.model_id = model_id(name_or_path)
    return params, load_tokenizer(directory)


def model_id(name_or_path: str | os.PathLike | None) -> str:
    """A stable name for a model, to record as an adapter's base_model_name_or_path: the hub id
    as given, a local path made absolute, and for the embedded default `EMBEDDED_ID` (which
    `fnlm.load` resolves back to it)."""
    if name_or_path is None:
        from fnlm.default import EMBEDDED_ID

        return EMBEDDED_ID
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else os.fspath(name_or_path)


def is_adapter_directory(directory: Path) -> bool:
    """A LoRA adapter (adapter_config.json) rather than a model (config.json)."""
    return (directory / "adapter_config.json").is_file() and not (
        directory / "config.json"
    ).is_file()


def adapter_base(directory: str | os.PathLike) -> str:
    """The base model an adapter directory names: adapter_config.json's base_model_name_or_path.
    Raises LoraError naming the file when it is missing or names no base."""
    path = Path(directory) / "adapter_config.json"
    try:
        base = json.loads(path.read_text()).get("base_model_name_or_path")
    except FileNotFoundError:
        raise LoraError(f"{path} not found; {directory} is not a LoRA adapter directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise LoraError(f"{path} is not a valid adapter config: {e}") from None
    if not base:
        raise LoraError(
            f"{path} names no base model (base_model_name_or_path is empty); load the base "
            "yourself and pass it with the adapter (fnlm.lora.load(directory, params), or --model)"
        )
    return base


def load_adapter_directory(directory: Path, **options):
    """(params with the adapter attached, tokenizer) for an adapter directory: its base loaded
    as `load` loads a model, then the adapter on it. The result's `.adapter` is the Lora and
    `.source` the base's checkpoint directory."""
    from fnlm import lora as lora_lib

    base = adapter_base(directory)
    try:
        params, tok = load(base, **options)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(
            f"{directory / 'adapter_config.json'} names the base model {base!r}, which cannot be "
            f"loaded: {e}"
        ) from None
    adapter = lora_lib.load(directory, params, trainable=False)
    attached = lora_lib.attach(params, adapter)
    attached.source, attached.adapter = params.source, adapter
    if (directory / "tokenizer.json").is_file():
        tok = load_tokenizer(directory)
    return attached, tok


def load_params(
    directory: Path,
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quantize=None,
    skip: tuple[str, ...] = (),
) -> Params:
    """Stream the checkpoint's tensors into a Params tree, checking every name and shape."""
    expected = models.family(config.model_type).weight_names(config)
    tree: dict = {"layers": [{} for _ in range(config.num_layers)]}
    seen: set[str] = set()
    origin: dict[str, Path] = {}  # tensor name -> the file it was read from
    stacks = _Stacks(config)
    stream = stream_tensors(weight_files(directory))
    if device.type == "cuda":
        stream = pinned_ahead(stream)
    skipped = 0
    for name, tensor, file in models.checkpoint_stream(config, stream):
        name = models.checkpoint_name(config, name)
        if name is None:  # a multimodal checkpoint's vision tower
            skipped += 1
            continue
        if name not in expected:
            if name.endswith(IGNORED_SUFFIXES) or (
                name == "lm_head.weight" and config.tie_word_embeddings
            ):
                continue
            raise CheckpointError(
                f"{file.name}: unexpected tensor {name!r} {tuple(tensor.shape)} for a {config.model_type} "
                f"model with {config.num_layers} layers; is config.json from the same checkpoint?"
            )
        path, shape = expected[name]
        if name in origin:  # e.g. a stray *.safetensors beside the shards, without an index
            raise CheckpointError(
                f"tensor {name!r} is in both {origin[name]} and {file}; remove the file that does "
                "not belong to the checkpoint (fnlm does not guess which one is meant)"
            )
        origin[name] = file
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} from config.json"
            )
        seen.add(name)
        tensor = models.to_params(config, name, tensor)  # gpt-oss's transposed expert stacks
        tensor = tensor.to(device, non_blocking=True)  # asynchronous from pinned memory
        if tensor.is_floating_point():  # fp32 routers of sigmoid-scored MoE (moe.param_dtype)
            tensor = tensor.to(moe.param_dtype(config, path, dtype))
        slot = moe.stack_slot(path)
        if slot is not None:
            path, tensor = slot.stack, stacks.add(slot, tensor)
            if tensor is None:  # the stack still lacks other experts' matrices
                continue
        if quantize is not None and is_quantizable(path, tensor) and not _skipped(path, skip):
            stacked = slot is not None or tensor.dim() == 3
            tensor = moe.quantize_stack(tensor, quantize) if stacked else quantize(tensor)
        set_path(tree, path, tensor)
    if skipped:
        print(
            f"fnlm: {config.text_tower_of} checkpoint: loaded its text model, skipped {skipped} vision tensors"
        )
    missing = [n for n in expected if n not in seen]
    if missing:
        raise CheckpointError(
            f"{directory}: {len(missing)} tensor(s) missing from the checkpoint, first {missing[0]!r} "
            f"(expected shape {expected[missing[0]][1]})"
        )
    if config.tie_word_embeddings:
        tree["lm_head"] = tree["embed"]
    return Params(tree, config)


class _Stacks:
    """Mixture-of-experts stacks being assembled from per-expert checkpoint tensors. A stack is
    allocated (16-bit, on the target device) when its first expert arrives and handed out once
    complete, so at most a few stacks of one layer are held unquantized at a time."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.pending: dict[tuple, tuple[torch.Tensor, int]] = {}

    def add(self, slot: moe.Slot, tensor: torch.Tensor) -> torch.Tensor | None:
        stack, missing = self.pending.get(slot.stack, (None, 0))
        if stack is None:
            name = slot.stack[-1]
            shape = moe.stack_shape(self.config, name)
            stack = tensor.new_empty(shape)
            missing = shape[0] * (2 if name == "gate_up" else 1)
        moe.rows(slot, stack).copy_(tensor)
        if missing == 1:
            del self.pending[slot.stack]
            return stack
        self.pending[slot.stack] = (stack, missing - 1)
        return None


def _skipped(path: tuple, skip: tuple[str, ...]) -> bool:
    name = path_name(path)
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def load_tokenizer(directory: Path):
    if not (directory / "tokenizer.json").is_file():
        warnings.warn(f"{directory} has no tokenizer.json; returning tokenizer None", stacklevel=3)
        return None
    from fnlm.tokenizer import Tokenizer

    return Tokenizer.from_dir(directory)
