"""GGUF files written for llama.cpp: a model's merged weights, config and tokenizer.

`fnlm.save(..., format="gguf")` calls `write_gguf` with the merged weights it streams; the reader
beside this file (read.py) reads such files back. What llama.cpp does with every key is the
reference (its `convert_hf_to_gguf.py` writes the same ones for the same checkpoint): the
architecture's metadata, the tensors in its names and layouts (llama's q / k rows permuted), and
the tokenizer — vocabulary, token types, merges, special ids, add_bos / add_eos, chat template and
`tokenizer.ggml.pre`, the name of the pre-tokenizer whose meaning in llama.cpp is the tokenizer's
own (pretokenizers.py), so llama.cpp cuts text into the same tokens fnlm does.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fnlm.config import ModelConfig
from fnlm.errors import ExportError
from fnlm.gguf.archs import ARCHITECTURES, Arch, problems
from fnlm.gguf.pretokenizers import pre_tokenizer_name
from fnlm.gguf.read import ROPE_FREQS, llama3_factors

if TYPE_CHECKING:
    from fnlm.export import MergedWeights

GGUF_TYPES = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")

# HF model_type -> GGUF architecture (llama.cpp runs Mistral and Mixtral as llama).
GGUF_ARCHITECTURES = {model_type: arch.name for model_type, arch in ARCHITECTURES.items()}
# llama.cpp's file types, for general.file_type
_FILE_TYPES = {"f16": 1, "bf16": 32, "q8_0": 7, "q5_1": 9, "q5_0": 8, "q4_1": 3, "q4_0": 2}
# llama.cpp's converter keeps the MoE routers in F32 whatever the file type
_F32_MATRICES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
# ggml token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def gguf_arch(config: ModelConfig) -> Arch:
    """The llama.cpp architecture of `config`'s family; ExportError naming the supported ones."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ExportError(
            f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; {config.model_type} is not "
            "one of them (llama.cpp has no architecture fnlm writes it as); export "
            "format='merged' instead"
        )
    return arch


def check_gguf_support(config: ModelConfig) -> None:
    """Refuse what the model's llama.cpp architecture would compute differently (fnlm.gguf.archs);
    warn about a sliding window the architecture does not apply."""
    arch = gguf_arch(config)
    found = problems(config, arch)
    if found:
        raise ExportError(
            f"GGUF export of this {config.model_type} model: {'; '.join(found)} cannot be "
            f"written to the {arch.name} GGUF architecture; export format='merged' instead"
        )
    if config.sliding_window is not None and not arch.sliding_window:
        warnings.warn(
            f"GGUF {arch.name} has no sliding window: llama.cpp attends over the whole context, "
            f"so outputs differ from this model's beyond {config.sliding_window} tokens",
            stacklevel=3,
        )
    if config.rope.get("rope_type") == "yarn" and config.rope.get("truncate") is False:
        warnings.warn(
            f"GGUF {arch.name}: llama.cpp rounds yarn's ramp ends to whole dimensions (ggml's "
            "rope_yarn_corr_dims), this model's rope does not (truncate: false, as gpt-oss's): "
            "a few rotary frequencies differ slightly",
            stacklevel=3,
        )


def gguf_name(hf_name: str, config: ModelConfig) -> str:
    """The GGUF name of a checkpoint tensor of `config`'s family, by the gguf package's map (the
    one llama.cpp's converter uses): "model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight".
    A per-expert name maps to its stack: "...mlp.experts.5.up_proj.weight" -> "blk.3.ffn_up_exps.weight"."""
    arch = gguf_arch(config)
    merged = re.sub(r"\.experts\.\d+\.", ".experts.", hf_name)
    mapping = _name_map(arch.name, config.num_layers)
    name = mapping.get_name(merged, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(
            f"tensor {hf_name} has no name in llama.cpp's {arch.name} architecture (the gguf "
            "package's tensor map); export format='merged' instead"
        )
    return name


@functools.cache
def _name_map(arch_name: str, num_layers: int):
    import gguf

    kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    return gguf.get_tensor_name_map(kind, num_layers)


def _gguf_tensor_type(shape: tuple[int, ...], name: str, gguf_type: str):
    """The ggml type of one tensor: norms, biases (gpt-oss's per-expert ones too) F32; 2-D weights as asked, F16 when the row
    length is not a multiple of the quantization block; with the 4- and 5-bit types the embedding
    and output in Q8_0 (llama.cpp keeps those wider too)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2 or name.endswith((".bias", "norm.weight", *_F32_MATRICES)):
        return Q.F32
    kind = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q5_1": Q.Q5_1, "q5_0": Q.Q5_0,
            "q4_1": Q.Q4_1, "q4_0": Q.Q4_0}[gguf_type]  # fmt: skip
    if kind in (Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0) and name in ("token_embd.weight", "output.weight"):
        kind = Q.Q8_0
    if shape[-1] % GGML_QUANT_SIZES[kind][0]:
        return Q.F16
    return kind


def _gguf_array(tensor: torch.Tensor, kind) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    values = tensor.float().numpy()
    if kind == Q.F32:
        return values
    if kind == Q.F16:
        return values.astype(np.float16)
    # Quantized blocks are made from the f16-rounded weights, as llama.cpp's own pipeline (convert
    # to f16, then llama-quantize) makes them: the same bytes as its quantizer on the same model.
    return quants.quantize(values.astype(np.float16).astype(np.float32), kind)


def write_gguf(path: Path, weights: MergedWeights, tok, gguf_type: str) -> None:
    """Write the GGUF file `path` (a fresh name: fnlm.save renames it into place) holding the
    merged `weights` in `gguf_type`, with the tokenizer `tok`. Raises ExportError for a tokenizer
    llama.cpp cannot run as `tok` runs."""
    import gguf

    config = weights.config
    arch = gguf_arch(config)
    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    _gguf_model_metadata(writer, config, arch, gguf_type)
    _gguf_tokenizer_metadata(writer, tok, config.vocab_size)

    # (gguf name, ggml type, shape, producer of the fp32 tensor in llama.cpp's layout)
    plan: list[tuple[str, Any, tuple[int, ...], Callable[[], torch.Tensor]]] = []
    for name, (sources, shape, change) in _gguf_tensors(weights, arch).items():
        if shape is not None:  # written its own way (arch.tensors): one checkpoint tensor
            produce = functools.partial(_changed, weights, sources[0], change)
        else:
            shape = weights.names[sources[0]][1]
            if len(sources) > 1 or ".experts." in sources[0]:  # experts stacked: [E, out, in]
                shape = (len(sources), *shape)
            produce = _gguf_producer(weights, sources, arch)
        plan.append((name, _gguf_tensor_type(shape, name, gguf_type), shape, produce))
    if config.rope.get("rope_type") == "llama3":
        factors = llama3_rope_factors(config)
        plan.append((ROPE_FREQS, gguf.GGMLQuantizationType.F32, factors.shape, lambda: factors))
    if config.rope.get("rope_type") == "longrope":  # Phi-3: per-frequency factors, F32
        for which in ("long", "short"):
            factors = torch.tensor(config.rope[f"{which}_factor"], dtype=torch.float32)
            plan.append((f"rope_factors_{which}.weight", gguf.GGMLQuantizationType.F32,
                         tuple(factors.shape), lambda f=factors: f))  # fmt: skip
    for name, kind, shape, _ in plan:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, kind)
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            numpy_dtype = np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(name, shape, np.dtype(numpy_dtype), int(np.prod(byte_shape)))
        else:  # quantized (and bf16) data are bytes, [rows, bytes per row]
            writer.add_tensor_info(
                name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), kind
            )

    try:
        writer.write_header_to_file(path=Path(path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, kind, _, produce in plan:
            writer.write_tensor_data(_gguf_array(produce(), kind))
    finally:
        writer.close()


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's `permute` (for writing a GGUF): per head, rows [2, pairs] -> [pairs, 2]."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_tensors(weights: MergedWeights, arch: Arch) -> dict[str, tuple[list[str], Any, Any]]:
    """GGUF name -> (the checkpoint tensors it is made of: one, or each expert's in order; and
    for a tensor the arch writes its own way (Arch.tensors), its shape and change, else None)."""
    config = weights.config
    tensors: dict[str, tuple[list[str], Any, Any]] = {}
    for hf, (_, shape) in weights.names.items():
        derived = arch.tensors(hf, shape, config) if arch.tensors is not None else None
        if derived is None:
            tensors.setdefault(gguf_name(hf, config), ([], None, None))[0].append(hf)
        for name, new_shape, change in derived or ():
            tensors[gguf_name(name, config)] = ([hf], tuple(new_shape), change)
    return tensors


def _changed(weights: MergedWeights, hf: str, change, /) -> torch.Tensor:
    tensor = weights(hf)
    return (change(tensor) if change is not None else tensor).contiguous()


def _gguf_producer(
    weights: MergedWeights, sources: list[str], arch: Arch
) -> Callable[[], torch.Tensor]:
    """The merged tensor in llama.cpp's layout: experts stacked; llama's q / k rows permuted;
    Gemma's norms as 1 + w (llama.cpp's RMSNorm has no offset)."""
    config = weights.config
    hf = sources[0]

    def produce() -> torch.Tensor:
        if len(sources) > 1 or ".experts." in hf:
            tensor = torch.stack([weights(s) for s in sources])
        else:
            tensor = weights(hf)
        if arch.permute_qk and ".self_attn.q_proj." in hf:
            tensor = _permute(tensor, config.num_heads)
        elif arch.permute_qk and ".self_attn.k_proj." in hf:
            tensor = _permute(tensor, config.num_kv_heads)
        if config.norm_offset and re.search(r"norm\.weight$", hf):
            tensor = tensor + config.norm_offset
        return tensor

    return produce


def llama3_rope_factors(config: ModelConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs for Llama 3 rope scaling: per rotary frequency, the divisor that
    `rope_type: llama3` applies (fnlm.gguf reads the scaling back from these)."""
    rope = config.rope
    dim = config.rotary_dim
    inv_freq = config.rope_theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    factors = llama3_factors(
        2 * np.pi / inv_freq, rope["factor"], rope.get("low_freq_factor", 1.0),
        rope.get("high_freq_factor", 4.0), rope["original_max_position_embeddings"],
    )  # fmt: skip
    return torch.from_numpy(factors.astype(np.float32))


def _gguf_model_metadata(writer, config: ModelConfig, arch: Arch, gguf_type: str) -> None:
    import gguf

    hf = config.hf_dict()
    # transformers reads a llama file named exactly "mistral" as model_type mistral, which its
    # gguf package cannot load; llama.cpp names files after the checkpoint directory.
    name = Path(str(hf.get("_name_or_path") or "")).name or f"fnlm-{config.model_type}"
    writer.add_name(name if name != "mistral" else "fnlm-mistral")
    writer.add_file_type(_FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.rope_native_length or config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if config.norm_type == "layer":
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = config.rope
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if config.num_experts:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.experts_per_token)
        writer.add_expert_feed_forward_length(
            config.moe_intermediate_size or config.intermediate_size
        )
    if config.shared_expert_size:
        writer.add_expert_shared_feed_forward_length(config.shared_expert_size)
    if arch.sliding_window and config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
        # the per-layer pattern itself, rather than the arch's default period
        sliding = [t == "sliding_attention" for t in config.layer_types]
        writer.add_sliding_window_pattern(sliding or [True] * config.num_layers)
        if config.local_rope_theta is not None:
            writer.add_rope_freq_base_swa(config.local_rope_theta)
    if arch.metadata is not None:
        arch.metadata(writer, config)


def _gguf_tokenizer_metadata(writer, tok, vocab_size: int) -> None:
    """tokenizer.ggml.*: the vocabulary by id (padded with unused tokens to the model's
    vocab_size), token types, merges, special ids, add_bos / add_eos, and the chat template."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"GGUF export needs a BPE tokenizer (byte-level or SentencePiece-style); "
            f"{tok.name_or_path or 'this tokenizer'} is {model.get('type')!r}"
        )
    sentencepiece = bool(model.get("byte_fallback"))
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    if len(by_id) and max(by_id) >= vocab_size:
        raise ExportError(
            f"the tokenizer has ids up to {max(by_id)}, beyond the model's vocab_size {vocab_size}"
        )
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(CONTROL if added[i].special else USER_DEFINED)
        elif sentencepiece and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            tokens.append(token)
            types.append(BYTE)
        else:
            tokens.append(token)
            types.append(UNKNOWN if token == tok.unk_token else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    # llama.cpp's SentencePiece tokenizer has no pre-tokenizer: any name reads as "default"
    writer.add_tokenizer_pre("default" if sentencepiece else _pre_tokenizer(spec, tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if sentencepiece:  # llama.cpp's SentencePiece vocabulary merges by score: earlier = better
        writer.add_token_scores([0.0 if t != NORMAL else -float(i) for i, t in enumerate(types)])
        _check_space_prefix(spec, tok)
    # (a byte-level one never prepends a space: _pre_tokenizer refuses a ByteLevel that would)
    writer.add_add_space_prefix(sentencepiece and _prepends_space(spec))
    writer.add_token_merges(merges)
    for name, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        token_id = getattr(tok, f"{name}_token_id")
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(tok.add_bos_token))
    writer.add_add_eos_token(bool(tok.add_eos_token))
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        writer.add_chat_template(template)


def _pre_tokenizer(spec: dict, tok) -> str:
    """`tokenizer.ggml.pre` for a byte-level tokenizer: the name whose meaning in llama.cpp is
    the tokenizer's own split (pretokenizers.py). Raises ExportError when llama.cpp has none."""
    model = spec.get("model") or {}
    name = pre_tokenizer_name(
        spec.get("pre_tokenizer"),
        ignore_merges=bool(model.get("ignore_merges")),
        clean_spaces=bool(tok.clean_up_tokenization_spaces),
    )
    if name is None:
        raise ExportError(
            f"GGUF export: llama.cpp has no pre-tokenizer that splits text as "
            f"{tok.name_or_path or 'this tokenizer'} does (its pre_tokenizer is "
            f"{json.dumps(spec.get('pre_tokenizer'))[:300]}), so llama.cpp would tokenize text "
            f"differently; export format='merged' instead"
        )
    if spec.get("normalizer") is not None:
        warnings.warn(
            f"GGUF export: llama.cpp does not apply the tokenizer's normalizer "
            f"({spec['normalizer'].get('type')}) to byte-level vocabularies; text it would change "
            f"is tokenized differently there",
            stacklevel=4,
        )
    return name


def _check_space_prefix(spec: dict, tok) -> None:
    """llama.cpp's SentencePiece tokenizer prefixes a space to the text after every special token
    (`add_space_prefix`), as Llama 2's and Mistral's tokenizer.json do with a Prepend normalizer;
    a Metaspace that prepends to the first word only cannot be written."""
    first = [
        n
        for n in _walk(spec.get("pre_tokenizer"))
        if n.get("type") == "Metaspace" and n.get("prepend_scheme") == "first"
    ]
    if first:
        warnings.warn(
            f"GGUF export: {tok.name_or_path or 'the tokenizer'} prefixes a space to the first "
            f"word only (Metaspace prepend_scheme 'first'); llama.cpp prefixes one after every "
            f"special token too, so text that follows a special token is tokenized differently "
            f"there",
            stacklevel=5,
        )


def _prepends_space(spec: dict) -> bool:
    nodes = [*_walk(spec.get("pre_tokenizer")), *_walk(spec.get("normalizer"))]
    return any(
        n.get("type") == "Metaspace"
        and n.get("prepend_scheme", "always") != "never"
        or n.get("type") == "Prepend"
        for n in nodes
    )


def _walk(node) -> list[dict]:
    """A tokenizer.json component and the components of its Sequences, flattened."""
    if not isinstance(node, dict):
        return []
    inner = node.get("pretokenizers") or node.get("normalizers")
    if node.get("type") == "Sequence" and inner:
        return [node, *(n for child in inner for n in _walk(child))]
    return [node]
