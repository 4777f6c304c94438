"""The KV cache, the two model passes, and the decode step as it runs: compiled, graph-captured,
and kept across calls.

`init_cache`, `prefill` and `decode_step` are pure functions of (params, cache, tokens); the cache
is a dict of tensors passed in and returned, updated in place like a donated buffer so that a CUDA
graph can replay a step on the same addresses.

No compile or capture on a second call: the compiled layer treats the batch, the prompt length
and the cache length as dynamic dimensions (one compile of the prefill and one of the step serve
every length; `prefill_fn`, `step_fn`), cache lengths are rounded up to a few buckets, and
the CUDA graph of a step is kept with its cache and input buffers (`DecodeState`) in a small cache
keyed by the model's tensors, the batch and the cache length, so a later call of the same shape
only replays it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree

from fnlm.models import family, moe
from fnlm.models.decoder import (
    default_positions,
    hidden_states,
    layer_forward,
    logits_from_hidden,
)
from fnlm.models.deltanet import init_state as linear_states
from fnlm.models.deltanet import reset as reset_linear_states
from fnlm.params import Params

# Cache lengths are rounded up to a multiple of this (or of a quarter of their power of two, if
# larger), so calls of similar lengths share one captured graph; extra slots are masked out.
CACHE_BUCKET = 256

# Graph-captured prefills take prompts left padded to a multiple of this (or of an eighth of
# their power of two, if larger), so prompts of similar lengths share one captured prefill.
PROMPT_BUCKET = 64

# Runs of the compiled step before CUDA graph capture: the first compiles and autotunes, the
# second runs with every lazy initialization (cuBLAS workspaces, Triton launchers) done.
GRAPH_WARMUP_RUNS = 2

# Decode states (a captured graph with its cache) kept across calls, for the last model used.
GRAPH_CACHE_SIZE = 4

# torch.compile's backend for the decode layer (tests swap in a counting one).
COMPILE_BACKEND = "inductor"


def cache_length(needed: int) -> int:
    """The bucketed cache length for `needed` slots: a multiple of CACHE_BUCKET, or of a quarter
    of needed's power of two when that is larger (at most 25% extra, log-many buckets)."""
    step = max(CACHE_BUCKET, 1 << max(needed.bit_length() - 3, 0))
    return -(-needed // step) * step


def prompt_length(needed: int) -> int:
    """The bucketed prompt length for `needed` tokens: a multiple of PROMPT_BUCKET, or of an
    eighth of needed's power of two when that is larger (at most 12.5% extra, log-many)."""
    step = max(PROMPT_BUCKET, 1 << max(needed.bit_length() - 4, 0))
    return -(-needed // step) * step


def init_cache(
    params: Params,
    batch: int,
    max_len: int,
    *,
    attention_mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """A zeroed KV cache: {"k": [per layer [batch, kv_heads, max_len, head_dim]], "v": same,
    "valid": [batch, max_len] bool}.

    `valid` marks the slots attention may read: False for the left padding of the prompt (from
    `attention_mask` [batch, prompt_len], 1 = real token), True elsewhere (future slots are hidden
    by causality until written). `dtype` defaults to the params' dtype; torch.float8_e4m3fn
    halves the cache's memory.
    """
    config = params.config
    device = params["norm"].device
    dtype = dtype or params["norm"].dtype
    # (kv heads, head dim) per layer; Gemma 4's global layers differ from its sliding ones
    per_layer = getattr(family(config.model_type), "cache_shape", None)
    shapes = [
        (batch, *(per_layer(config, i) if per_layer else (config.num_kv_heads, config.head_dim)))
        for i in range(config.num_layers)
    ]
    shapes = [(b, kv, max_len, d) for b, kv, d in shapes]
    valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
    if attention_mask is not None:
        valid[:, : attention_mask.shape[1]] = attention_mask.bool()
    return {
        "k": [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes],
        "v": [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes],
        "valid": valid,
        # Qwen3.5's gated DeltaNet layers: conv and recurrent states ("conv", "state")
        **linear_states(config, batch, device, params["norm"].dtype),
    }


def prefill(
    params: Params,
    tokens: torch.Tensor,
    cache: dict,
    *,
    attention_mask: torch.Tensor | None = None,
    layer_fn=layer_forward,
) -> tuple[torch.Tensor, dict]:
    """Run the prompt `tokens` [batch, prompt_len] (left padded, `attention_mask` 1 = real) in one
    pass, writing cache slots 0..prompt_len-1. Returns (fp32 logits [batch, vocab] of the last
    position, cache)."""
    reset_linear_states(cache)  # a reused cache's recurrent states hold an earlier sequence
    positions = default_positions(tokens, attention_mask)
    slots = torch.arange(tokens.shape[1], device=tokens.device)
    x = hidden_states(
        params, tokens, positions=positions, cache=cache, cache_slots=slots, layer_fn=layer_fn
    )
    return logits_from_hidden(params, x[:, -1]).float(), cache


def decode_step(
    params: Params,
    cache: dict,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slot: torch.Tensor,
    *,
    layer_fn=layer_forward,
) -> torch.Tensor:
    """One token per sequence: `tokens` [batch, 1] at rotary `positions` [batch, 1] go into cache
    `slot` [1] (a tensor, so one compiled graph serves every step). Returns fp32 logits
    [batch, vocab]; the cache is updated in place. `layer_fn` as in `hidden_states`."""
    x = hidden_states(
        params, tokens, positions=positions, cache=cache, cache_slots=slot, layer_fn=layer_fn
    )
    return logits_from_hidden(params, x[:, -1]).float()


@functools.cache
def _compiled_layer(backend) -> Callable:
    # One layer is compiled, not the whole step: every layer has the same shapes, so one compiled
    # graph serves them all and compiling takes seconds, not minutes, for a 32-layer model. The
    # CUDA graph around the whole step removes the per-layer launch overhead anyway.
    return torch.compile(layer_forward, backend=backend, dynamic=False)


def compiled_layer() -> Callable:
    """layer_forward compiled with the batch, the sequence (prefill: the prompt length) and the
    cache length as dynamic dimensions, every other shape static: one compile serves every cache
    length, every prompt length and every batch (torch specializes a size of 1, so decode's one
    token and a batch of one each get one compile of their own)."""
    compiled = _compiled_layer(COMPILE_BACKEND)

    def layer(config, p, x, cos, sin, mask, kv=None):
        for dim in (0, 1):  # x [batch, seq, hidden], cos/sin [batch, seq, rotary / 2]
            for t in (x, cos, sin):
                if t is not None:
                    torch._dynamo.maybe_mark_dynamic(t, dim)
        if kv is not None and "conv" not in p["attn"]:  # a DeltaNet layer's kv: its states
            for dim in (0, 2):  # [batch, kv_heads, cache length, head_dim]
                torch._dynamo.maybe_mark_dynamic(kv[0], dim)
                torch._dynamo.maybe_mark_dynamic(kv[1], dim)
            torch._dynamo.maybe_mark_dynamic(kv[2], 0)  # the slots written: [seq]
            for dim in (0, 2, 3):  # [batch, 1, seq, cache length]
                torch._dynamo.maybe_mark_dynamic(mask, dim)
        return compiled(config, p, x, cos, sin, mask, kv)

    return layer


def prefill_fn(compile: bool) -> Callable:
    """prefill, with compiled layers when `compile` (see `compiled_layer`: a prompt of a new
    length compiles nothing)."""
    if not compile:
        return prefill
    return functools.partial(prefill, layer_fn=compiled_layer())


def step_fn(compile: bool) -> Callable:
    """decode_step, with compiled layers when `compile`."""
    if not compile:
        return decode_step
    return functools.partial(decode_step, layer_fn=compiled_layer())


def recurrent_states(cache: dict) -> list[torch.Tensor]:
    """The per-row DeltaNet states of a cache (conv and recurrent, [batch, ...] each; none for
    other models): what a step updates by reading it, unlike the k, v it writes to a slot."""
    return [t for t in (*cache.get("conv", ()), *cache.get("state", ())) if t is not None]


def capture(
    fn: Callable[[], torch.Tensor], pool=None, keep: list[torch.Tensor] = ()
) -> Callable[[], torch.Tensor]:
    """A CUDA graph of `fn` (device work on static buffers, no host reads): calling the result
    replays the graph and returns `fn`'s (static, overwritten by the next call) output. `pool`:
    a memory pool shared with other graphs never replayed at the same time. `keep`: tensors `fn`
    updates in place from their own values (recurrent states); the warm-up runs before the capture
    leave them as they found them, so the first replay is the first update."""
    kept = [t.clone() for t in keep]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # A decode step writes its k, v into the cache slot; the replay writes the same values.
        for _ in range(GRAPH_WARMUP_RUNS):
            fn()
        for t, old in zip(keep, kept, strict=True):
            t.copy_(old)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):  # recorded, not run: `keep` is not touched
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def graph_step(params: Params, cache: dict, tokens, positions, slot, compile: bool) -> Callable:
    """A CUDA graph of one decode step over static input buffers (see `capture`)."""
    step = step_fn(compile)
    return capture(
        lambda: step(params, cache, tokens, positions, slot), keep=recurrent_states(cache)
    )


def graphable(config, grouped_experts: bool = False) -> bool:
    """Whether a decode step can be one CUDA graph: no host reads of device values inside it.
    Mixture-of-experts layers qualify when their matmuls all take the grouped GEMM
    (`grouped_experts`, see fnlm.models.moe.grouped_everywhere; the per-expert loop reads row
    counts on the host); dynamic / longrope RoPE pick their tables from the longest position."""
    rope = config.rope
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    moe_ok = not config.num_experts or grouped_experts
    return moe_ok and rope_type not in ("dynamic", "longrope")


def will_capture(params: Params) -> bool:
    """Whether decode steps of these params run as CUDA graphs."""
    on_cuda = params["norm"].device.type == "cuda"
    grouped = bool(params.config.num_experts) and on_cuda and moe.grouped_everywhere(params)
    return on_cuda and graphable(params.config, grouped)


def compiles(params: Params, compile: bool) -> bool:
    """Whether the layers are torch.compile'd when `compile` asks for it: not on CUDA where the
    step is not graph-captured (the model reads device values on the host there, and dynamo
    would break the graph at each read)."""
    return compile and (params["norm"].device.type != "cuda" or will_capture(params))


def make_step(params, cache, tokens, positions, slot, *, compile: bool) -> Callable:
    """A no-argument callable running one decode step over the given buffers: a CUDA graph
    replay where the model allows it, else the (compiled, see `compiles`) step."""
    if will_capture(params):
        return graph_step(params, cache, tokens, positions, slot, compile)
    step = step_fn(compiles(params, compile))
    return lambda: step(params, cache, tokens, positions, slot)


@dataclasses.dataclass
class DecodeState:
    """A decode step's cache and static input buffers, and the step over them once made.

    tokens [batch, 1], positions [batch, 1] (next rotary position per row), slot [1] (the cache
    slot the step writes); `run()` runs one step and returns fp32 logits [batch, vocab]. `key`:
    where the graph cache keeps it (None: not kept)."""

    params: Params
    cache: dict
    tokens: torch.Tensor
    positions: torch.Tensor
    slot: torch.Tensor
    compile: bool
    step: Callable | None = None
    key: tuple | None = None
    model: tuple | None = None  # the base model's tensor ids
    # prompt length -> (tokens, attention mask, replay) of a captured prefill into this cache
    prefills: dict = dataclasses.field(default_factory=dict)
    pool: object = None  # the prefill graphs' shared memory pool (one runs at a time)

    def run(self) -> torch.Tensor:
        if self.step is None:
            self.step = make_step(
                self.params, self.cache, self.tokens, self.positions, self.slot,
                compile=self.compile,
            )  # fmt: skip
        return self.step()

    def prefill(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`prefill` of `tokens` [batch, P] (left padded, `attention_mask` 1 = real; P a
        `prompt_length`) into this state's cache, as a CUDA graph captured on the first prompt
        of that length and replayed after; returns fp32 logits [batch, vocab] (overwritten by
        the next prefill of that length). The cache's `valid` must already match the mask."""
        length = tokens.shape[1]
        if length in self.prefills:
            static_tokens, static_mask, replay = self.prefills[length]
            static_tokens.copy_(tokens)
            static_mask.copy_(attention_mask)
            return replay()
        static_tokens, static_mask = tokens.clone(), attention_mask.clone()
        run = prefill_fn(self.compile)
        if self.pool is None and torch.cuda.is_available():
            self.pool = torch.cuda.graph_pool_handle()
        replay = capture(
            lambda: run(self.params, static_tokens, self.cache, attention_mask=static_mask)[0],
            pool=self.pool,
            keep=recurrent_states(self.cache),
        )
        self.prefills[length] = (static_tokens, static_mask, replay)
        return replay()


# key -> DecodeState not in use, most recent last; all of one base model (`_graphs_model`).
# A state is taken out while a call uses it, so concurrent calls never share buffers.
_graphs: collections.OrderedDict = collections.OrderedDict()
_graphs_model: list = [None]
_graphs_lock = threading.Lock()


def _leaf_ids(tree) -> tuple[int, ...]:
    return tuple(id(t) for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


def decode_state(
    params: Params,
    base: Params,
    batch: int,
    max_len: int,
    *,
    attention_mask: torch.Tensor | None,
    dtype: torch.dtype,
    compile: bool,
    variant=None,
) -> DecodeState:
    """A DecodeState for `batch` rows and `max_len` cache slots, its `valid` set from
    `attention_mask` [batch, prompt_len]. Where steps are graph-captured, the state (graph, cache,
    buffers) is taken from the graph cache when one of this shape exists for the same tensors
    (`params`: the weights the step reads, adapters attached; `base`: the model without them,
    whose change empties the cache; `variant`: anything else the step depends on, such as the
    adapters' dropout mode); hand it back with `keep` when the call is done."""
    if not will_capture(params):
        return _new_state(params, batch, max_len, attention_mask, dtype, compile)
    key = (batch, max_len, dtype, compile, variant, _leaf_ids(params))
    with _graphs_lock:
        model = _leaf_ids(base)
        if _graphs_model[0] != model:
            _graphs.clear()
            _graphs_model[0] = model
        state = _graphs.pop(key, None)
    if state is None:
        state = _new_state(params, batch, max_len, attention_mask, dtype, compile)
        state.key, state.model = key, model
        return state
    valid = state.cache["valid"]
    valid.fill_(True)
    if attention_mask is not None:
        valid[:, : attention_mask.shape[1]] = attention_mask.to(valid.device).bool()
    return state


def keep(state: DecodeState) -> None:
    """Put a state from `decode_state` back into the graph cache (the oldest of more than
    GRAPH_CACHE_SIZE are dropped), unless it is not cacheable, holds no graph yet or its model
    was replaced. A state whose call made one token holds its captured prefill only: kept too, so
    the next such call replays it rather than capture again."""
    if state.key is None or (state.step is None and not state.prefills):
        return
    with _graphs_lock:
        if _graphs_model[0] != state.model:
            return
        _graphs[state.key] = state
        while len(_graphs) > GRAPH_CACHE_SIZE:
            _graphs.popitem(last=False)


def _new_state(params, batch, max_len, attention_mask, dtype, compile) -> DecodeState:
    device = params["norm"].device
    cache = init_cache(params, batch, max_len, attention_mask=attention_mask, dtype=dtype)
    return DecodeState(
        params=params, cache=cache, compile=compile,
        tokens=torch.zeros((batch, 1), dtype=torch.long, device=device),
        positions=torch.zeros((batch, 1), dtype=torch.long, device=device),
        slot=torch.zeros(1, dtype=torch.long, device=device),
    )  # fmt: skip


def release_graphs() -> None:
    """Drop every kept decode graph and its cache (their device memory is freed)."""
    with _graphs_lock:
        _graphs.clear()
        _graphs_model[0] = None
