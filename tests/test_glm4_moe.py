"""GLM-4.5 / GLM-4.6 (`glm4_moe`) against transformers (+ peft): DeepSeek-V3's sigmoid router with
its correction bias and group-limited top-k (fnlm.models.moe.sigmoid_topk) against transformers'
Glm4MoeTopkRouter, then the shared per-family checks (tests/family_checks.py) on hypothesis-drawn
tiny configs: logits with left padding, greedy generation, LoRA on attention and the expert
stacks against peft, training, merged export, NF4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

from fnlm.config import ModelConfig
from fnlm.errors import ConfigError
from fnlm.models import moe

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

EXAMPLES = settings(max_examples=3, deadline=None)
# the pytest ids name the family, so scripts/support_table.py counts these tests for glm4_moe
GLM4_MOE = pytest.mark.parametrize("model_type", ["glm4_moe"])


@st.composite
def router_cases(draw) -> dict:
    """A router's sizes: experts in groups (one group too), the groups kept, k within them."""
    groups = draw(st.sampled_from([1, 2, 4]))
    experts = groups * draw(st.integers(2, 4))
    kept = draw(st.integers(1, groups))
    return dict(
        n_routed_experts=experts,
        n_group=groups,
        topk_group=kept,
        num_experts_per_tok=draw(st.integers(1, kept * experts // groups)),
        norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        hidden_size=draw(st.sampled_from([8, 16])),
    )


def router_config(case: dict) -> ModelConfig:
    return ModelConfig(
        model_type="glm4_moe", vocab_size=8, hidden_size=case["hidden_size"],
        intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
        num_experts=case["n_routed_experts"], experts_per_token=case["num_experts_per_tok"],
        moe_renormalize=case["norm_topk_prob"], moe_scoring="sigmoid",
        moe_groups=case["n_group"], moe_topk_groups=case["topk_group"],
        moe_routed_scale=case["routed_scaling_factor"],
    )  # fmt: skip


def dense_weights(route: moe.Route, tokens: int) -> torch.Tensor:
    """A Route's weights as a [tokens, experts] matrix (0 where a token did not choose)."""
    expert = torch.bucketize(torch.arange(route.tokens.shape[0]), route.offsets, right=True)
    out = torch.zeros(tokens, route.experts, dtype=route.weights.dtype)
    out[route.tokens, expert] = route.weights
    return out


@GLM4_MOE
@settings(max_examples=20, deadline=None)
@given(case=router_cases(), seed=st.integers(0, 2**16))
def test_sigmoid_router_matches_transformers_glm4_moe(model_type, case, seed):
    """moe.route with sigmoid scoring chooses the experts transformers' Glm4MoeTopkRouter (the
    same code as DeepSeek-V3's) chooses, with its weights (fp32, 1e-6 relative): random logits and
    a random correction bias large enough to change the choice."""
    g = torch.Generator().manual_seed(seed)
    router = Glm4MoeTopkRouter(transformers.Glm4MoeConfig(**case))
    with torch.no_grad():
        router.weight.normal_(0, 1, generator=g)
        router.e_score_correction_bias.normal_(0, 0.5, generator=g)
    x = torch.randn(7, case["hidden_size"], generator=g)
    with torch.no_grad():
        _, ref_weights, ref_chosen = router(x)
    ref = torch.zeros(7, case["n_routed_experts"]).scatter_(1, ref_chosen, ref_weights)
    config = router_config(case)
    logits = F.linear(x, router.weight)
    route = moe.route(config, logits, torch.float32, correction=router.e_score_correction_bias)
    ours = dense_weights(route, 7)
    assert torch.equal(ours != 0, ref != 0)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)


@GLM4_MOE
def test_sigmoid_router_compiles_without_host_reads_glm4_moe(model_type):
    """The grouped choice is device ops only: it traces as one graph (fullgraph=True), as a CUDA
    graph capture of a decode step needs, with eager's result."""
    case = dict(
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=True,
        routed_scaling_factor=2.0, hidden_size=8,
    )  # fmt: skip
    config = router_config(case)
    logits, correction = torch.randn(5, 8), torch.randn(8)

    def weights(logits, correction):
        route = moe.route(config, logits, torch.float32, correction=correction)
        return route.weights, route.tokens, route.offsets

    compiled = torch.compile(weights, fullgraph=True, backend="aot_eager")
    for ours, ref in zip(compiled(logits, correction), weights(logits, correction), strict=True):
        assert torch.equal(ours, ref)


@GLM4_MOE
def test_router_groups_are_checked_glm4_moe(model_type):
    case = dict(
        n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3, norm_topk_prob=True,
        routed_scaling_factor=1.0, hidden_size=8,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="topk_group"):  # one group of two for three experts
        router_config(case)
    with pytest.raises(ConfigError, match="n_group"):
        router_config({**case, "n_group": 3, "topk_group": 2})
    with pytest.raises(ConfigError, match="sigmoid"):
        router_config({**case, "topk_group": 2}).replace(moe_scoring="softmax")
