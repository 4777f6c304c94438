"""LoRA against peft: same adapter files both ways, same logits, same gradients, same init.

Every test builds a tiny random transformers model (tests/models.py), loads it into fnlm in fp32,
and runs the same adapter through peft 0.21 (`get_peft_model` / `PeftModel.from_pretrained`) and
through `fnlm.forward` / `fnlm.loss` with `lora=`.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import warnings
from pathlib import Path

import peft
import pytest
import torch
import torch.utils._pytree as pytree
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import fnlm
import fnlm.lora
from fnlm.errors import ArgumentError, LoraError
from fnlm.params import get_path, leaf_paths
from tests.models import FP32_REL_TOL, HF_CONFIGS, hf_configs, max_rel_error, saved_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no tokenizer.json"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

# Gradients are sums over every token of products of fp32 values; relative to their scale they
# agree to rounding, a little looser than logits because backward adds more terms.
GRAD_REL_TOL = 1e-4
# Dropout: the adapter path is B·A·dropout(x); with the same RNG state fnlm and peft draw the
# same masks (same shapes, same order), so gradients stay equal to rounding.


def load_fp32(directory):
    params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu")
    return params


def tokens_for(config, batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq), generator=g)


@st.composite
def lora_settings(draw, names: dict[str, str], peft_names: bool = False):
    """Adapter hyper-parameters: rank, alpha, a non-empty subset of the model's adaptable modules
    (`names`: fnlm name -> transformers name), rslora, bias mode, modules_to_save, and a rank /
    alpha pattern for one of the targets (keyed by fnlm or transformers names)."""
    targets = draw(st.lists(st.sampled_from(sorted(names)), min_size=1, max_size=4, unique=True))
    free = [m for m in ("lm_head", "embed") if m not in targets]
    to_save = draw(st.lists(st.sampled_from(free), max_size=1, unique=True)) if free else []
    s = dict(
        names=names,
        r=draw(st.integers(1, 8)),
        alpha=draw(st.sampled_from([1, 8, 16, 24.5])),
        targets=targets,
        rslora=draw(st.booleans()),
        bias=draw(st.sampled_from(fnlm.lora.BIAS_MODES)),
        modules_to_save=to_save,
        rank_pattern={},
        alpha_pattern={},
    )
    special = draw(st.sampled_from([None, *targets]))
    if special is not None and draw(st.booleans()):
        key = names[special] if peft_names else special
        s["rank_pattern"] = {key: draw(st.integers(1, 6))}
    if special is not None and draw(st.booleans()):
        key = names[special] if peft_names else special
        s["alpha_pattern"] = {key: draw(st.sampled_from([2, 5]))}
    return s


def peft_config(s: dict, dropout: float = 0.0) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=s["r"],
        lora_alpha=s["alpha"],
        target_modules=[s["names"][t] for t in s["targets"]],
        lora_dropout=dropout,
        bias=s["bias"],
        use_rslora=s["rslora"],
        modules_to_save=[s["names"][m] for m in s["modules_to_save"]] or None,
        rank_pattern=dict(s["rank_pattern"]),
        alpha_pattern=dict(s["alpha_pattern"]),
        task_type="CAUSAL_LM",
    )


def randomize_fnlm(lora: fnlm.lora.Lora, seed: int = 1) -> fnlm.lora.Lora:
    """Every adapter tensor perturbed (B starts at zero, the embedding's A too), so nothing is a no-op."""
    g = torch.Generator().manual_seed(seed)
    return pytree.tree_map(
        lambda t: (
            t.detach() + 0.3 * torch.randn(t.shape, generator=g).to(t.device)
        ).requires_grad_(True),
        lora,
    )


def randomize_peft(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def peft_key(name: str) -> str:
    """A peft parameter name -> its key in the saved adapter file."""
    return name.replace(".default", "").replace(".modules_to_save", "")


def read_adapter(directory) -> tuple[dict, dict]:
    directory = Path(directory)
    doc = json.loads((directory / "adapter_config.json").read_text())
    return doc, load_file(directory / "adapter_model.safetensors")


def assert_saved_equals_peft(directory, peft_model) -> None:
    """The adapter file fnlm saved in `directory` holds exactly `peft_model`'s trainable tensors
    under peft's keys, bit for bit."""
    ours = load_file(Path(directory) / "adapter_model.safetensors")
    ref = {peft_key(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert ours.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(ours[key], value.detach()), key


def build_peft(model, s: dict, seed: int = 3407, dropout: float = 0.0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft_config(s, dropout))


# ------------------------------------------------------------------------------------------
# (1) fnlm -> peft: our saved adapter, loaded by PeftModel.from_pretrained, gives our logits;
#     the files are the ones peft itself writes; merged params give the same logits (3).
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))  # per family: the README's LoRA column
@settings(max_examples=max(2, settings.default.max_examples // 8))  # 16 families: a share each
@given(data=st.data())
def test_saved_adapter_loads_in_peft_with_same_logits(model_type, data):
    config = data.draw(hf_configs(model_type))
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        s = data.draw(lora_settings(fnlm.lora.target_names(params.config)))
        lora = fnlm.lora.init(
            params, s["r"], s["alpha"], s["targets"], bias=s["bias"], rslora=s["rslora"],
            modules_to_save=s["modules_to_save"], rank_pattern=s["rank_pattern"],
            alpha_pattern=s["alpha_pattern"],
        )  # fmt: skip
        lora = randomize_fnlm(lora)
        fnlm.lora.save(out, lora, params=params, base_model_name_or_path=str(directory))
        assert sorted(p.name for p in Path(out).iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]  # written atomically: no temporary files left behind

        tokens = tokens_for(params.config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = peft.PeftModel.from_pretrained(model, out).eval()
        with torch.no_grad():
            ref = peft_model(tokens).logits
            ours = fnlm.forward(params, tokens, lora=lora)
            merged = fnlm.forward(fnlm.lora.merge(params, lora), tokens)
        assert max_rel_error(ours, ref) <= FP32_REL_TOL
        assert max_rel_error(merged, ours) <= FP32_REL_TOL
        # the adapter moves the logits well beyond the tolerance, so the equalities above mean something
        assert max_rel_error(ours, fnlm.forward(params, tokens)) > 10 * FP32_REL_TOL

        # peft re-saving the adapter it loaded writes the same config and the same tensors
        with tempfile.TemporaryDirectory() as again:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model.save_pretrained(again)
            ours_doc, ours_tensors = read_adapter(out)
            ref_doc, ref_tensors = read_adapter(again)
        for doc in (ours_doc, ref_doc):
            doc["target_modules"] = sorted(doc["target_modules"])
            doc["modules_to_save"] = sorted(doc["modules_to_save"] or []) or None
        assert ours_doc == ref_doc
        assert ours_tensors.keys() == ref_tensors.keys()
        for key in ours_tensors:
            assert torch.equal(ours_tensors[key], ref_tensors[key]), key


# ------------------------------------------------------------------------------------------
# (2) peft -> fnlm: an adapter created and randomised in peft, saved, loaded by fnlm
# ------------------------------------------------------------------------------------------


@given(model_type=st.sampled_from(sorted(HF_CONFIGS)), data=st.data())
def test_peft_adapter_loads_in_fnlm_with_same_logits(model_type, data):
    config = data.draw(hf_configs(model_type))
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        s = data.draw(lora_settings(fnlm.lora.target_names(params.config), peft_names=True))
        peft_model = build_peft(model, s)
        randomize_peft(peft_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(out)
        lora = fnlm.lora.load(out, params)
        tokens = tokens_for(params.config, seed=3)
        with torch.no_grad():
            ref = peft_model.eval()(tokens).logits
            ours = fnlm.forward(params, tokens, lora=lora)
            merged = fnlm.forward(fnlm.lora.merge(params, lora), tokens)
    assert max_rel_error(ours, ref) <= FP32_REL_TOL
    assert max_rel_error(merged, ref) <= FP32_REL_TOL


def test_peft_regex_targets_and_patterns_load():
    """target_modules as a regex string, and patterns given as regexes over full module names."""
    config = transformers.Qwen2Config(
        vocab_size=80, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
    )  # fmt: skip
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        lc = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=r".*layers\.[02]\.(self_attn\.(q|v)_proj|mlp\.down_proj)",
            rank_pattern={r"layers\.2\.self_attn\.q_proj": 2},
            alpha_pattern={r"model\.layers\.0\..*": 3},
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = peft.get_peft_model(model, lc)
            randomize_peft(peft_model)
            peft_model.save_pretrained(out)
        lora = fnlm.lora.load(out, params)
        assert lora["layers"][2]["attn"]["q"]["a"].shape[0] == 2
        assert "q" not in lora["layers"][1].get("attn", {})
        tokens = tokens_for(params.config)
        with torch.no_grad():
            ref = peft_model.eval()(tokens).logits
            ours = fnlm.forward(params, tokens, lora=lora)
    assert max_rel_error(ours, ref) <= FP32_REL_TOL


def test_tied_embeddings_with_embed_and_lm_head_adapted():
    """Tied weights: peft adapts embed and lm_head separately; merging unties them."""
    config = transformers.LlamaConfig(
        vocab_size=90, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
        num_attention_heads=2, tie_word_embeddings=True, initializer_range=0.2, pad_token_id=3,
    )  # fmt: skip
    s = dict(names=fnlm.lora.target_names(fnlm.models.config_from_hf(config.to_dict())),
             r=3, alpha=6, targets=["embed", "lm_head", "q"], rslora=False, bias="none",
             modules_to_save=[], rank_pattern={}, alpha_pattern={})  # fmt: skip
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        assert params["lm_head"] is params["embed"]
        peft_model = build_peft(model, s)
        randomize_peft(peft_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(out)
        lora = fnlm.lora.load(out, params)
        tokens = tokens_for(params.config)
        tokens[0, 2] = 3  # a pad token: its embedding adapter row gets no gradient in either
        with torch.no_grad():
            ref = peft_model.eval()(tokens).logits
            ours = fnlm.forward(params, tokens, lora=lora)
        merged_params = fnlm.lora.merge(params, lora)
        assert not merged_params.config.tie_word_embeddings
        merged = fnlm.forward(merged_params, tokens)
        assert max_rel_error(ours, ref) <= FP32_REL_TOL
        assert max_rel_error(merged, ours) <= FP32_REL_TOL

        peft_model(input_ids=tokens, labels=tokens).loss.backward()
        fnlm.loss(params, {"tokens": tokens}, lora=lora).backward()
        embed = peft_model.base_model.model.model.embed_tokens
        ref_grad = embed.lora_embedding_A["default"].grad
        assert not lora["embed"]["a"].grad[:, 3].any()  # padding_idx row
        assert max_rel_error(lora["embed"]["a"].grad, ref_grad) <= GRAD_REL_TOL
        assert (
            max_rel_error(
                lora["lm_head"]["b"].grad,
                peft_model.base_model.model.lm_head.lora_B["default"].weight.grad,
            )
            <= GRAD_REL_TOL
        )


# ------------------------------------------------------------------------------------------
# (4) gradients of the adapters equal peft's for the same loss
# ------------------------------------------------------------------------------------------


@given(
    model_type=st.sampled_from(sorted(HF_CONFIGS)),
    data=st.data(),
    dropout=st.sampled_from([0.0, 0.25]),
)
def test_adapter_gradients_match_peft(model_type, data, dropout):
    config = data.draw(hf_configs(model_type))
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        s = data.draw(lora_settings(fnlm.lora.target_names(params.config), peft_names=True))
        if dropout:  # fnlm's lm head goes through the fused CE with the merged weight: no dropout
            s["targets"] = [t for t in s["targets"] if t != "lm_head"] or ["o"]
        peft_model = build_peft(model, s, dropout=dropout)
        randomize_peft(peft_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(out)
        lora = fnlm.lora.train_mode(fnlm.lora.load(out, params))
        tokens = tokens_for(params.config, batch=2, seq=9, seed=5)
        labels = tokens.clone()
        labels[0, :3] = -100

        peft_model.train()
        torch.manual_seed(11)
        peft_model(input_ids=tokens, labels=labels).loss.backward()
        torch.manual_seed(11)
        fnlm.loss(params, {"tokens": tokens, "labels": labels}, lora=lora).backward()

        # our gradients, written under peft's key names by fnlm.lora.save itself
        grads = pytree.tree_map(lambda t: t.grad, lora)
        fnlm.lora.save(out, grads)
        ours = load_file(Path(out) / "adapter_model.safetensors")
    ref = {peft_key(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert ours.keys() == ref.keys()
    for key, g in ref.items():
        assert max_rel_error(ours[key], g) <= GRAD_REL_TOL, key
    assert all(not t.requires_grad for _, t in leaf_paths(params) if isinstance(t, torch.Tensor))


def test_saved_embedding_gets_peft_gradients_with_pad_row_frozen():
    """modules_to_save=embed: peft's copy is an nn.Embedding with padding_idx = pad_token_id."""
    config = _llama(pad_token_id=0, num_hidden_layers=1)
    s = dict(names=fnlm.lora.target_names(fnlm.models.config_from_hf(config.to_dict())),
             r=2, alpha=4, targets=["v"], rslora=False, bias="none", modules_to_save=["embed"],
             rank_pattern={}, alpha_pattern={})  # fmt: skip
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        peft_model = build_peft(model, s)
        randomize_peft(peft_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(out)
        lora = fnlm.lora.load(out, params)
    tokens = tokens_for(params.config)
    tokens[:, 1] = 0
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    fnlm.loss(params, {"tokens": tokens}, lora=lora).backward()
    ref = peft_model.base_model.model.model.embed_tokens.modules_to_save["default"].weight.grad
    assert not lora["embed"].grad[0].any()
    assert max_rel_error(lora["embed"].grad, ref) <= GRAD_REL_TOL


# ------------------------------------------------------------------------------------------
# (5) init: the same tensors as peft's with the same seed
# ------------------------------------------------------------------------------------------


@given(model_type=st.sampled_from(sorted(HF_CONFIGS)), data=st.data())
def test_init_equals_peft_init(model_type, data):
    config = data.draw(hf_configs(model_type))
    seed = data.draw(st.integers(0, 2**31 - 1))
    with saved_checkpoint(config) as (model, directory), tempfile.TemporaryDirectory() as out:
        params = load_fp32(directory)
        s = data.draw(lora_settings(fnlm.lora.target_names(params.config), peft_names=True))
        before = torch.random.get_rng_state()
        lora = fnlm.lora.init(
            params, s["r"], s["alpha"], [s["names"][t] for t in s["targets"]], bias=s["bias"],
            rslora=s["rslora"], seed=seed, modules_to_save=s["modules_to_save"],
            rank_pattern=s["rank_pattern"], alpha_pattern=s["alpha_pattern"],
        )  # fmt: skip
        assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
        fnlm.lora.save(out, lora)
        assert_saved_equals_peft(out, build_peft(model, s, seed=seed))
    for path, node in leaf_paths(lora):
        assert node.requires_grad, path
        if path[-1] == "b" and path[0] != "embed":
            assert not node.any(), path  # B starts at zero: the adapter is a no-op
        if path[-1] == "a" and path[0] != "embed":
            bound = 1 / math.sqrt(node.shape[1])  # kaiming-uniform(a=sqrt(5)) on [r, in]
            assert node.abs().max() <= bound


def test_init_scale_and_defaults():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, initializer_range=0.2,
    )  # fmt: skip
    with saved_checkpoint(config) as (_, directory):
        params = load_fp32(directory)
        lora = fnlm.lora.init(
            params, r=4, alpha=8, rslora=True, alpha_pattern={"layers.1.mlp.down": 2}
        )
        attached = fnlm.lora.attach(params, lora)
    assert set(lora["layers"][0]["attn"]) == {"q", "k", "v", "o"}
    assert set(lora["layers"][0]["mlp"]) == {"gate", "up", "down"}
    assert attached["layers"][0]["attn"]["q"].scale == pytest.approx(8 / math.sqrt(4))
    assert attached["layers"][1]["mlp"]["down"].scale == pytest.approx(2 / math.sqrt(4))
    assert attached["layers"][0]["mlp"]["down"].scale == pytest.approx(8 / math.sqrt(4))
    assert params["layers"][0]["attn"]["q"] is attached["layers"][0]["attn"]["q"].weight  # no copy


def test_dropout_only_in_training():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, initializer_range=0.2,
    )  # fmt: skip
    with saved_checkpoint(config) as (_, directory):
        params = load_fp32(directory)
        lora = randomize_fnlm(fnlm.lora.init(params, r=4, dropout=0.5))
        tokens = tokens_for(params.config)
        with torch.no_grad():
            eval_1 = fnlm.forward(params, tokens, lora=lora)
            eval_2 = fnlm.forward(params, tokens, lora=lora)
            train = fnlm.forward(params, tokens, lora=fnlm.lora.train_mode(lora))
    assert torch.equal(eval_1, eval_2)
    assert max_rel_error(train, eval_1) > 100 * FP32_REL_TOL


# ------------------------------------------------------------------------------------------
# (6) errors: an adapter onto the wrong base
# ------------------------------------------------------------------------------------------


def _llama(**changes):
    fields = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
    )  # fmt: skip
    return transformers.LlamaConfig(**{**fields, **changes})


def _saved_adapter(config, out, **init):
    with saved_checkpoint(config) as (_, directory):
        params = load_fp32(directory)
        fnlm.lora.save(out, randomize_fnlm(fnlm.lora.init(params, **init)), params=params)


def test_adapter_on_wrong_base_names_tensor_and_shapes():
    with tempfile.TemporaryDirectory() as out:
        _saved_adapter(_llama(), out, r=4, targets=("q", "down"))
        with saved_checkpoint(_llama(hidden_size=48)) as (_, directory):
            other = load_fp32(directory)
        with pytest.raises(LoraError, match=r"q_proj\.lora_A\.weight.*\(4, 32\).*\(48, 48\)"):
            fnlm.lora.load(out, other)
        with saved_checkpoint(_llama(num_hidden_layers=1)) as (_, directory):
            shallow = load_fp32(directory)
        with pytest.raises(LoraError, match=r"layers\.1\..*does not have"):
            fnlm.lora.load(out, shallow)
        with saved_checkpoint(_llama(intermediate_size=64)) as (_, directory):
            wider = load_fp32(directory)
        with pytest.raises(LoraError, match=r"down_proj\.lora_A\.weight.*\(4, 48\).*\(32, 64\)"):
            fnlm.lora.load(out, wider)


def test_adapter_with_other_embeddings_is_refused():
    with tempfile.TemporaryDirectory() as out:
        _saved_adapter(_llama(), out, r=2, targets=("embed",))
        with saved_checkpoint(_llama(), seed=7) as (_, directory):
            other = load_fp32(directory)  # same shapes, other weights
        with pytest.raises(LoraError, match=r"embed_tokens\.base_layer\.weight differs"):
            fnlm.lora.load(out, other)


def test_bad_adapter_files_and_arguments():
    with saved_checkpoint(_llama()) as (_, directory):
        params = load_fp32(directory)
    with tempfile.TemporaryDirectory() as out:
        with pytest.raises(LoraError, match="adapter_config.json does not exist"):
            fnlm.lora.load(out, params)
        fnlm.lora.save(out, fnlm.lora.init(params, r=2, targets=("v",)))
        doc = json.loads((Path(out) / "adapter_config.json").read_text())
        (Path(out) / "adapter_config.json").write_text(json.dumps({**doc, "use_dora": True}))
        with pytest.raises(LoraError, match="use_dora"):
            fnlm.lora.load(out, params)
        (Path(out) / "adapter_config.json").write_text(json.dumps({**doc, "r": 3}))
        with pytest.raises(LoraError, match=r"rank 2.*rank 3"):
            fnlm.lora.load(out, params)
        (Path(out) / "adapter_config.json").write_text(json.dumps(doc))
        weights = Path(out) / "adapter_model.safetensors"
        tensors = load_file(weights)
        key = next(k for k in tensors if "lora_B" in k)
        save_file({k: v for k, v in tensors.items() if k != key}, weights)
        with pytest.raises(
            LoraError, match=re.escape(key.replace("lora_B", "lora_A")) + ".*no lora_B"
        ):
            fnlm.lora.load(out, params)
    with pytest.raises(LoraError, match=r"targets \['qkv'\] match no module"):
        fnlm.lora.init(params, targets=("qkv",))
    with pytest.raises(LoraError, match="is a norm weight"):
        fnlm.lora.init(params, targets=("norm_attn",))
    with pytest.raises(ArgumentError, match="r must be a positive integer"):
        fnlm.lora.init(params, r=0)
    with pytest.raises(ArgumentError, match="bias must be one of"):
        fnlm.lora.init(params, bias="some")
    with saved_checkpoint(_llama(hidden_size=48)) as (_, directory):
        other = load_fp32(directory)
    with pytest.raises(LoraError, match=r"layers\.0\.attn\.q.*\(48, 48\)"):
        fnlm.forward(other, tokens_for(other.config), lora=fnlm.lora.init(params, r=2))


# ------------------------------------------------------------------------------------------
# (7) an NF4-quantized base: only adapter leaves require grad, forward and merge work
# ------------------------------------------------------------------------------------------

# NF4 dequantization is exact (same values on both sides); what differs is only the order of
# fp32 sums between the quantized linear and F.linear on the dequantized weight.
NF4_REL_TOL = 1e-4


def test_layer_checkpointing_over_nf4_linears_without_adapters():
    """Layer checkpointing recomputes NF4 linears that carry no adapter (targets q, v only): their
    backward reads its saved weight once (a second read raised CheckpointError), and the adapters'
    gradients equal those without checkpointing, bit for bit."""
    from fnlm import train

    config = _llama(hidden_size=64, intermediate_size=128)
    with saved_checkpoint(config) as (_, directory):
        qparams, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device="cpu")
    batch = {"tokens": tokens_for(qparams.config)}
    start = randomize_fnlm(fnlm.lora.init(qparams, r=4, targets=("q", "v")))
    grads = {}
    for mode in ("none", "layer"):
        lora = pytree.tree_map(lambda t: t.detach().clone().requires_grad_(), start)
        layer_fn = train.layer_function(mode, preserve_rng=False)
        fnlm.loss(qparams, batch, lora=lora, layer_fn=layer_fn).backward()
        grads[mode] = [t.grad for t in fnlm.lora.parameters(lora)]
    assert all(g.abs().sum() > 0 for g in grads["none"])
    assert all(torch.equal(a, b) for a, b in zip(grads["layer"], grads["none"], strict=True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_lora_on_nf4_base(device):
    """Adapters over an NF4 base: only they get gradients, and forward, gradients and merge equal
    those over the dequantized (dense) base."""
    from fnlm import quant

    config = _llama(hidden_size=64, intermediate_size=128)
    with saved_checkpoint(config) as (_, directory):
        qparams, _ = fnlm.load(directory, quant="nf4", dtype=torch.float32, device=device)
    assert quant.is_quantized(qparams["layers"][0]["attn"]["q"])
    dense = fnlm.params.tree_map(lambda t: t, qparams)
    for path, leaf in leaf_paths(qparams):
        if quant.is_quantized(leaf):
            fnlm.params.set_path(dense, path, quant.dequantize(leaf))
    lora = fnlm.lora.init(qparams, r=4, targets=fnlm.lora.ALL_LINEAR + ("lm_head",))
    lora = pytree.tree_map(lambda t: t.detach().to(device).requires_grad_(), randomize_fnlm(lora))
    twin = pytree.tree_map(lambda t: t.detach().clone().requires_grad_(), lora)
    batch = {"tokens": tokens_for(qparams.config).to(device)}

    fnlm.loss(qparams, batch, lora=lora).backward()
    fnlm.loss(dense, batch, lora=twin).backward()
    assert [t for t in pytree.tree_leaves(qparams) if t.requires_grad] == []
    for ours, ref in zip(fnlm.lora.parameters(lora), fnlm.lora.parameters(twin), strict=True):
        assert ours.grad is not None and ours.grad.abs().sum() > 0
        assert max_rel_error(ours.grad, ref.grad) <= GRAD_REL_TOL
    with torch.no_grad():
        ours = fnlm.forward(qparams, batch["tokens"], lora=lora)
        ref = fnlm.forward(dense, batch["tokens"], lora=lora)
        merged = fnlm.lora.merge(qparams, lora)
        assert not quant.is_quantized(get_path(merged, ("layers", 0, "mlp", "down")))
        from_merged = fnlm.forward(merged, batch["tokens"])
    assert max_rel_error(ours, ref) <= NF4_REL_TOL
    assert max_rel_error(from_merged, ours) <= NF4_REL_TOL
