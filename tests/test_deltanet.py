"""The gated delta rule (fnlm.kernels.deltanet): the chunked form equals the token-by-token
recurrence, values and gradients, in the torch path and with the Triton scan (interpreter on CPU);
the torch paths equal transformers' torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule
(the reference transformers runs without flash-linear-attention)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

from fnlm import kernels
from fnlm.errors import ArgumentError, ConfigError
from fnlm.kernels import deltanet, deltanet_split
from fnlm.models import qwen3_5

pytestmark = pytest.mark.filterwarnings("ignore:.*flash-linear-attention")

# fp32 throughout: the chunked form reassociates the recurrence's sums (triangular solves instead
# of sequential updates); measured errors are ~4e-7 (values) and ~2e-6 (gradients) of the largest
# magnitude at these sizes, so 1e-5 relative to the largest value is a tight bound.
FP32_REL_TOL = 1e-5

needs_interpreter = pytest.mark.skipif(
    not kernels.HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton scan on CPU needs TRITON_INTERPRET=1 (set by tests/conftest.py)",
)


@st.composite
def problems(draw, max_seq=40):
    """Inputs of one gated-delta-rule call, small shapes, with or without an initial state."""
    b, t = draw(st.integers(1, 2)), draw(st.integers(1, max_seq))
    hk = draw(st.sampled_from([1, 2]))
    hv = hk * draw(st.sampled_from([1, 2]))
    dk, dv = draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([4, 8, 24]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q, k = torch.randn(b, t, hk, dk, generator=g), torch.randn(b, t, hk, dk, generator=g)
    v = torch.randn(b, t, hv, dv, generator=g)
    decay = -torch.rand(b, t, hv, generator=g) * draw(st.sampled_from([0.1, 3.0]))
    beta = torch.rand(b, t, hv, generator=g)
    state = torch.randn(b, hv, dk, dv, generator=g) if draw(st.booleans()) else None
    return q, k, v, decay, beta, state


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def values_and_grads(fn, inputs):
    """(o, final state, gradients of every input) under a fixed random projection of both outputs."""
    leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
    o, s = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=g)).sum() + (
        s * torch.randn(s.shape, generator=g)
    ).sum()
    loss.backward()
    return o.detach(), s.detach(), [None if x is None else x.grad for x in leaves]


def assert_same(ours, ref):
    for a, b in zip(ours[:2], ref[:2], strict=True):
        assert rel_error(a, b) <= FP32_REL_TOL
    for a, b in zip(ours[2], ref[2], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_error(a, b) <= FP32_REL_TOL


def chunked(chunk, triton_scan, split=False):
    def run(*inputs, reset=None):
        return deltanet.gated_delta_rule_chunked(
            *inputs, chunk=chunk, triton_scan=triton_scan, split=split, reset=reset
        )

    return run


@settings(max_examples=6, deadline=None)
@given(inputs=problems(), chunk=st.sampled_from([4, 16, 64]))
def test_torch_chunked_equals_recurrent(inputs, chunk):
    ref = values_and_grads(deltanet.gated_delta_rule_recurrent, inputs)
    assert_same(values_and_grads(chunked(chunk, False), inputs), ref)


@needs_interpreter
@settings(max_examples=4, deadline=None)
@given(inputs=problems(max_seq=36), chunk=st.sampled_from([16, 32]))
def test_triton_scan_equals_recurrent(inputs, chunk):
    """Forward (the scan kernel) and backward (the reverse-scan kernel) under the interpreter."""
    ref = values_and_grads(deltanet.gated_delta_rule_recurrent, inputs)
    assert_same(values_and_grads(chunked(chunk, True), inputs), ref)


@needs_interpreter
@settings(max_examples=4, deadline=None)
@given(inputs=problems(max_seq=36), chunk=st.sampled_from([16, 32]))
def test_split_scan_equals_recurrent(inputs, chunk):
    """The split scan (fnlm.kernels.deltanet_split: the recurrence-only Triton loops, forward and
    reverse, interpreter; the outputs and the other gradients batched in torch) == recurrence."""
    ref = values_and_grads(deltanet.gated_delta_rule_recurrent, inputs)
    assert_same(values_and_grads(chunked(chunk, True, split=True), inputs), ref)


@needs_interpreter
@settings(max_examples=3, deadline=None)
@given(inputs=problems(max_seq=36), chunk=st.sampled_from([16, 32]))
def test_split_loop_equals_its_reference(inputs, chunk):
    """The split scan's Triton loop (v_new, states, final; and through autograd every input's
    gradient) == its torch loop `state_scan_reference` on the chunked rule's prepared inputs."""
    q, k, v, decay, beta, state = inputs
    parts = deltanet.chunk_prepare(*deltanet.heads_first(q, k, v, decay, beta, True), chunk, None)
    b, h, dk, dv = q.shape[0], v.shape[2], q.shape[-1], v.shape[-1]
    s0 = torch.zeros(b * h, dk, dv) if state is None else state.reshape(b * h, dk, dv)
    loop_inputs = (parts[0], parts[1], parts[3], parts[5], s0)

    def run(loop):
        leaves = [x.detach().clone().requires_grad_() for x in loop_inputs]
        outputs = loop(*(x.contiguous() for x in leaves))
        g = torch.Generator().manual_seed(2)
        sum((t * torch.randn(t.shape, generator=g)).sum() for t in outputs).backward()
        return [t.detach() for t in outputs], [x.grad for x in leaves]

    ours, ref = run(deltanet_split.state_scan_op), run(deltanet_split.state_scan_reference)
    for a, b_ in zip(ours[0] + ours[1], ref[0] + ref[1], strict=True):
        assert rel_error(a, b_) <= FP32_REL_TOL


@settings(max_examples=4, deadline=None)
@given(inputs=problems(), chunk=st.sampled_from([8, 64]))
def test_torch_paths_equal_transformers(inputs, chunk):
    """fnlm's torch paths are transformers' fallbacks: equal up to fp32 rounding."""
    q, k, v, decay, beta, state = inputs
    kwargs = dict(initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ref_o, ref_s = hf.torch_chunk_gated_delta_rule(q, k, v, decay, beta, chunk_size=chunk, **kwargs)
    o, s = deltanet.gated_delta_rule_chunked(q, k, v, decay, beta, state, chunk=chunk)
    assert torch.equal(o, ref_o) and torch.equal(s, ref_s)
    ref_o, ref_s = hf.torch_recurrent_gated_delta_rule(q, k, v, decay, beta, **kwargs)
    o, s = deltanet.gated_delta_rule_recurrent(q, k, v, decay, beta, state)
    assert rel_error(o, ref_o) <= FP32_REL_TOL and rel_error(s, ref_s) <= FP32_REL_TOL


def test_door_checks_shapes():
    q = torch.randn(1, 5, 2, 8)
    v = torch.randn(1, 5, 3, 8)  # 3 value heads for 2 key heads
    with pytest.raises(ArgumentError, match="hv a multiple of hk"):
        kernels.gated_delta_rule(q, q, v, torch.zeros(1, 5, 3), torch.zeros(1, 5, 3))
    v, g = torch.randn(1, 5, 2, 8), torch.zeros(1, 5, 2)
    with pytest.raises(ArgumentError, match="reset bool"):
        kernels.gated_delta_rule(q, q, v, g, g, reset=torch.zeros(1, 5))  # not bool


@needs_interpreter
def test_scan_backend_picks_the_scan(monkeypatch):
    """SCAN_BACKEND "torch" runs the torch loop where the Triton scan would run (the door's
    result then equals the torch path's bit for bit), "triton" the fused kernel, "split" the
    split scan's loop; anything else is refused naming FNLM_DELTANET_SCAN."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 20, 2, 8, generator=g) for _ in range(3))
    decay, beta = -torch.rand(1, 20, 2, generator=g), torch.rand(1, 20, 2, generator=g)
    state = torch.randn(1, 2, 8, 8, generator=g)
    launched = []
    scan = deltanet.chunk_scan_op
    monkeypatch.setattr(deltanet, "chunk_scan_op", lambda *a: launched.append(1) or scan(*a))
    with kernels.kernel_backend("triton"):
        monkeypatch.setattr(deltanet, "SCAN_BACKEND", "torch")
        o, s = kernels.gated_delta_rule(q, k, v, decay, beta, state, chunk=16)
        assert not launched
        ref_o, ref_s = deltanet.gated_delta_rule_chunked(q, k, v, decay, beta, state, chunk=16)
        assert torch.equal(o, ref_o) and torch.equal(s, ref_s)
        monkeypatch.setattr(deltanet, "SCAN_BACKEND", "triton")
        kernels.gated_delta_rule(q, k, v, decay, beta, state, chunk=16)
        assert launched
        looped = []
        loop = deltanet_split.state_scan_op
        monkeypatch.setattr(
            deltanet_split, "state_scan_op", lambda *a: looped.append(1) or loop(*a)
        )
        monkeypatch.setattr(deltanet, "SCAN_BACKEND", "split")
        o, s = kernels.gated_delta_rule(q, k, v, decay, beta, state, chunk=16)
        assert looped and len(launched) == 1
        assert rel_error(o, ref_o) <= FP32_REL_TOL and rel_error(s, ref_s) <= FP32_REL_TOL
        monkeypatch.setattr(deltanet, "SCAN_BACKEND", "cuda")
        with pytest.raises(ArgumentError, match="FNLM_DELTANET_SCAN.*'cuda'"):
            kernels.gated_delta_rule(q, k, v, decay, beta, state, chunk=16)


def test_config_checks_linear_attention_sizes():
    """A Qwen3.5 config whose value heads are not a multiple of its key heads (or with a size 0)
    fails when translated, naming the config.json fields, not at the first forward."""
    hf = dict(
        model_type="qwen3_5_text", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
    )  # fmt: skip
    assert qwen3_5.config_from_hf(hf).linear_attention == (2, 4, 8, 8, 4)
    with pytest.raises(ConfigError, match=r"linear_num_value_heads \(3\) must be a multiple"):
        qwen3_5.config_from_hf({**hf, "linear_num_value_heads": 3})
    with pytest.raises(ConfigError, match="linear_conv_kernel_dim must be positive"):
        qwen3_5.config_from_hf({**hf, "linear_conv_kernel_dim": 0})


# ----------------------------------------------------------------------------------------------
# Packed rows: `reset` zeroes the state at document starts, inside the computation
# ----------------------------------------------------------------------------------------------


@st.composite
def resets(draw, shape):
    """[batch, seq] bool document starts: several per row, some in one chunk, some runs longer
    than a chunk; the first token a start or not (then it continues the initial state)."""
    rows = []
    for _ in range(shape[0]):
        row = draw(st.lists(st.booleans(), min_size=shape[1], max_size=shape[1]))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(shape)


def documents_alone(inputs, reset):
    """The recurrence run on each document alone (from a zero state; the first run of a row from
    the initial state when the row does not start with a reset): (o, final state of each row)."""
    q, k, v, decay, beta, state = inputs
    outs, finals = [], []
    for r in range(q.shape[0]):
        starts = [0, *(i for i in range(1, q.shape[1]) if reset[r, i]), q.shape[1]]
        s0 = None if state is None or reset[r, 0] else state[r : r + 1]
        pieces = []
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            o, s = deltanet.gated_delta_rule_recurrent(
                *(x[r : r + 1, a:b] for x in (q, k, v, decay, beta)), s0
            )
            pieces.append(o)
            s0 = None
        outs.append(torch.cat(pieces, dim=1))
        finals.append(s)
    return torch.cat(outs), torch.cat(finals)


def with_reset(fn, reset):
    return lambda *inputs: fn(*inputs, reset=reset)


@settings(max_examples=8, deadline=None)
@given(data=st.data(), inputs=problems(), chunk=st.sampled_from([4, 8, 64]))
def test_reset_equals_documents_alone(data, inputs, chunk):
    """Recurrence with reset == each document alone (values, final state); torch chunked with
    reset == recurrence with reset (values and gradients), all within FP32_REL_TOL."""
    reset = data.draw(resets(inputs[0].shape[:2]))
    ref = values_and_grads(with_reset(deltanet.gated_delta_rule_recurrent, reset), inputs)
    alone = documents_alone(inputs, reset)
    assert rel_error(ref[0], alone[0]) <= FP32_REL_TOL
    assert rel_error(ref[1], alone[1]) <= FP32_REL_TOL
    ours = values_and_grads(with_reset(chunked(chunk, False), reset), inputs)
    assert_same(ours, ref)


@needs_interpreter
@settings(max_examples=3, deadline=None)
@given(data=st.data(), inputs=problems(max_seq=36), chunk=st.sampled_from([16, 32]))
def test_triton_scan_with_reset_equals_recurrent(data, inputs, chunk):
    """The reset lives in chunk_prepare (gamma = 0, masked Qd / W / Kd rows); the Triton scan
    kernels (forward and reverse scan, interpreter) carry it unchanged: == recurrence with reset."""
    reset = data.draw(resets(inputs[0].shape[:2]))
    ref = values_and_grads(with_reset(deltanet.gated_delta_rule_recurrent, reset), inputs)
    assert_same(values_and_grads(with_reset(chunked(chunk, True), reset), inputs), ref)
    split = chunked(chunk, True, split=True)  # the split scan carries it unchanged too
    assert_same(values_and_grads(with_reset(split, reset), inputs), ref)


def test_reset_compiles_without_graph_breaks():
    """The chunked rule with reset has no host read nor data-dependent shape: it compiles as one
    graph (fullgraph, aot_eager), forward and backward, with eager's values and gradients."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 37, 2, 8, generator=g), torch.randn(2, 37, 2, 8, generator=g)
    v = torch.randn(2, 37, 2, 16, generator=g)
    decay, beta = -torch.rand(2, 37, 2, generator=g), torch.rand(2, 37, 2, generator=g)
    reset = torch.rand(2, 37, generator=g) < 0.2
    inputs = (q, k, v, decay, beta, None)
    ref = values_and_grads(with_reset(chunked(16, False), reset), inputs)
    compiled = torch.compile(chunked(16, False), fullgraph=True, backend="aot_eager")
    assert_same(values_and_grads(with_reset(compiled, reset), inputs), ref)


@needs_interpreter
def test_split_scan_compiles_without_graph_breaks():
    """The split scan's custom ops (their fake shapes, their autograd) inside one compiled graph
    (fullgraph, aot_eager), with document resets: eager's values and gradients."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 40, 2, 16, generator=g), torch.randn(1, 40, 2, 16, generator=g)
    v = torch.randn(1, 40, 2, 24, generator=g)
    decay, beta = -torch.rand(1, 40, 2, generator=g), torch.rand(1, 40, 2, generator=g)
    reset = torch.rand(1, 40, generator=g) < 0.1
    inputs = (q, k, v, decay, beta, torch.randn(1, 2, 16, 24, generator=g))
    ref = values_and_grads(with_reset(chunked(16, True, split=True), reset), inputs)
    compiled = torch.compile(chunked(16, True, split=True), fullgraph=True, backend="aot_eager")
    assert_same(values_and_grads(with_reset(compiled, reset), inputs), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(
    "shape", [(1, 37, 2, 4, 16, 24, 16), (2, 300, 4, 8, 128, 128, 64), (1, 1000, 2, 4, 64, 128, 64)]
)
def test_triton_scan_on_cuda_equals_recurrent(shape, split):
    """The compiled Triton scan on the GPU (forward and reverse kernels, ieee fp32 dots; fused, or
    the split scan's loops) against the recurrence on the CPU: Qwen3.5's head sizes (128) and its
    chunk (64), plus a ragged tail."""
    b, t, hk, hv, dk, dv, chunk = shape
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(b, t, hk, dk, generator=g), torch.randn(b, t, hk, dk, generator=g)
    v = torch.randn(b, t, hv, dv, generator=g)
    decay = -torch.rand(b, t, hv, generator=g) * 0.5
    beta = torch.rand(b, t, hv, generator=g)
    state = torch.randn(b, hv, dk, dv, generator=g)
    inputs = (q, k, v, decay, beta, state)
    ref = values_and_grads(deltanet.gated_delta_rule_recurrent, inputs)

    def on_cuda(*xs):
        o, s = chunked(chunk, True, split=split)(*(x.cuda() for x in xs))
        return o.cpu(), s.cpu()

    ours = values_and_grads(on_cuda, inputs)
    assert_same(ours, ref)


def test_resource_script_reads_the_scans_cubins():
    """scripts/deltanet_resources.py cross-compiles both scans for sm_90 here and reads their
    registers and stack from the cubins (small tiles: a quick compile; its own process, where the
    kernels are compiled, not interpreted); the precision is the kernels' constexpr, so "ieee"
    (what fnlm runs) and a tensor-core one both build."""
    assert deltanet.SCAN_PRECISION == "ieee"
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "deltanet_resources.py"), "--precision",
         "ieee,tf32", "--warps", "4", "--bv", "16", "--chunk", "16", "--dk", "16"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if "STACK:" in line]
    assert len(rows) == 8, done.stdout  # 4 kernels (fused and split scans) x 2 precisions
    assert all("REG:" in row and "shared" in row for row in rows)
