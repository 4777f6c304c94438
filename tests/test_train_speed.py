"""The training step's speed machinery keeps the math: CUDA-graph bookkeeping (static inputs,
in-place gradient accumulation, fallbacks) checked on a CPU by a capture that replays by calling
the step again, and the GPU path itself under `@pytest.mark.gpu`."""

from __future__ import annotations

import pytest
import torch
from models import saved_checkpoint
from test_train import load_fp32, random_data, tiny_config

from fnlm import lora as lora_lib
from fnlm import train as train_lib
from fnlm.errors import ArgumentError
from fnlm.loss import loss as model_loss
from fnlm.models import decoder, masks


def replaying_capture(fn, pool, stream):
    """A stand-in for CUDA graph capture: nothing runs at capture time (as on a GPU); each replay
    runs `fn` again on the same static inputs and writes its output into the captured tensor."""
    out = torch.zeros(())
    return (lambda: out.copy_(fn())), out, pool


def failing_capture(fn, pool, stream):
    raise RuntimeError("operation not permitted when stream is capturing")


def batches_of(data, config, steps):
    stream = train_lib.Stream(data, config, 0, torch.device("cpu"))
    position, out = {"epoch": 0, "index": 0}, []
    for _ in range(steps):
        batches, position = stream.take(position, config.grad_accum)
        out.append(batches)
    return out


def run_steps(params, config, steps, *, capture=None):
    lora = lora_lib.init(params, r=4, alpha=8, seed=0)
    named = [(str(i), t) for i, t in enumerate(lora_lib.parameters(lora))]
    tensors = [t for _, t in named]
    optimizer = train_lib.build_optimizer(named, lr=3e-3)
    scheduler = train_lib.build_scheduler(optimizer, schedule="constant", total_steps=steps)
    graphs = None
    if capture is not None:
        graphs = train_lib.StepGraphs(tensors, vocab_size=96, warmup=1, capture=capture)
    training = lora_lib.train_mode(lora)
    loss_fn = lambda b: model_loss(params, b, lora=training, reduction="sum")
    losses = [
        train_lib.train_step(loss_fn, batches, optimizer, scheduler, tensors, graphs=graphs)["loss"]
        for batches in steps
    ]
    return losses, [t.detach().clone() for t in tensors], graphs


def test_graphed_steps_equal_eager_steps():
    """Packed micro-batches, two a step: after the warm-up each batch shape is captured once and
    replayed with new data; losses and adapters equal the eager run bit for bit."""
    data = random_data(n=40)
    config = train_lib.TrainConfig(
        out="unused", batch_size=2, grad_accum=2, max_seq_length=32, packing=True,
        pad_to_multiple=32, progress=False,
    )  # fmt: skip
    steps = batches_of(data, config, 6)
    with saved_checkpoint(tiny_config()) as (_, directory):
        params = load_fp32(directory)
        eager_losses, eager_tensors, _ = run_steps(params, config, steps)
        graph_losses, graph_tensors, graphs = run_steps(
            params, config, steps, capture=replaying_capture
        )
    assert graphs.captured and graphs.failed is None
    assert graph_losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(graph_tensors, eager_tensors))


def test_a_failed_capture_falls_back_to_eager_once():
    data = random_data(n=16)
    config = train_lib.TrainConfig(out="unused", batch_size=2, grad_accum=1, max_seq_length=32,
                                   pad_to_multiple=32, progress=False)  # fmt: skip
    steps = batches_of(data, config, 4)
    with saved_checkpoint(tiny_config()) as (_, directory):
        params = load_fp32(directory)
        eager_losses, eager_tensors, _ = run_steps(params, config, steps)
        with pytest.warns(UserWarning, match="could not be captured as a CUDA graph"):
            losses, tensors, graphs = run_steps(params, config, steps, capture=failing_capture)
    assert graphs.failed.startswith("RuntimeError") and not graphs.captured
    assert losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(tensors, eager_tensors))


def test_graphed_step_checks_token_ids_before_replay():
    data = random_data(n=8)
    config = train_lib.TrainConfig(out="unused", batch_size=2, grad_accum=1, max_seq_length=32,
                                   pad_to_multiple=32, progress=False)  # fmt: skip
    steps = batches_of(data, config, 3)
    steps[2][0]["tokens"][0, 3] = 500  # outside the 96-token vocabulary
    with saved_checkpoint(tiny_config()) as (_, directory):
        params = load_fp32(directory)
        with pytest.raises(ArgumentError, match=r"token ids must lie in \[0, 96\).*500"):
            run_steps(params, config, steps, capture=replaying_capture)


def test_cuda_graphs_option_is_checked():
    config = train_lib.TrainConfig(out="unused", cuda_graphs=True)
    with pytest.raises(ArgumentError, match="cuda_graphs=True needs a CUDA device"):
        train_lib.setup.use_graphs(config, torch.device("cpu"), "none", False)
    assert not train_lib.setup.use_graphs(
        train_lib.TrainConfig(out="unused"), torch.device("cpu"), "none", False
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_training_on_gpu_equals_eager(tmp_path):
    """fnlm.train.train with CUDA graphs (the default on CUDA) and without: same losses within
    bf16 rounding of one step's replay (same kernels, same order: equal in practice)."""
    data = random_data(n=48, longest=60)
    with saved_checkpoint(tiny_config()) as (_, directory):
        results = {}
        for graphs in (False, True):
            params = load_fp32(directory)
            params = torch.utils._pytree.tree_map(
                lambda t: t.cuda() if isinstance(t, torch.Tensor) else t, params
            )
            config = train_lib.TrainConfig(
                out=str(tmp_path / str(graphs)), mode="lora", max_steps=8, batch_size=2,
                grad_accum=2, max_seq_length=64, progress=False, cuda_graphs=graphs, compile=False,
            )  # fmt: skip
            result = train_lib.train(config, params=params, data=data)
            results[graphs] = result.losses
    assert results[True] == pytest.approx(results[False], rel=1e-6)


# flex_attention over block masks against SDPA / eager attention over the dense mask, in fp64 so
# the comparison sees only the mask (both are exact up to summation order: ~1e-15 relative).
FP64_TOL = 1e-10


@pytest.mark.parametrize(
    "window, softcap, kv_heads", [(None, None, 2), (5, None, 4), (None, 50.0, 2), (7, 30.0, 1)]
)
def test_packed_attention_block_mask_equals_dense_mask(window, softcap, kv_heads):
    """The block mask stands for exactly the dense mask of `decoder.build_mask`; flex_attention
    under it equals attention under the dense mask (values on CPU: flex_attention has no CPU
    backward; gradients in the GPU test below)."""
    q, k, v, segments = (t.detach() for t in _packed_qkv(kv_heads, "cpu"))
    positions = torch.arange(q.shape[2]).expand(q.shape[0], -1)
    block = masks.document_mask(segments, window)
    reference_mask = decoder.build_mask(positions, None, segments, window)
    assert torch.equal(masks.dense(block), reference_mask)
    ours = masks.flex(q, k, v, block, scale=None, softcap=softcap)
    reference = _dense_attention(q, k, v, reference_mask, softcap)
    assert torch.allclose(ours, reference, rtol=FP64_TOL, atol=FP64_TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("window, softcap", [(None, None), (5, 50.0)])
def test_packed_attention_block_mask_gradients_on_gpu(window, softcap):
    q, k, v, segments = _packed_qkv(2, "cuda", dtype=torch.float32)
    positions = torch.arange(q.shape[2], device="cuda").expand(q.shape[0], -1)
    block = decoder.build_mask(positions, None, segments, window)
    assert isinstance(block, masks.BlockMask)
    reference_mask = masks.dense(block)
    flex = torch.compile(masks.flex)
    ours = flex(q, k, v, block, scale=None, softcap=softcap)
    reference = _dense_attention(q, k, v, reference_mask, softcap)
    grad = torch.randn_like(ours)
    for a, b in zip(
        torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(reference, (q, k, v), grad)
    ):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)  # fp32: summation order only


def _packed_qkv(kv_heads, device, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    batch, seq, heads, d = 2, 37, 4, 16  # flex_attention compiles for head_dim >= 16
    lengths = [[10, 20, 7], [37]]  # the second row: one document filling it
    segments = torch.zeros(batch, seq, dtype=torch.int64)
    for r, row in enumerate(lengths):
        at = 0
        for s, n in enumerate(row, start=1):
            segments[r, at : at + n] = s
            at += n
    make = lambda h: torch.randn(batch, h, seq, d, generator=g, dtype=dtype).to(device)
    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), segments.to(device)


def _dense_attention(q, k, v, mask, softcap):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_packed_rows_have_one_shape(strategy):
    """Either packing strategy gives the trainer one batch shape; wrapped rows are full (the
    epoch's last row aside, at most one token short where a one-token piece would be)."""
    data = random_data(n=40)
    config = train_lib.TrainConfig(out="unused", batch_size=2, grad_accum=1, max_seq_length=48,
                                   packing=True, packing_strategy=strategy, progress=False)  # fmt: skip
    batches = [b for step in batches_of(data, config, 8) for b in step]
    shapes = {train_lib.graphs.signature(b) for b in batches}
    assert shapes == {
        tuple((k, (2, 48), torch.int64) for k in ("labels", "positions", "segments", "tokens"))
    }
    filled = [int(n) for b in batches for n in (b["segments"] > 0).sum(1)]
    if strategy == "wrapped":
        assert sum(n < 47 for n in filled) <= 1, filled
    else:
        assert sum(n < 47 for n in filled) > 1, filled  # whole examples leave room this data wraps


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_packed_training_compiles_once(tmp_path, strategy):
    """A real packed run with the layer compiled (aot_eager, CPU): after the first step, no
    recompilation (one batch shape, block masks passed into the compiled layer)."""
    from torch._dynamo.utils import counters

    data = random_data(n=60, longest=40)
    with saved_checkpoint(tiny_config()) as (_, directory):
        params = load_fp32(directory)
        frames = []
        config = train_lib.TrainConfig(
            out=str(tmp_path / "run"), mode="lora", max_steps=6, batch_size=2, grad_accum=1,
            max_seq_length=64, packing=True, compile="aot_eager", progress=False, r=4,
            packing_strategy=strategy,
        )  # fmt: skip
        torch._dynamo.reset()
        counters.clear()
        callback = lambda entry: frames.append(sum(counters["stats"].values()))
        train_lib.train(config, params=params, data=data, callback=callback)
    assert counters["stats"]["unique_graphs"] >= 1
    assert frames[1:] == [frames[0]] * (len(frames) - 1), frames


@pytest.mark.parametrize("checkpointing", ["layer", "offload"])
def test_keep_layers_recomputes_fewer_layers_with_the_same_gradients(checkpointing, monkeypatch):
    """keep_layers=k: the last k layers keep their activations (run once), the others are
    recomputed in the backward; loss and adapter gradients equal every-layer checkpointing."""
    from fnlm.models import decoder as decoder_module

    runs = []
    original = decoder_module.layer_forward

    def counting(*args, **kwargs):
        runs.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_lib.layers.decoder, "layer_forward", counting)
    data = random_data(n=8)
    batch = data_lib_collate(data)
    with saved_checkpoint(tiny_config()) as (_, directory):
        params = load_fp32(directory)
        results = {}
        for keep in (0, 1, 2):
            lora = lora_lib.init(params, r=4, alpha=8, seed=0)
            layer_fn = train_lib.layer_function(checkpointing, keep_layers=keep)
            runs.clear()
            loss = model_loss(params, batch, lora=lora_lib.train_mode(lora), layer_fn=layer_fn)
            loss.backward()
            grads = [t.grad.clone() for t in lora_lib.parameters(lora)]
            results[keep] = (float(loss), grads, len(runs))
    layers = tiny_config().num_hidden_layers
    assert [results[k][2] for k in (0, 1, 2)] == [2 * layers, 2 * layers - 1, layers]
    for keep in (1, 2):
        assert results[keep][0] == results[0][0]
        assert all(torch.equal(a, b) for a, b in zip(results[keep][1], results[0][1]))


def data_lib_collate(data):
    from fnlm import data as data_lib

    return data_lib.collate_padded(data.examples[:2], pad_id=0)
