"""Text generation: a preallocated KV cache, prefill in one pass, then one-token decode steps.

    text = fnlm.generate(params, tok, "Hello", max_new_tokens=32)
    texts = fnlm.generate(params, tok, [[{"role": "user", "content": "Hi"}]], temperature=0.7, seed=0)

Three layers, each usable alone:
- the cache and the two model passes (`init_cache`, `prefill`, `decode_step`): pure functions of
  (params, cache, tokens); the cache is a dict of tensors passed in and returned, updated in place
  like a donated buffer so that a CUDA graph can replay a step on the same addresses;
- the token loop (`generate_tokens`): left-padded batches, sampling (`process_logits`, `choose`),
  per-sequence stopping on eos; on CUDA the decode step runs torch.compile'd layers (static
  shapes: it attends over the whole preallocated cache with a mask of valid slots) and is captured
  in a CUDA graph, so a step is one graph replay, and the host reads token t while the device
  already computes token t + 1;
- text (`generate`): prompts or conversations through the tokenizer and chat template, stop
  strings, streaming of text pieces.

With left padding, every row's prompt ends at cache slot P - 1 (P = the longest prompt) and
generated token t goes to slot P + t in every row; rotary positions count real tokens only,
as transformers does with an attention mask.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence

import torch

from fnlm.errors import ArgumentError
from fnlm.models import moe
from fnlm.models.decoder import (
    default_positions,
    hidden_states,
    layer_forward,
    logits_from_hidden,
)
from fnlm.params import Params

# Cache lengths are rounded up to a multiple of this on CUDA, so prompts of similar length reuse
# one compiled layer (shapes are static); the extra slots are masked out and cost little.
CUDA_CACHE_BUCKET = 256

# Runs of the compiled step before CUDA graph capture: the first compiles and autotunes, the
# second runs with every lazy initialization (cuBLAS workspaces, Triton launchers) done.
GRAPH_WARMUP_RUNS = 2

CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn}


# ----------------------------------------------------------------------------------------------
# The cache and the two passes
# ----------------------------------------------------------------------------------------------


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
    device = _device(params)
    dtype = dtype or _compute_dtype(params)
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
    if attention_mask is not None:
        valid[:, : attention_mask.shape[1]] = attention_mask.bool()
    return {
        "k": [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
        "v": [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
        "valid": valid,
    }


def prefill(
    params: Params, tokens: torch.Tensor, cache: dict, *, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict]:
    """Run the prompt `tokens` [batch, prompt_len] (left padded, `attention_mask` 1 = real) in one
    pass, writing cache slots 0..prompt_len-1. Returns (fp32 logits [batch, vocab] of the last
    position, cache)."""
    positions = default_positions(tokens, attention_mask)
    slots = torch.arange(tokens.shape[1], device=tokens.device)
    x = hidden_states(params, tokens, positions=positions, cache=cache, cache_slots=slots)
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
def _compiled_layer():
    # One layer is compiled, not the whole step: every layer has the same shapes, so one compiled
    # graph serves them all and compiling takes seconds, not minutes, for a 32-layer model. The
    # CUDA graph around the whole step removes the per-layer launch overhead anyway.
    return torch.compile(layer_forward, dynamic=False)


def _step_fn(compile: bool) -> Callable:
    if not compile:
        return decode_step
    return functools.partial(decode_step, layer_fn=_compiled_layer())


def _graph_step(params: Params, cache: dict, tokens, positions, slot, compile: bool) -> Callable:
    """A CUDA graph of one decode step over static input buffers: calling it replays the graph
    and returns the (static, overwritten by the next call) logits."""
    step = _step_fn(compile)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Each run writes this step's k, v into cache `slot`; the replay writes the same values.
        for _ in range(GRAPH_WARMUP_RUNS):
            step(params, cache, tokens, positions, slot)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step(params, cache, tokens, positions, slot)

    def replay() -> torch.Tensor:
        graph.replay()
        return logits

    return replay


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def process_logits(
    logits: torch.Tensor,
    *,
    seen: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """Scores [batch, vocab] after transformers' processors, in its order: repetition penalty
    (on tokens where `seen` [batch, vocab] is True), temperature, top-k, top-p, min-p. Filtered
    tokens get -inf; at least one token always survives. temperature 0 is taken as 1 here (greedy
    decoding skips the warpers)."""
    scores = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(
            scores < 0, scores * repetition_penalty, scores / repetition_penalty
        )
        scores = torch.where(seen, penalized, scores)
    if temperature not in (0.0, 1.0):
        scores = scores / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    if min_p > 0.0:
        probs = scores.softmax(-1)
        remove = probs < min_p * probs.amax(-1, keepdim=True)
        remove.scatter_(-1, probs.argmax(-1, keepdim=True), False)
        scores = scores.masked_fill(remove, -math.inf)
    return scores


def choose(
    logits: torch.Tensor,
    *,
    seen: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token [batch] from logits [batch, vocab]: argmax when temperature is 0, else a
    draw from softmax(process_logits(...)). Sampling divides the probabilities by Exp(1) noise
    and takes the argmax (same distribution as torch.multinomial, without a device sync)."""
    if temperature == 0.0:
        scores = process_logits(logits, seen=seen, repetition_penalty=repetition_penalty)
        return scores.argmax(-1)
    scores = process_logits(
        logits, seen=seen, repetition_penalty=repetition_penalty, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p,
    )  # fmt: skip
    probs = scores.softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


# ----------------------------------------------------------------------------------------------
# The token loop
# ----------------------------------------------------------------------------------------------


def generate_tokens(
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    lora=None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    seed: int | None = None,
    on_token: Callable[[int, int], bool] | None = None,
    cache_dtype: torch.dtype | str | None = None,
    pad_token_id: int = 0,
    compile: bool | None = None,
) -> list[list[int]]:
    """Generate from token-id prompts; returns each row's new ids (ending with the eos that
    stopped it, if one did).

    prompts: one list of ids per sequence (batched with left padding by `pad_token_id`).
    on_token(row, id) is called for each new non-eos id of a running row; returning True stops
        that row (stop strings). A row also stops at any of `eos_token_ids`, after
        `max_new_tokens`, or at the model's context length (max_position_embeddings).
    compile: torch.compile the decode step's layers (default: on CUDA). On CUDA the step is
        captured in a CUDA graph unless the model reads device values on the host (`graphable`).
    Sampling arguments as `generate`. Raises ArgumentError naming a bad argument.
    """
    config = params.config
    check_sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
    )  # fmt: skip
    prompts = _check_prompts(prompts, config.vocab_size, config.max_position_embeddings)
    eos = {int(i) for i in eos_token_ids}
    if lora is not None:
        from fnlm.lora import attach

        params = attach(params, lora)
    device = _device(params)
    on_cuda = device.type == "cuda"
    compile = on_cuda if compile is None else compile
    dtype = _cache_dtype(cache_dtype, params)

    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    steps = min(max_new_tokens, config.max_position_embeddings - prompt_len)
    tokens = torch.full((batch, prompt_len), pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, prompt_len), dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, prompt_len - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, prompt_len - len(ids) :] = 1
    tokens, mask = tokens.to(device), mask.to(device)
    padded = None if bool(mask.all()) else mask
    # The last decode step's own k, v are never read, so the cache needs prompt_len + steps - 1.
    max_len = prompt_len + steps
    if on_cuda:
        max_len = -(-max_len // CUDA_CACHE_BUCKET) * CUDA_CACHE_BUCKET

    sampling = dict(
        repetition_penalty=repetition_penalty, temperature=temperature, top_k=top_k,
        top_p=top_p, min_p=min_p,
    )  # fmt: skip
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)

    out: list[list[int]] = [[] for _ in range(batch)]
    running = [True] * batch
    with torch.no_grad():
        cache = init_cache(params, batch, max_len, attention_mask=padded, dtype=dtype)
        logits, cache = prefill(params, tokens, cache, attention_mask=padded)
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
            real = mask.bool()
            rows = torch.arange(batch, device=device)[:, None].expand_as(tokens)
            seen[rows[real], tokens[real]] = True
        # static input buffers of the decode step (a CUDA graph reads them at fixed addresses)
        step_tokens = torch.empty((batch, 1), dtype=torch.long, device=device)
        step_positions = mask.sum(1, keepdim=True)  # real tokens so far = next rotary position
        step_slot = torch.tensor([prompt_len], device=device)
        step = None
        for t in range(steps):
            next_tokens = choose(logits, seen=seen, generator=generator, **sampling)
            if seen is not None:
                seen.scatter_(1, next_tokens[:, None], True)
            on_host = next_tokens.to("cpu", non_blocking=on_cuda)
            ready = torch.cuda.Event() if on_cuda else None
            if ready is not None:
                ready.record()
            if t + 1 < steps:  # queue step t + 1 before the host looks at token t
                step_tokens.copy_(next_tokens[:, None])
                if t > 0:
                    step_positions += 1
                    step_slot += 1
                if step is None:
                    step = _make_step(params, cache, step_tokens, step_positions, step_slot,
                                      on_cuda=on_cuda, compile=compile)  # fmt: skip
                logits = step()
            if ready is not None:
                ready.synchronize()
            for row, token in enumerate(on_host.tolist()):
                if not running[row]:
                    continue
                out[row].append(token)
                if token in eos or (on_token is not None and on_token(row, token)):
                    running[row] = False
            if not any(running):
                break
    return out


def graphable(config, grouped_experts: bool = False) -> bool:
    """Whether a decode step can be one CUDA graph: no host reads of device values inside it.
    Mixture-of-experts layers qualify when their matmuls all take the grouped GEMM
    (`grouped_experts`, see fnlm.models.moe.grouped_everywhere; the per-expert loop reads row
    counts on the host); dynamic / longrope RoPE pick their tables from the longest position."""
    rope = config.rope
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    moe_ok = not config.num_experts or grouped_experts
    return moe_ok and rope_type not in ("dynamic", "longrope")


def _make_step(params, cache, tokens, positions, slot, *, on_cuda: bool, compile: bool):
    grouped = bool(params.config.num_experts) and on_cuda and moe.grouped_everywhere(params)
    if on_cuda and graphable(params.config, grouped):
        return _graph_step(params, cache, tokens, positions, slot, compile)
    if on_cuda:  # host syncs inside: dynamo would break the graph there anyway
        compile = False
    step = _step_fn(compile)
    return lambda: step(params, cache, tokens, positions, slot)


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------


def generate(
    params: Params,
    tok,
    prompts_or_messages,
    *,
    lora=None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    stop: str | Sequence[str] = (),
    seed: int | None = None,
    stream: Callable[[int, str], None] | None = None,
    return_tokens: bool = False,
    cache_dtype: torch.dtype | str | None = None,
):
    """Generate text for one prompt, a batch of prompts, one conversation or a batch of them.

    prompts_or_messages: a str, a list of str, a conversation (list of {"role", "content"} dicts,
        rendered with tok.apply_chat_template(add_generation_prompt=True)) or a list of them.
    lora: adapters from fnlm.lora, applied unmerged.
    temperature 0 is greedy; otherwise sampling after, in transformers' order, repetition_penalty
        (>= 1 discourages tokens of the prompt and output), temperature, top_k (0 = off), top_p
        (1 = off), min_p (0 = off); `seed` makes sampling reproducible.
    stop: strings that end a sequence (the returned text stops before them); sequences also stop
        at any of tok.eos_token_ids, after max_new_tokens, or at the model's context length.
    stream(index, piece) receives each new piece of text of sequence `index` as it is decoded.
    cache_dtype: None (the params' dtype) or "fp8" (float8_e4m3fn: half the cache memory).
    Returns a str for one prompt/conversation, else a list of str; with return_tokens, a pair
    (texts, new token ids) of the same shape.
    Raises ArgumentError naming the bad argument (empty prompt list, prompt longer than the
    model's context, sampling values out of range, ...).

        fnlm.generate(params, tok, [{"role": "user", "content": "Capital of France?"}])
    """
    if tok is None:
        raise ArgumentError(
            "tok is None: pass the tokenizer from fnlm.load, or call "
            "fnlm.generate.generate_tokens with token ids"
        )
    single, texts = _render_prompts(tok, prompts_or_messages)
    stops = _check_stop(stop)
    prompts = [
        tok.encode(text, add_special_tokens=not chat) for text, chat in texts
    ]  # a chat template writes its own bos
    rows = [_TextRow(tok, stops, stream, i) for i in range(len(prompts))]
    watch = bool(stops) or stream is not None
    ids = generate_tokens(
        params, prompts, lora=lora, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
        eos_token_ids=tok.eos_token_ids, seed=seed, cache_dtype=cache_dtype,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        on_token=(lambda row, token: rows[row].push(token)) if watch else None,
    )  # fmt: skip
    eos = set(tok.eos_token_ids)
    outputs = []
    for row, new in zip(rows, ids, strict=True):
        text_ids = new[:-1] if new and new[-1] in eos else new
        outputs.append(row.finish(text_ids))
    if single:
        return (outputs[0], ids[0]) if return_tokens else outputs[0]
    return (outputs, ids) if return_tokens else outputs


class _TextRow:
    """Incremental detokenization of one sequence: stop strings and streamed pieces.

    Pieces are the text of the newest tokens decoded together with a few tokens before them (so
    tokenizers that drop or merge leading spaces render them as in the whole text), held back
    while they end in an incomplete UTF-8 character or in the beginning of a stop string.
    """

    CONTEXT_TOKENS = 6

    def __init__(self, tok, stops: list[str], stream, index: int):
        self.tok, self.stops, self.stream, self.index = tok, stops, stream, index
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` already streamed
        self.prefix = 0  # ids[prefix:read] were decoded into the end of `text`
        self.read = 0
        self.stopped_at: int | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> bool:
        """Add one token; True when a stop string has appeared."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += after[len(before) :]
        self.prefix, self.read = max(0, len(self.ids) - self.CONTEXT_TOKENS), len(self.ids)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.stopped_at = min(found)
            self._send(self.stopped_at)
            return True
        self._send(len(self.text) - self._held_back())
        return False

    def _held_back(self) -> int:
        """Length of the longest end of `text` that begins a stop string."""
        for n in range(min(max((len(s) for s in self.stops), default=0), len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _send(self, end: int) -> None:
        if self.stream is not None and end > self.sent:
            self.stream(self.index, self.text[self.sent : end])
            self.sent = end

    def finish(self, ids: list[int]) -> str:
        """The final text of `ids` (the row's ids without a trailing eos), cut at a stop string."""
        text = self._decode(ids)
        if self.stopped_at is not None:
            text = self.text[: self.stopped_at]
        elif self.stream is not None:
            self.text = text
            self._send(len(text))
        return text


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling(
    *, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed
) -> None:
    """Raise ArgumentError naming the first sampling argument out of range."""
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise ArgumentError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not _is_real(temperature) or temperature < 0:
        raise ArgumentError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not _is_real(top_p) or not 0 < top_p <= 1:
        raise ArgumentError(f"top_p must lie in (0, 1] (1 = off), got {top_p!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ArgumentError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not _is_real(min_p) or not 0 <= min_p <= 1:
        raise ArgumentError(f"min_p must lie in [0, 1] (0 = off), got {min_p!r}")
    if not _is_real(repetition_penalty) or repetition_penalty <= 0:
        raise ArgumentError(
            f"repetition_penalty must be a number > 0 (1 = off), got {repetition_penalty!r}"
        )
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ArgumentError(f"seed must be None or an integer >= 0, got {seed!r}")


def _check_prompts(prompts, vocab_size: int, context: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not isinstance(prompts, Sequence) or isinstance(prompts, str) or not prompts:
        raise ArgumentError(f"prompts must be a non-empty list of token-id lists, got {prompts!r}")
    checked = []
    for row, ids in enumerate(prompts):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise ArgumentError(f"prompt {row} must be a list of token ids, got {ids!r}")
        if not ids:
            raise ArgumentError(f"prompt {row} is empty: it needs at least one token")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ArgumentError(
                f"prompt {row} has token ids outside the vocabulary [0, {vocab_size})"
            )
        if len(ids) >= context:
            raise ArgumentError(
                f"prompt {row} has {len(ids)} tokens, but the model's context "
                f"(max_position_embeddings) is {context}: no room to generate; shorten the "
                f"prompt or load with a larger max_seq_length"
            )
        checked.append(list(ids))
    return checked


def _render_prompts(tok, prompts) -> tuple[bool, list[tuple[str, bool]]]:
    """(single?, [(text, is_chat)]) for any accepted prompt form."""
    if isinstance(prompts, str):
        return True, [(prompts, False)]
    if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict):
        return True, [(_render_chat(tok, prompts, 0), True)]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ArgumentError(
            "prompts_or_messages must be a str, a non-empty list of str, a conversation (list of "
            f"{{'role', 'content'}} dicts) or a non-empty list of conversations; got {prompts!r}"
        )
    texts = []
    for i, item in enumerate(prompts):
        if isinstance(item, str):
            texts.append((item, False))
        elif isinstance(item, Sequence) and item and all(isinstance(m, dict) for m in item):
            texts.append((_render_chat(tok, item, i), True))
        else:
            raise ArgumentError(
                f"prompts_or_messages[{i}] must be a str or a conversation (list of "
                f"{{'role', 'content'}} dicts), got {item!r}"
            )
    return False, texts


def _render_chat(tok, messages: Sequence[dict], index: int) -> str:
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ArgumentError(
                f"conversation {index}: every message must be a dict with 'role' and 'content', "
                f"got {m!r}"
            )
    return tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def _check_stop(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, Sequence) or not all(isinstance(s, str) and s for s in stops):
        raise ArgumentError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return list(stops)


def _cache_dtype(cache_dtype, params: Params) -> torch.dtype:
    if cache_dtype is None:
        return _compute_dtype(params)
    if isinstance(cache_dtype, str) and cache_dtype in CACHE_DTYPES:
        return CACHE_DTYPES[cache_dtype]
    if isinstance(cache_dtype, torch.dtype) and cache_dtype.is_floating_point:
        return cache_dtype
    raise ArgumentError(
        f"cache_dtype must be None (the params' dtype), 'fp8' or a torch float dtype; "
        f"got {cache_dtype!r}"
    )


def _device(params: Params) -> torch.device:
    return params["norm"].device


def _compute_dtype(params: Params) -> torch.dtype:
    return params["norm"].dtype
