"""The token loop: left-padded batches of token-id prompts, prefill, then one decode step per
token, sampling and per-sequence stopping on eos.

With left padding, every row's prompt ends at cache slot P - 1 (P = the longest prompt, or its
bucket when the prefill is a CUDA graph) and
generated token t goes to slot P + t in every row; rotary positions count real tokens only,
as transformers does with an attention mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from fnlm.errors import ArgumentError
from fnlm.generate.sampling import Sampling, check_max_new_tokens, choose
from fnlm.generate.step import (
    cache_length,
    compiles,
    decode_state,
    keep,
    prefill_fn,
    prompt_length,
    will_capture,
)
from fnlm.lora import Lora, with_adapters
from fnlm.params import Params

CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn}


@torch.no_grad()  # adapters attached, decode state and graphs made without autograd too
def generate_tokens(
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    lora: Lora | None = None,
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[int, int], bool] | None = None,
    cache_dtype: torch.dtype | str | None = None,
    pad_token_id: int = 0,
    compile: bool | None = None,
    **knobs,
) -> list[list[int]]:
    """Generate from token-id prompts; returns each row's new ids (ending with the eos that
    stopped it, if one did).

    prompts: one list of ids per sequence (batched with left padding by `pad_token_id`).
    sampling: a `Sampling` (default greedy); keyword `knobs` (temperature=, top_p=, top_k=,
        min_p=, repetition_penalty=, seed=) replace its fields.
    on_token(row, id) is called for each new non-eos id of a running row; returning True stops
        that row (stop strings). A row also stops at any of `eos_token_ids`, after
        `max_new_tokens`, or at the model's context length (max_position_embeddings).
    compile: torch.compile the layers of the prefill and the decode step (default: on CUDA; the
        batch, prompt and cache lengths are dynamic dimensions, so a call at a new length
        compiles nothing). On CUDA the step is captured in a CUDA graph unless the model reads
        device values on the host (`graphable`), and so is the prefill of prompts left padded to
        a bucketed length (`prompt_length`); the graphs are kept for the next call of the same
        batch, cache-length and prompt-length buckets.
    Raises ArgumentError naming a bad argument.
    """
    config = params.config
    check_max_new_tokens(max_new_tokens)
    sampling = Sampling.of(sampling, **knobs)
    prompts = check_prompts(prompts, config.vocab_size, config.max_position_embeddings)
    eos = {int(i) for i in eos_token_ids}
    base = params
    params = with_adapters(params, lora)
    device = params["norm"].device
    on_cuda = device.type == "cuda"
    compile = on_cuda if compile is None else compile
    dtype = check_cache_dtype(cache_dtype, params)

    # On CUDA the prefill and the decode step run as CUDA graphs where the model allows; a
    # captured prefill takes the prompts left padded to a bucketed length (`prompt_length`).
    graphed = will_capture(params)
    batch, longest = len(prompts), max(len(p) for p in prompts)
    steps = min(max_new_tokens, config.max_position_embeddings - longest)
    prompt_len = prompt_length(longest) if graphed else longest
    tokens = torch.full((batch, prompt_len), pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, prompt_len), dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, prompt_len - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, prompt_len - len(ids) :] = 1
    tokens, mask = tokens.to(device), mask.to(device)
    padded = mask if graphed or not bool(mask.all()) else None
    # The last decode step's own k, v are never read, so the cache needs prompt_len + steps - 1;
    # compiled and captured steps take a bucketed length (shared by calls of similar lengths).
    max_len = prompt_len + steps
    if compile or on_cuda:
        max_len = cache_length(max_len)
    generator = sampling.generator(device)

    out: list[list[int]] = [[] for _ in range(batch)]
    running = [True] * batch
    state = decode_state(
        params, base, batch, max_len, attention_mask=padded, dtype=dtype, compile=compile,
        variant=getattr(lora, "training", None),  # adapters' dropout on or off
    )  # fmt: skip
    with _kept(state):
        if graphed:
            logits = state.prefill(tokens, mask)
        else:  # compiled as the step is
            run_prefill = prefill_fn(compiles(params, compile))
            logits, _ = run_prefill(params, tokens, state.cache, attention_mask=padded)
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
            real = mask.bool()
            rows = torch.arange(batch, device=device)[:, None].expand_as(tokens)
            seen[rows[real], tokens[real]] = True
        # static input buffers of the decode step (a CUDA graph reads them at fixed addresses)
        state.positions.copy_(mask.sum(1, keepdim=True))  # real tokens so far = next position
        state.slot.fill_(prompt_len)
        for t in range(steps):
            next_tokens = choose(logits, sampling, seen=seen, generator=generator)
            if seen is not None:
                seen.scatter_(1, next_tokens[:, None], True)
            on_host = next_tokens.to("cpu", non_blocking=on_cuda)
            ready = torch.cuda.Event() if on_cuda else None
            if ready is not None:
                ready.record()
            if t + 1 < steps:  # queue step t + 1 before the host looks at token t
                state.tokens.copy_(next_tokens[:, None])
                if t > 0:
                    state.positions += 1
                    state.slot += 1
                logits = state.run()
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


@contextlib.contextmanager
def _kept(state):
    """Hand the decode state back to the graph cache when the call ends, however it ends."""
    try:
        yield state
    finally:
        keep(state)


def check_prompts(prompts, vocab_size: int, context: int) -> list[list[int]]:
    """The prompts as lists of ints; ArgumentError for an empty batch, an empty prompt, ids
    outside the vocabulary or a prompt that leaves no room in the model's context."""
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


def check_cache_dtype(cache_dtype, params: Params) -> torch.dtype:
    """The cache dtype for `cache_dtype` (None: the params' dtype; "fp8"; a torch float dtype)."""
    if cache_dtype is None:
        return params["norm"].dtype
    if isinstance(cache_dtype, str) and cache_dtype in CACHE_DTYPES:
        return CACHE_DTYPES[cache_dtype]
    if isinstance(cache_dtype, torch.dtype) and cache_dtype.is_floating_point:
        return cache_dtype
    raise ArgumentError(
        f"cache_dtype must be None (the params' dtype), 'fp8' or a torch float dtype; "
        f"got {cache_dtype!r}"
    )
