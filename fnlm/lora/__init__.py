"""LoRA adapters as a second pytree over the params, PEFT-compatible both ways.

    lora = fnlm.lora.init(params, r=16, alpha=16, targets=fnlm.lora.ALL_LINEAR, seed=3407)
    logits = fnlm.forward(params, tokens, lora=lora)         # adapters applied unmerged
    loss = fnlm.loss(params, batch, lora=fnlm.lora.train_mode(lora))   # dropout on
    fnlm.lora.save("out/adapter", lora)                      # PEFT's adapter_config.json + safetensors
    lora = fnlm.lora.load("out/adapter", params)              # or any adapter PEFT wrote
    merged = fnlm.lora.merge(params, lora)                    # plain 16-bit params

A `Lora` holds, at the same paths as the params leaves they adapt:

    lora["layers"][i]["attn"]["q"] = {"a": [r, in], "b": [out, r]}     # adapted linear
    lora["embed"] = {"a": [r, vocab], "b": [hidden, r]}                # PEFT's lora_embedding_A/B
    lora["lm_head"] = tensor                                            # modules_to_save: a full copy
    lora["layers"][i]["attn"]["q_bias"] = tensor                        # bias="all" / "lora_only"
    lora["layers"][i]["mlp"]["experts"]["gate_up"] = {"a": [E, r, in], "b": [E, out, r]}  # MoE
    lora["layers"][i]["mlp"]["router"] = {"a": [r, hidden], "b": [experts, r]}

Mixture-of-experts layers are adapted as peft 0.21 adapts transformers 5's fused experts
(`target_parameters`, peft's `ParamWrapper`): one low-rank pair per expert for each stack
("gate_up", "down"; see fnlm.models.moe), applied by a `LoraExperts` leaf, saved in peft's layout
(lora_A [E·r, in], lora_B [out, r·E], nested wrappers when both stacks of a layer are adapted).
Which targets reach the experts follows peft: see `fnlm.lora.targets.select`.

Its leaves are the only tensors that require grad; the base params stay frozen (and quantized).
`attach(params, lora)` swaps each adapted leaf for a `LoraLinear` / `LoraEmbedding` /
`LoraExperts` that the decoder calls through `.linear` / `.embedding` / `.expert_matmul`, and
replaced leaves for the lora's copies; `with_adapters` is how forward, loss and generate call it.

The package, bottom up: tree (Lora, LoraConfig), linear (the fused LoRA op), leaves (adapted
leaves), targets (module table, PEFT's target rules), initial (`init`), combine (`attach`,
`merge`, `with_adapters`), peft_format / peft_save / peft_load (adapter files both ways), legacy
(transformers-4 per-expert adapters).
"""

from fnlm.lora.combine import attach, merge, with_adapters
from fnlm.lora.initial import init
from fnlm.lora.leaves import LoraEmbedding, LoraExperts, LoraLinear, SavedEmbedding
from fnlm.lora.peft_format import CONFIG_FILE, LEGACY_WEIGHTS_FILE, PEFT_PREFIX, WEIGHTS_FILE
from fnlm.lora.peft_load import load
from fnlm.lora.peft_save import save
from fnlm.lora.targets import ALL_LINEAR_SHORTHAND, target_names
from fnlm.lora.tree import ALL_LINEAR, BIAS_MODES, Lora, LoraConfig, parameters, train_mode

__all__ = [
    "ALL_LINEAR",
    "ALL_LINEAR_SHORTHAND",
    "BIAS_MODES",
    "CONFIG_FILE",
    "LEGACY_WEIGHTS_FILE",
    "PEFT_PREFIX",
    "WEIGHTS_FILE",
    "Lora",
    "LoraConfig",
    "LoraEmbedding",
    "LoraExperts",
    "LoraLinear",
    "SavedEmbedding",
    "attach",
    "init",
    "load",
    "merge",
    "parameters",
    "save",
    "target_names",
    "train_mode",
    "with_adapters",
]
