"""StarCoder2: LayerNorm with bias, an ungated GELU MLP (c_fc, c_proj), biases on every linear
(use_bias), sliding window on every layer if set, tied head by default."""

from fnlm.config import ModelConfig
from fnlm.models import llama

MODEL_TYPES = ("starcoder2",)


def config_from_hf(hf: dict) -> ModelConfig:
    bias = bool(hf.get("use_bias", True))
    config = llama.translate(
        hf,
        activation="silu",
        norm_type="layer",
        norm_eps=float(hf.get("norm_epsilon", 1e-5)),
        mlp_gated=False,
        attention_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        sliding_window=hf.get("sliding_window"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )
    return config.replace(activation=hf.get("hidden_act", "gelu_pytorch_tanh"))


def weight_names(config: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    h, i = config.hidden_size, config.intermediate_size
    names = {k: v for k, v in llama.weight_names(config).items() if ".mlp." not in k}
    names["model.norm.bias"] = (("norm_bias",), (h,))
    for n in range(config.num_layers):
        pre = f"model.layers.{n}."
        layer = {
            "input_layernorm.bias": (("norm_attn_bias",), (h,)),
            "post_attention_layernorm.bias": (("norm_mlp_bias",), (h,)),
            "mlp.c_fc.weight": (("mlp", "up"), (i, h)),
            "mlp.c_proj.weight": (("mlp", "down"), (h, i)),
        }
        if config.mlp_bias:
            layer["mlp.c_fc.bias"] = (("mlp", "up_bias"), (i,))
            layer["mlp.c_proj.bias"] = (("mlp", "down_bias"), (h,))
        for name, (path, shape) in layer.items():
            names[pre + name] = (("layers", n, *path), shape)
    return names
