"""The layer function a training loss runs: activation checkpointing (torch's, or with the saved
input offloaded to pinned CPU memory), torch.compile of the layer, MLP tiling."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint

from fnlm.errors import ArgumentError
from fnlm.models import decoder


class _OffloadedCheckpoint(torch.autograd.Function):
    """Activation checkpointing whose one saved tensor, the layer input, waits in pinned CPU memory.

    Forward runs the layer without a graph and copies its input to the host on a side stream (the
    copy overlaps the layer's compute; the compute stream waits for it at the end of the layer, so
    the input's memory is reused only after it has been read); backward brings it back, reruns the
    layer (with the forward's RNG state when `preserve_rng`) and backpropagates through it. The
    gradients of the tensors the layer closes over (adapters, or weights in full fine-tuning)
    accumulate through that inner backward, which is why this runs under `.backward()` (not
    `torch.autograd.grad`), like reentrant checkpointing. Every stream fork joins back and no host
    sync or RNG read happens without `preserve_rng`, so the step can be captured as a CUDA graph.
    What Unsloth calls use_gradient_checkpointing="unsloth".
    """

    @staticmethod
    def forward(ctx, run, slot, x, anchor, preserve_rng):
        ctx.run, ctx.device = run, x.device
        ctx.cpu_rng = torch.get_rng_state() if preserve_rng else None
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if preserve_rng and x.is_cuda else None
        if x.is_cuda:
            host = _pinned_buffer(slot, x)
            compute, stream = torch.cuda.current_stream(x.device), _side_stream(x.device)
            stream.wait_stream(compute)
            with torch.cuda.stream(stream):
                host.copy_(x, non_blocking=True)
            with torch.no_grad():
                y = run(x)
            compute.wait_stream(stream)  # x is read before anything may reuse its memory
        else:
            host = x.detach()
            with torch.no_grad():
                y = run(x)
        ctx.host = host
        return y

    @staticmethod
    def backward(ctx, grad):
        x = ctx.host.to(ctx.device, non_blocking=True) if ctx.device.type == "cuda" else ctx.host
        x = x.detach().requires_grad_(True)
        if ctx.cpu_rng is None:
            with torch.enable_grad():
                y = ctx.run(x)
        else:
            devices = [ctx.device] if ctx.cuda_rng is not None else []
            with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
                torch.set_rng_state(ctx.cpu_rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
                with torch.enable_grad():
                    y = ctx.run(x)
        torch.autograd.backward(y, grad)
        ctx.host = None
        return None, None, x.grad, None, None


_PINNED: dict[tuple, torch.Tensor] = {}
_STREAMS: dict[torch.device, Any] = {}


def _pinned_buffer(slot: int, x: torch.Tensor) -> torch.Tensor:
    """One reusable pinned host buffer per layer slot (pinning allocations are slow)."""
    key = (slot, tuple(x.shape), x.dtype)
    if key not in _PINNED:
        for old in [k for k in _PINNED if k[0] == slot]:
            del _PINNED[old]
        _PINNED[key] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return _PINNED[key]


def _side_stream(device: torch.device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def tiled_layer_forward(config, p, x, cos, sin, mask, *, chunk: int, preserve_rng: bool = True):
    """`decoder.layer_forward` with the MLP run over `chunk`-token pieces of the sequence, each
    checkpointed, so only one piece's MLP activations ([chunk, intermediate]) are alive at a time.
    The MLP is token-wise, so the result is the same; parallel blocks fall back to the plain layer."""
    if config.parallel_block or x.shape[1] <= chunk:
        return decoder.layer_forward(config, p, x, cos, sin, mask)
    attn = decoder.attention(
        config, p["attn"], decoder.block_input(config, p, "norm_attn", x), cos, sin, mask
    )
    x = x + decoder.block_output(config, p, "norm_attn", attn)

    def mlp_piece(piece):
        out = decoder.mlp(config, p["mlp"], decoder.block_input(config, p, "norm_mlp", piece))
        return piece + decoder.block_output(config, p, "norm_mlp", out)

    pieces = [
        torch.utils.checkpoint.checkpoint(
            mlp_piece, piece, use_reentrant=False, preserve_rng_state=preserve_rng
        )
        if torch.is_grad_enabled()
        else mlp_piece(piece)
        for piece in x.split(chunk, dim=1)
    ]
    return torch.cat(pieces, dim=1)


def layer_function(
    checkpointing: str = "none",
    *,
    compile: bool | str = False,
    mlp_chunk: int = 0,
    preserve_rng: bool = True,
    keep_layers: int = 0,
) -> Callable:
    """The `layer_fn` for `fnlm.loss`: decoder.layer_forward, optionally MLP-tiled, compiled and
    checkpointed.

    checkpointing: "none" (keep all activations), "layer" (keep each layer's input, recompute the
    layer in backward; torch's non-reentrant checkpoint) or "offload" (as "layer", with the input
    kept in pinned CPU memory, copied on a side stream).
    compile: torch.compile the layer (one graph reused by every layer of the same shapes); a
    string names the compile backend (e.g. "aot_eager" for tests on CPU).
    mlp_chunk: > 0 tiles the MLP along the sequence (see `tiled_layer_forward`).
    preserve_rng: "layer" / "offload" recompute with the forward's RNG state (needed for dropout
    only; off, the step can be captured as a CUDA graph, where reading the RNG state is not allowed).
    keep_layers: with "layer" / "offload", the last this many layers of each forward are not
    checkpointed: their activations stay, so the backward recomputes fewer layers (the knob
    between "layer" and "none").
    The result's `wrap(fn)` applies the same checkpointing to a family's own layer function (see
    `_checkpointed`; compile, MLP tiles and keep_layers are decoder.layer_forward's only).
    """
    if checkpointing not in ("none", "layer", "offload"):
        raise ArgumentError(
            f"checkpointing must be 'none', 'layer' or 'offload', got {checkpointing!r}"
        )
    inner = decoder.layer_forward
    if mlp_chunk:

        def inner(config, p, x, cos, sin, mask):
            return tiled_layer_forward(
                config, p, x, cos, sin, mask, chunk=mlp_chunk, preserve_rng=preserve_rng
            )

    if compile:
        backend = compile if isinstance(compile, str) else "inductor"
        # Shapes vary with packing / padding: after the first change the length becomes symbolic.
        inner = torch.compile(inner, backend=backend)
    if checkpointing == "none":

        def plain(config, p, x, cos, sin, mask):
            return inner(config, p, x, cos, sin, mask)

        plain.wrap = lambda fn: fn
        return plain
    # Layers run in order, once per forward (the recompute in backward calls `inner` directly),
    # so a count of the calls numbers them.
    calls = [0]

    def layer_index(config) -> int:
        calls[0] += 1
        return (calls[0] - 1) % config.num_layers

    if checkpointing == "layer":

        def checkpointed(config, p, x, cos, sin, mask):
            if not torch.is_grad_enabled():
                return inner(config, p, x, cos, sin, mask)
            if layer_index(config) >= config.num_layers - keep_layers:
                return inner(config, p, x, cos, sin, mask)
            return torch.utils.checkpoint.checkpoint(
                inner, config, p, x, cos, sin, mask, use_reentrant=False,
                preserve_rng_state=preserve_rng,
            )  # fmt: skip

        checkpointed.wrap = functools.partial(_checkpointed, preserve_rng=preserve_rng)
        return checkpointed

    anchor = torch.empty(0, requires_grad=True)  # makes backward run even when x needs no grad

    def offloaded(config, p, x, cos, sin, mask):
        if not torch.is_grad_enabled():
            return inner(config, p, x, cos, sin, mask)
        slot = layer_index(config)  # each layer number reuses one pinned buffer
        if slot >= config.num_layers - keep_layers:
            return inner(config, p, x, cos, sin, mask)
        run = lambda h: inner(config, p, h, cos, sin, mask)
        return _OffloadedCheckpoint.apply(run, slot, x, anchor, preserve_rng)

    offloaded.wrap = functools.partial(_checkpointed, preserve_rng=preserve_rng)
    return offloaded


def _checkpointed(fn: Callable, *, preserve_rng: bool) -> Callable:
    """fn (a family's own layer function, any arguments and outputs) under torch's non-reentrant
    checkpoint while gradients are on: the `wrap` of a layer function, for the families whose
    hidden_states runs its own layers (Gemma 4: a layer also returns the keys and values later
    layers share). Offload falls back to this: its saved input is the one tensor x."""

    def run(*args):
        if not torch.is_grad_enabled():
            return fn(*args)
        return torch.utils.checkpoint.checkpoint(
            fn, *args, use_reentrant=False, preserve_rng_state=preserve_rng
        )

    return run
