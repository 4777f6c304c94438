"""`fnlm info`: what a checkpoint, adapter or run directory is, without loading its weights:
family, size, dtype, quantization, chat template; for an adapter its base, rank and targets."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

DESCRIPTION = """\
Describe a model without loading its weights: architecture family, parameter count, layers,
context length, dtype, quantization, files on disk, tokenizer and chat template. An adapter
directory (or a `fnlm train` run directory) is described with its base model.

  fnlm info                                # the embedded SmolLM2-135M-Instruct
  fnlm info Qwen/Qwen2.5-0.5B-Instruct
  fnlm info runs/demo --json"""

# Markers of the common chat formats, checked in this order.
TEMPLATE_STYLES = (
    ("<|im_start|>", "ChatML"),
    ("<|start_header_id|>", "Llama 3"),
    ("<start_of_turn>", "Gemma"),
    ("<|START_OF_TURN_TOKEN|>", "Cohere"),
    ("[INST]", "Mistral / Llama 2 [INST]"),
    ("<|user|>", "Phi-3 / Zephyr"),
    ("<|start|>", "Harmony (gpt-oss)"),
)


def add(commands, name: str) -> None:
    from fnlm.cli import HelpFormatter

    p = commands.add_parser(
        name, help="describe a model, adapter or run directory", description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "model", nargs="?", default=None, metavar="NAME",
        help="hub id, checkpoint / adapter / run directory or .gguf file (default: the embedded "
        "model)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def checkpoint_info(name_or_path: str | os.PathLike | None) -> dict:
    """A dict describing a model or adapter directory (see the module docstring). Reads only
    config.json, the weight files' sizes, the tokenizer and adapter_config.json; of a hub id it
    downloads the configs and tokenizer, never the weights (their size from the shard index).
    Raises what fnlm.hub.resolve and fnlm.load.read_config raise."""
    from fnlm.hub import resolve
    from fnlm.load import adapter_base, is_adapter_directory

    directory = resolve(name_or_path, weights=False)
    if is_adapter_directory(directory):
        doc = json.loads((directory / "adapter_config.json").read_text())
        info = {
            "kind": "LoRA adapter",
            "path": str(directory),
            "base": adapter_base(directory),
            "r": doc.get("r"),
            "lora_alpha": doc.get("lora_alpha"),
            "use_rslora": doc.get("use_rslora", False),
            "target_modules": doc.get("target_modules"),
            "modules_to_save": doc.get("modules_to_save"),
        }
        train_config = directory / "train_config.json"
        if train_config.is_file():
            settings = json.loads(train_config.read_text())
            info["trained"] = {
                k: settings.get(k) for k in ("mode", "data", "lr", "epochs", "max_steps")
            }
        info["base_model"] = checkpoint_info(info["base"])
        return info
    return model_info(directory, name_or_path)


def model_info(directory: Path, name) -> dict:
    from fnlm import models
    from fnlm.default import EMBEDDED_ID
    from fnlm.errors import CheckpointError
    from fnlm.load import read_config, weight_files

    config = read_config(directory)
    shapes = [shape for _, shape in models.family(config.model_type).weight_names(config).values()]
    count = sum(math.prod(s) for s in shapes)
    hf = json.loads((directory / "config.json").read_text())
    try:
        files = weight_files(directory)
    except CheckpointError:
        if _local(name):
            raise
        files = None  # a hub id: its weights are not downloaded to describe it
    info = {
        "kind": "model",
        "name": str(name) if name is not None else EMBEDDED_ID,
        "path": str(directory),
        "family": config.model_type,
        "parameters": count,
        "parameters_human": human(count),
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "context_length": config.max_position_embeddings,
        "dtype": config.torch_dtype,
        "quantization": quantization(hf, name),
    }
    if files is not None:
        info["files"] = len(files)
        info["size_on_disk"] = human_bytes(sum(f.stat().st_size for f in files))
    else:
        info["weights"] = hub_weights(directory)
    experts = getattr(config, "num_experts", 0)
    if experts:
        info["experts"] = experts
    info.update(tokenizer_info(directory))
    return info


def _local(name) -> bool:
    """Whether `name` names something on disk (the embedded model, a directory or a file), not a
    hub id."""
    return name is None or Path(name).expanduser().exists()


def hub_weights(directory: Path) -> str:
    """What the weights of a hub checkpoint are, from its shard index (not downloaded)."""
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return "not downloaded (one safetensors file)"
    from fnlm.errors import CheckpointError
    from fnlm.files import read_json

    doc = read_json(index, error=CheckpointError, expect=dict)  # names the file when damaged
    shards = len(set((doc.get("weight_map") or {}).values()))
    total = (doc.get("metadata") or {}).get("total_size")
    size = f", {human_bytes(int(total))}" if total else ""
    return f"not downloaded ({shards} safetensors shards{size})"


def quantization(hf: dict, name) -> str:
    """The checkpoint's stored quantization: a GGUF's file type, a config's
    quantization_config method, else none (16-bit; `fnlm.load` quantizes on loading)."""
    if name is not None and os.fspath(name).endswith(".gguf"):
        return f"GGUF {gguf_file_type(Path(name))}"
    if name is None:
        return "GGUF Q4_1 (the embedded model), dequantized on conversion"
    method = (hf.get("quantization_config") or {}).get("quant_method")
    return method or "none (16-bit weights)"


def gguf_file_type(path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is None:
        return "(file type not recorded)"
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(value)


def tokenizer_info(directory: Path) -> dict:
    if not (directory / "tokenizer.json").is_file():
        return {"tokenizer": None}
    from fnlm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(directory)
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    style = None
    if template:
        style = next((s for marker, s in TEMPLATE_STYLES if marker in template), "custom")
    return {
        "vocab_size": tok.vocab_size,
        "eos_token": tok.eos_token,
        "chat_template": style,
    }


def human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    info = checkpoint_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print_info(info)
    return 0


def print_info(info: dict, indent: str = "") -> None:
    for key, value in info.items():
        if key == "parameters_human":
            continue
        if key == "parameters":
            value = f"{info['parameters_human']} ({value:,})"
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            print_info(value, indent + "  ")
        elif isinstance(value, list):
            print(f"{indent}{key}: {', '.join(str(v) for v in value)}")
        else:
            print(f"{indent}{key}: {value}")
