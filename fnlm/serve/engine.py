"""Continuous batching: many requests share one running decode over a static cache of slots.

    engine = Engine(params, tok, adapters={"pirate": lora}, slots=8)
    engine.submit(Request(prompt=ids, max_tokens=64, on_event=print))
    ...
    engine.close()

The cache has `slots` rows of `context` positions each, used as rings: decode step t writes
every row's new key and value at the same position t mod context (one `decode_step` of fnlm's
decoder, compiled once for the engine's life), and each row's attention mask
admits only the positions holding its own request's tokens (the last `count` before t, plus t),
and on sliding-window layers only the last `window` of them. A request joins between two steps:
its prompt is prefilled (the same `prefill` as `fnlm.generate`, on a cache of its own, batched
with the other requests joining at that step), its keys and values are copied into a free row's
ring just behind t, and the next step decodes it with the others; it leaves when done and its
row is free for the next one. A model with gated DeltaNet layers (Qwen3.5) also keeps per row
their conv and recurrent states (the cache's "conv" and "state"): a joining request's prefill
starts from zero states on its own cache, and its final states are copied into its row.

A step decodes only the occupied rows: the running rows are kept in the first rows of the cache
(a row whose request leaves is filled by moving the last running row's tokens, and its DeltaNet
states, into it), and the step runs over the first `width` rows, `width` the smallest of a few
buckets (1, 2, 4, ... up to `slots`) that holds them; the compiled layer takes the batch as a
dynamic dimension, so a new width compiles nothing (a lone request pays batch 1).

Rows on different adapters (chosen per request by name) run as separate passes of the same step,
one per adapter in use, each pass's cache writes (and DeltaNet state updates: each pass starts
from the step's states) kept only for its own rows; rows on the same adapter share one pass.
Everything on the device runs in one engine thread; `on_event` is called from it.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import traceback
from collections.abc import Callable

import torch

from fnlm.errors import ArgumentError, LoraError
from fnlm.generate.sampling import Sampling, choose
from fnlm.generate.step import (
    cache_length,
    compiled_layer,
    compiles,
    decode_step,
    init_cache,
    prefill_fn,
    recurrent_states,
)
from fnlm.generate.text import TextRow
from fnlm.lora import with_adapters
from fnlm.models.decoder import layer_forward
from fnlm.params import Params


def _bytes(cache: torch.Tensor) -> torch.Tensor:
    """A cache tensor as index_copy_ takes it: an fp8 one viewed as its bytes (no fp8 kernels)."""
    return cache.view(torch.uint8) if cache.dtype.itemsize == 1 else cache


def widths(slots: int) -> list[int]:
    """The batch widths a step runs at: powers of two below `slots`, and `slots`."""
    return sorted({1 << k for k in range(slots.bit_length()) if 1 << k < slots} | {slots})


@dataclasses.dataclass(eq=False)
class Request:
    """One generation: prompt token ids, at most `max_tokens` new tokens (None: up to the
    context), `sampling`, `stop` strings, the adapter name (None: the base model), and
    `on_event(kind, data)`, called from the engine thread with ("piece", str) for each new piece
    of text when `stream`, then once ("done", Result) or ("error", str)."""

    prompt: list[int]
    on_event: Callable[[str, object], None]
    max_tokens: int | None = None
    sampling: Sampling = Sampling()
    stop: list[str] = dataclasses.field(default_factory=list)
    adapter: str | None = None
    stream: bool = False
    cancelled: bool = False  # set by the caller (a closed connection): the row is freed


@dataclasses.dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"


def _send(request: Request, kind: str, data) -> None:
    """request.on_event(kind, data); a callback that raises cancels its request, not the engine."""
    try:
        request.on_event(kind, data)
    except Exception:
        traceback.print_exc()
        request.cancelled = True


@dataclasses.dataclass(eq=False)
class _Row:
    request: Request
    text: TextRow
    budget: int  # new tokens allowed
    count: int  # tokens of this request in the cache
    generator: torch.Generator | None
    seen: torch.Tensor | None
    ids: list[int] = dataclasses.field(default_factory=list)
    last: int = 0  # the newest token, the input of the next step


class Engine:
    """Serves `Request`s from a thread of its own, `slots` at a time (see the module docstring).

    params, tok: from fnlm.load (tok None: token ids only, no text, no stop strings). adapters:
    {name: Lora}. context: positions per request, prompt included (default and maximum: the
    model's max_position_embeddings). compile: torch.compile the decode layers (default on
    CUDA). cache_dtype: as fnlm.generate. warm: compile and run the base model's step in the
    engine thread before the first request (adapters' on first use).
    """

    def __init__(
        self,
        params: Params,
        tok,
        adapters: dict | None = None,
        *,
        slots: int = 8,
        context: int | None = None,
        compile: bool | None = None,
        cache_dtype: torch.dtype | None = None,
        warm: bool = True,
    ):
        config = params.config
        if not isinstance(slots, int) or slots < 1:
            raise ArgumentError(f"slots must be a positive integer, got {slots!r}")
        limit = config.max_position_embeddings
        context = limit if context is None else context
        if not isinstance(context, int) or not 2 <= context <= limit:
            raise ArgumentError(
                f"context must be an integer in [2, {limit}] (the model's max_position_embeddings),"
                f" got {context!r}"
            )
        self.params, self.tok, self.slots, self.context = params, tok, slots, context
        self.device = params["norm"].device
        on_cuda = self.device.type == "cuda"
        self.compile = compiles(params, on_cuda if compile is None else compile)
        self.eos = set(getattr(tok, "eos_token_ids", ()) or ())
        self.models: dict[str | None, Params] = {None: params}
        for name, lora in (adapters or {}).items():
            try:
                self.models[name] = with_adapters(params, lora)
            except LoraError as e:  # which of the adapters, then what does not fit
                raise LoraError(f"adapters[{name!r}]: {e}") from e
        self.cache_dtype = cache_dtype
        self.cache = init_cache(params, slots, context, dtype=cache_dtype)
        # static buffers of the step: each row's input token and rotary position (= its tokens
        # already in the cache), and the ring position t every row writes
        self.tokens = torch.zeros((slots, 1), dtype=torch.long, device=self.device)
        self.positions = torch.zeros((slots, 1), dtype=torch.long, device=self.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self.t = 0
        self.widths = widths(slots)
        self._steps: dict[tuple[str | None, int], Callable[[], torch.Tensor]] = {}
        self.rows: list[_Row | None] = [None] * slots
        self.most_rows = 0  # the most rows decoded together so far (for tests and logs)
        self.steps_run = 0
        self.steps_by_width: collections.Counter = collections.Counter()
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[Request] = []
        self._warm = warm
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fnlm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------
    # The caller's side

    def submit(self, request: Request) -> None:
        """Queue a request; it joins the running decode at the next step with a free row.
        Raises ArgumentError for an unknown adapter or a prompt that leaves no room."""
        if request.adapter not in self.models:
            raise ArgumentError(f"unknown adapter {request.adapter!r}; known: {self.adapter_names}")
        if not request.prompt or len(request.prompt) >= self.context:
            raise ArgumentError(
                f"the prompt has {len(request.prompt)} tokens; it needs at least one and fewer "
                f"than the server's context of {self.context}"
            )
        max_tokens = request.max_tokens
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ArgumentError(
                f"max_tokens must be None or a positive integer, got {max_tokens!r}"
            )
        if self._closed.is_set():
            raise ArgumentError("the engine is closed")
        self._queue.put(request)

    @property
    def adapter_names(self) -> list[str]:
        return [name for name in self.models if name is not None]

    def close(self) -> None:
        """Stop the engine thread; requests still running get an "error" event."""
        self._closed.set()
        self._queue.put(None)
        self._thread.join()

    # ------------------------------------------------------------------------------------------
    # The engine thread

    def _loop(self) -> None:
        if self._warm:  # every row is free: the step's writes land in rows nobody reads
            try:
                with torch.no_grad():
                    for width in self.widths:
                        self._step_fn(None, width)()
            except Exception:  # the first request's step will fail with the same error
                traceback.print_exc()
        while not self._closed.is_set():
            busy = any(row is not None for row in self.rows) or self._pending
            try:
                item = self._queue.get(block=not busy)
            except queue.Empty:
                item = None
            while item is not None:
                self._pending.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            if self._closed.is_set():
                break
            try:
                with torch.no_grad():
                    self._admit()
                    if any(row is not None for row in self.rows):
                        self._step()
            except Exception as e:  # fail the running requests, keep serving
                traceback.print_exc()
                for i, row in enumerate(self.rows):
                    if row is not None:
                        self.rows[i] = None
                        _send(row.request, "error", f"{type(e).__name__}: {e}")
        for row in self.rows:
            if row is not None:
                _send(row.request, "error", "the server is shutting down")
        for request in self._pending:
            _send(request, "error", "the server is shutting down")

    def _admit(self) -> None:
        """Prefill pending requests into free rows, those on one adapter as one batch (the
        prefill is host-bound for small batches: joining together costs what one costs)."""
        while self._pending and None in self.rows:
            free = [i for i, row in enumerate(self.rows) if row is None]
            joining: dict[str | None, list[tuple[int, Request]]] = {}
            while free and self._pending:
                request = self._pending.pop(0)
                if not request.cancelled:
                    joining.setdefault(request.adapter, []).append((free.pop(0), request))
            for group in joining.values():
                try:
                    self._join(group)
                except Exception as e:  # these requests fail, the running ones go on
                    traceback.print_exc()
                    for i, request in group:
                        self.rows[i] = None
                        _send(request, "error", f"{type(e).__name__}: {e}")

    def _join(self, group: list[tuple[int, Request]]) -> None:
        """Prefill the requests of one adapter together (left padded, as fnlm.generate batches
        prompts; one request alone is exactly fnlm.generate's prefill), copy each one's keys and
        values into its row's ring just behind t, and choose its first token."""
        params = self.models[group[0][1].adapter]
        prompts = [request.prompt for _, request in group]
        width = max(len(p) for p in prompts)
        budgets = [
            min(self.context - len(r.prompt), r.max_tokens or self.context) for _, r in group
        ]
        tokens = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, prompt in enumerate(prompts):
            tokens[r, width - len(prompt) :] = torch.tensor(prompt)
            mask[r, width - len(prompt) :] = 1
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        padded = None if len(group) == 1 else mask  # one prompt: no padding, as generate
        # the cache length fnlm.generate would use for these prompts
        needed = width + max(budgets)
        length = cache_length(needed) if self.compile or self.device.type == "cuda" else needed
        own = init_cache(params, len(group), length, attention_mask=padded, dtype=self.cache_dtype)
        logits, own = prefill_fn(self.compile)(params, tokens, own, attention_mask=padded)
        for r, ((i, request), budget) in enumerate(zip(group, budgets, strict=True)):
            n = len(request.prompt)
            ring = (torch.arange(n, device=self.device) + self.t - n) % self.context
            for layer in range(len(self.cache["k"])):
                for name in ("k", "v"):
                    _bytes(self.cache[name][layer])[i].index_copy_(
                        1, ring, _bytes(own[name][layer])[r, :, width - n : width]
                    )
            for state, joined in zip(
                recurrent_states(self.cache), recurrent_states(own), strict=True
            ):
                state[i].copy_(joined[r])  # the states after the prompt, from zero in its prefill
            seen = None
            if request.sampling.repetition_penalty != 1.0:
                seen = torch.zeros((1, logits.shape[-1]), dtype=torch.bool, device=self.device)
                seen[0, tokens[r, width - n :]] = True
            stream = self._streamer(request)
            row = _Row(
                request=request, budget=budget, count=n, seen=seen,
                generator=request.sampling.generator(self.device),
                text=None if self.tok is None else TextRow(self.tok, request.stop, stream, 0),
            )  # fmt: skip
            self.rows[i] = row
            first = choose(logits[r : r + 1], request.sampling, seen=seen, generator=row.generator)
            self._push(i, int(first[0]))

    def _streamer(self, request: Request):
        if not request.stream:
            return None
        return lambda _index, piece: _send(request, "piece", piece)

    def _step(self) -> None:
        """One decode step for every running row (one pass per adapter in use), over the first
        `width` rows only (see `_compact`)."""
        width = self._compact()
        groups: dict[str | None, list[int]] = {}
        tokens, positions = self.tokens.new_zeros(self.slots, 2, device="cpu").unbind(1)
        for i, row in enumerate(self.rows):
            if row is not None:
                groups.setdefault(row.request.adapter, []).append(i)
                tokens[i], positions[i] = row.last, row.count
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        self.most_rows = max(self.most_rows, sum(len(g) for g in groups.values()))
        self.steps_by_width[width] += 1
        chosen: dict[int, int] = {}
        kept = []  # per pass: its rows, their k, v at slot t and states, when passes must not mix
        states = [t[:width] for t in recurrent_states(self.cache)]
        before = [t.clone() for t in states] if len(groups) > 1 else []
        for n, (adapter, members) in enumerate(groups.items()):
            if n:  # every pass updates every row's states: start each from the step's
                for state, old in zip(states, before, strict=True):
                    state.copy_(old)
            logits = self._step_fn(adapter, width)()
            if len(groups) > 1:
                index = torch.tensor(members, device=self.device)
                kept.append((index, [(k[index, :, self.t].clone(), v[index, :, self.t].clone())
                                     for k, v in zip(self.cache["k"], self.cache["v"])],
                             [state[index] for state in states]))  # fmt: skip
            chosen.update(self._choose(logits, members))
        for index, values, new_states in kept:
            for (k, v), (k_rows, v_rows) in zip(zip(self.cache["k"], self.cache["v"]), values):
                k[index, :, self.t] = k_rows
                v[index, :, self.t] = v_rows
            for state, rows in zip(states, new_states, strict=True):
                state[index] = rows
        self.t = (self.t + 1) % self.context
        self.slot.fill_(self.t)
        self.steps_run += 1
        for i, token in chosen.items():
            self.rows[i].count += 1
            self._push(i, token)

    def _compact(self) -> int:
        """Move running rows that lie past the smallest width holding them all into the free
        rows before it (their cached tokens with them); return that width."""
        running = [i for i, row in enumerate(self.rows) if row is not None]
        width = next(w for w in self.widths if w >= len(running))
        free = [i for i in range(width) if self.rows[i] is None]
        for i in running:
            if i >= width:
                self._move(i, free.pop(0))
        return width

    def _move(self, source: int, target: int) -> None:
        """Row `source`'s request, its cached tokens (the `count` ring positions behind t) and
        its DeltaNet states into the free row `target`."""
        row = self.rows[source]
        ring = (torch.arange(row.count, device=self.device) + self.t - row.count) % self.context
        for name in ("k", "v"):
            for layer in map(_bytes, self.cache[name]):
                layer[target].index_copy_(1, ring, layer[source].index_select(1, ring))
        for state in recurrent_states(self.cache):
            state[target].copy_(state[source])
        self.rows[target], self.rows[source] = row, None

    def _choose(self, logits: torch.Tensor, members: list[int]) -> dict[int, int]:
        """Next tokens of `members` from step logits [slots, vocab]; plain greedy rows together."""
        plain = [i for i in members if self.rows[i].request.sampling == Sampling()]
        chosen = {}
        if plain:
            picked = logits[torch.tensor(plain, device=self.device)].argmax(-1).tolist()
            chosen.update(zip(plain, picked))
        for i in members:
            if i in chosen:
                continue
            row = self.rows[i]
            token = choose(
                logits[i : i + 1], row.request.sampling, seen=row.seen, generator=row.generator
            )
            chosen[i] = int(token[0])
        return chosen

    def _push(self, i: int, token: int) -> None:
        """Record row i's new token; finish the row on eos, a stop string or its budget."""
        row = self.rows[i]
        request = row.request
        if row.seen is not None:
            row.seen[0, token] = True
        row.ids.append(token)
        row.last = token
        reason = None
        if token in self.eos:
            reason = "stop"
        elif row.text is not None and row.text.push(token):
            reason = "stop"
        elif len(row.ids) >= row.budget:
            reason = "length"
        if request.cancelled:
            self.rows[i] = None
            return
        if reason is None:
            return
        self.rows[i] = None
        text_ids = row.ids[:-1] if token in self.eos else row.ids
        text = "" if row.text is None else row.text.finish(text_ids)
        _send(request, "done", Result(text, row.ids, len(request.prompt), reason))

    def _step_fn(self, adapter: str | None, width: int) -> Callable[[], torch.Tensor]:
        """The decode step of one adapter over the first `width` rows of the engine's buffers:
        fnlm's decode_step with ring masks (eager: see below)."""
        if (adapter, width) in self._steps:
            return self._steps[adapter, width]
        params = self.models[adapter]
        config = params.config
        layer = compiled_layer() if self.compile else layer_forward
        windows = {id(p): config.window(i) for i, p in enumerate(params["layers"])}
        distinct = set(windows.values())
        span = torch.arange(self.context, device=self.device)
        # views of the first `width` rows: the step reads and writes those rows only
        cache = {
            "k": [k[:width] for k in self.cache["k"]],
            "v": [v[:width] for v in self.cache["v"]],
            "valid": self.cache["valid"][:width],
            # DeltaNet layers' states (None on attention layers); a one-token step needs no mask
            **{
                name: [None if t is None else t[:width] for t in self.cache.get(name, ())]
                for name in ("conv", "state")
            },
        }
        tokens, positions = self.tokens[:width], self.positions[:width]

        def step() -> torch.Tensor:
            # age of each ring position relative to the written one t: 0 is t itself
            age = (self.slot - span) % self.context  # [context]
            seen = age[None, :] <= positions  # [width, context]: the row's tokens and t
            masks = {
                w: (seen if w is None else seen & (age < w)[None, :])[:, None, None, :]
                for w in distinct
            }

            def ring_layer(config, p, x, cos, sin, mask, kv):
                if "conv" in p["attn"]:  # gated DeltaNet: kv its states, mask None at one token
                    return layer(config, p, x, cos, sin, mask, kv)
                return layer(config, p, x, cos, sin, masks[windows[id(p)]], kv)

            return decode_step(params, cache, tokens, positions, self.slot, layer_fn=ring_layer)

        # Not a CUDA graph: on the H200 (2026-12-03) the captured ring step gave other tokens than
        # the eager one from the first decode step when the engine's captures were the process's
        # first CUDA graphs (also with one eager step run first in the engine thread), and equal
        # tokens at every step when eager engines had run earlier in the process: root cause open.
        # On 2026-12-04 (main at 3a12d5d) the same capture (`capture(step)` in a subclass's
        # _step_fn, fp32 tiny Llama, 7 requests over 3 slots) gave generate_tokens' ids for every
        # request in 8 orders, captured first in the process among them: the fault did not
        # reproduce. Left eager until tests/test_serve.py's
        # test_captured_ring_step_on_cuda_equals_generate_tokens passes on a GPU again.
        run = step
        self._steps[adapter, width] = run
        return run
