"""fnlm serve: the real `openai` client against the server on 127.0.0.1, outputs equal to
`fnlm.generate` on the same model (greedy, and seeded sampling); continuous batching under load;
bad requests answered 4xx with OpenAI-style errors while the server keeps serving."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import threading
import urllib.error
import urllib.request

import pytest
import torch
import transformers

import fnlm
import fnlm.lora
from fnlm.errors import ArgumentError, LoraError
from fnlm.generate import Sampling, generate_tokens
from fnlm.serve import Engine, Request, Server
from tests.models import saved_checkpoint
from tests.test_generate import CharTokenizer, random_lora, tiny_llama

# The HTTP tests need the test extra's openai, starlette and uvicorn; the engine's do not.
HTTP = all(importlib.util.find_spec(name) for name in ("openai", "starlette", "uvicorn"))
openai = importlib.import_module("openai") if HTTP else None


def need_http() -> None:
    if not HTTP:
        pytest.skip("needs openai, starlette and uvicorn (pip install -e '.[test]')")


pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

CONTEXT = 96
SLOTS = 8
# The bounded load test: 32 concurrent clients, 4 requests each, over 8 engine rows, so requests
# wait, join the running decode and leave it; 12 new tokens each keeps it near a second on CPU.
CLIENTS, REQUESTS_PER_CLIENT, LOAD_TOKENS = 32, 4, 12


class Tok(CharTokenizer):
    eos_token_ids = (10,)  # "\n" ends a sequence


@pytest.fixture(scope="module")
def tiny():
    with saved_checkpoint(tiny_llama(max_position_embeddings=CONTEXT)) as (_, directory):
        params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu")
    return params, Tok(), random_lora(params)


@pytest.fixture(scope="module")
def server(tiny):
    need_http()
    params, tok, lora = tiny
    engine = Engine(params, tok, adapters={"tiny-pirate": lora}, slots=SLOTS)
    with Server(engine, "tiny") as url:
        yield engine, url
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0)


def test_models_are_listed(client):
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-pirate"]
    assert client.models.retrieve("tiny-pirate").id == "tiny-pirate"


def test_completion_equals_generate(tiny, client):
    params, tok, _ = tiny
    for prompt in ("Hello", "The capital of France is", "x"):
        answer = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0
        )
        text, ids = fnlm.generate(params, tok, prompt, max_new_tokens=20, return_tokens=True)
        assert answer.choices[0].text == text
        assert answer.choices[0].finish_reason == ("stop" if ids[-1] == 10 else "length")
        assert answer.usage.completion_tokens == len(ids)
        assert answer.usage.prompt_tokens == len(prompt)
    # several prompts and n: one choice each, in order
    many = client.completions.create(
        model="tiny", prompt=["ab", "cde"], n=2, max_tokens=8, temperature=0
    )
    expected = fnlm.generate(params, tok, ["ab", "cde"], max_new_tokens=8)
    assert [c.text for c in many.choices] == [expected[0]] * 2 + [expected[1]] * 2
    assert [c.index for c in many.choices] == [0, 1, 2, 3]


def test_chat_and_adapter_selection(tiny, client):
    params, tok, lora = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    texts = {}
    for model, adapter in (("tiny", None), ("tiny-pirate", lora)):
        answer = client.chat.completions.create(
            model=model, messages=messages, max_tokens=24, temperature=0
        )
        assert answer.choices[0].message.role == "assistant"
        texts[model] = answer.choices[0].message.content
        assert texts[model] == fnlm.generate(params, tok, messages, lora=adapter, max_new_tokens=24)
    assert texts["tiny"] != texts["tiny-pirate"]


def test_streaming_equals_the_whole_answer(tiny, client):
    params, tok, _ = tiny
    messages = [{"role": "user", "content": "Tell me"}]
    whole = fnlm.generate(params, tok, messages, max_new_tokens=30)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=30, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole
    assert sum(1 for p in pieces if p) > 1  # really streamed, not one piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= len(whole)
    stream = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=30, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in stream)
    assert text == fnlm.generate(params, tok, "Hello", max_new_tokens=30)


def test_stop_strings_and_seeded_sampling(tiny, client):
    params, tok, _ = tiny
    full = fnlm.generate(params, tok, "Hello", max_new_tokens=30)
    stop = full[8:10]
    answer = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=30, temperature=0, stop=[stop, "\x7f\x7f"]
    )
    assert answer.choices[0].text == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    knobs = dict(temperature=1.3, top_p=0.9, seed=11)
    sampled = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, **knobs)
    assert sampled.choices[0].text == fnlm.generate(
        params, tok, "Hello", max_new_tokens=20, **knobs
    )
    extras = dict(top_k=5, repetition_penalty=1.3)
    with_extras = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=20, extra_body=extras, **knobs
    )
    assert with_extras.choices[0].text == fnlm.generate(
        params, tok, "Hello", max_new_tokens=20, **knobs, **extras
    )


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    _, url = server
    cases = [
        (dict(model="nope", prompt="x"), openai.NotFoundError, "model_not_found"),
        (dict(model="tiny", prompt="x", max_tokens=-3), openai.BadRequestError, "invalid_value"),
        (dict(model="tiny", prompt="y" * CONTEXT), openai.BadRequestError,
         "context_length_exceeded"),
        (dict(model="tiny", prompt="x", temperature=5), openai.BadRequestError, "invalid_value"),
        (dict(model="tiny", prompt="x", seed=-1), openai.BadRequestError, "invalid_value"),
        (dict(model="tiny", prompt="x", logprobs=2), openai.BadRequestError, None),
        (dict(model="tiny", prompt=[]), openai.BadRequestError, None),
    ]  # fmt: skip
    for kwargs, error, code in cases:
        with pytest.raises(error) as caught:
            client.completions.create(**kwargs)
        assert set(caught.value.body) >= {"message", "type", "param", "code"}
        assert caught.value.body["code"] == code
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"content": "no role"}])
    for body in (b"{not json", b"[1, 2]", b"\xff"):
        status, error = raw_request(f"{url}/chat/completions", body)
        assert status == 400 and error["type"] == "invalid_request_error"
    status, error = raw_request(f"{url}/nowhere")
    assert status == 404 and error["message"]
    answer = client.completions.create(model="tiny", prompt="ok", max_tokens=3, temperature=0)
    assert len(answer.choices[0].text) > 0


def test_a_client_leaving_a_stream_frees_its_row(server, client):
    import time

    engine, _ = server
    before = engine.steps_run
    stream = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=CONTEXT - 6, temperature=0, stream=True,
        stop=["\x7f\x7f\x7f"],
    )  # fmt: skip
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while any(row is not None for row in engine.rows) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(row is None for row in engine.rows)
    assert engine.steps_run - before < CONTEXT - 7  # left before its last token
    answer = client.completions.create(model="tiny", prompt="ok", max_tokens=3, temperature=0)
    assert answer.choices[0].text


def raw_request(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """(status, the error object) of a request the openai client would not send."""
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]


def test_concurrent_clients_share_the_decode(tiny, server):
    """CLIENTS x REQUESTS_PER_CLIENT greedy requests at once over SLOTS rows: each answer equals
    its single-request `fnlm.generate`, and rows were decoded together."""
    params, tok, lora = tiny
    engine, url = server
    jobs = [
        (f"q{c}-{r} " + "abcdefgh"[: (c + r) % 8], "tiny-pirate" if c % 5 == 0 else "tiny")
        for c in range(CLIENTS) for r in range(REQUESTS_PER_CLIENT)
    ]  # fmt: skip
    expected = {
        (prompt, model): fnlm.generate(
            params,
            tok,
            prompt,
            max_new_tokens=LOAD_TOKENS,
            lora=lora if model == "tiny-pirate" else None,
        )  # fmt: skip
        for prompt, model in jobs
    }

    async def run_client(aclient, c):
        out = []
        for prompt, model in jobs[c * REQUESTS_PER_CLIENT : (c + 1) * REQUESTS_PER_CLIENT]:
            answer = await aclient.completions.create(
                model=model, prompt=prompt, max_tokens=LOAD_TOKENS, temperature=0
            )
            out.append(((prompt, model), answer.choices[0].text))
        return out

    async def main():
        aclient = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        async with aclient:
            return await asyncio.wait_for(
                asyncio.gather(*(run_client(aclient, c) for c in range(CLIENTS))), 300
            )

    before = engine.steps_run
    answers = [item for out in asyncio.run(main()) for item in out]
    assert len(answers) == CLIENTS * REQUESTS_PER_CLIENT
    for key, text in answers:
        assert text == expected[key], key
    assert engine.most_rows == SLOTS
    # shared steps: far fewer than one decode step per generated token
    assert engine.steps_run - before < len(answers) * LOAD_TOKENS / 3


# ----------------------------------------------------------------------------------------------
# The engine alone: families with sliding windows and soft-capping, rows joining mid-decode


def run_engine(engine, jobs, adapters=None):
    """Submit (prompt ids, max_tokens, sampling) jobs at once (on `adapters`, one name or None
    per job); their Results in order."""
    done = threading.Semaphore(0)
    results = [None] * len(jobs)

    def on_event(index, kind, data):
        if kind != "piece":
            results[index] = data
            done.release()

    for index, (prompt, max_tokens, sampling) in enumerate(jobs):
        engine.submit(Request(
            prompt=prompt, max_tokens=max_tokens, sampling=sampling,
            adapter=None if adapters is None else adapters[index],
            on_event=lambda kind, data, index=index: on_event(index, kind, data),
        ))  # fmt: skip
    for _ in jobs:
        assert done.acquire(timeout=120)
    return results


def greedy_jobs(seed, count, *, vocab, longest, most, adapter_every):
    """`count` greedy jobs for run_engine with random prompts of 1..longest ids and 2..most new
    tokens; every `adapter_every`-th (from the second) on adapter "a", the others on the base."""
    g = torch.Generator().manual_seed(seed)
    jobs, adapters = [], []
    for i in range(count):
        length = int(torch.randint(1, longest + 1, (1,), generator=g))
        prompt = torch.randint(1, vocab, (length,), generator=g).tolist()
        jobs.append((prompt, int(torch.randint(2, most + 1, (1,), generator=g)), Sampling()))
        adapters.append("a" if i % adapter_every == 1 else None)
    return jobs, adapters


def assert_generate_answers(params, lora, jobs, adapters, results) -> None:
    """Each greedy job's Result is its single-request generate_tokens answer (on `lora` where
    its adapter is named)."""
    for (prompt, max_tokens, _), adapter, result in zip(jobs, adapters, results, strict=True):
        expected = generate_tokens(
            params, [prompt], max_new_tokens=max_tokens, lora=lora if adapter else None
        )[0]
        assert result.token_ids == expected, (prompt, adapter)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_engine_rows_equal_generate_tokens(family):
    small = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=48, initializer_range=0.2)  # fmt: skip
    if family == "mistral":
        hf_config = transformers.MistralConfig(**small, sliding_window=5)
    else:
        hf_config = transformers.Gemma2Config(**small, sliding_window=5, query_pre_attn_scalar=16)
    with saved_checkpoint(hf_config) as (_, directory):
        params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu")
    engine = Engine(params, None, slots=3, context=48)
    try:
        g = torch.Generator().manual_seed(0)
        jobs = []
        for i in range(7):  # more jobs than rows: later ones join while others decode
            prompt = torch.randint(0, 128, (int(torch.randint(1, 12, (1,), generator=g)),),
                                   generator=g).tolist()  # fmt: skip
            sampling = Sampling(temperature=0.9, seed=i) if i % 3 == 2 else Sampling()
            jobs.append((prompt, [30, 5, 12][i % 3] if i != 6 else None, sampling))
        results = run_engine(engine, jobs)
    finally:
        engine.close()
    for (prompt, max_tokens, sampling), result in zip(jobs, results, strict=True):
        expected = generate_tokens(
            params, [prompt], max_new_tokens=max_tokens or 48, sampling=sampling
        )[0]
        assert result.token_ids == expected
        assert result.finish_reason == "length"
    assert len(results[6].token_ids) == 48 - len(jobs[6][0])  # up to the context


def test_engine_steps_only_the_running_rows(tiny):
    """Each step runs over the smallest width bucket holding the running rows, which are kept in
    the first rows (a leaving row's place is filled by moving a later row and its cached tokens):
    answers still equal generate_tokens; a lone request is decoded at width 1."""
    params, _, lora = tiny
    engine = Engine(params, None, adapters={"a": lora}, slots=6)
    assert engine.widths == [1, 2, 4, 6]
    seen_widths, moves = [], []
    step_fn, move = engine._step_fn, engine._move

    def recording_step_fn(adapter, width):
        running = [i for i, row in enumerate(engine.rows) if row is not None]
        if running:  # not the warm-up steps
            seen_widths.append(width)
            assert max(running) < width
            assert width == min(w for w in engine.widths if w >= len(running))
        return step_fn(adapter, width)

    engine._step_fn = recording_step_fn
    engine._move = lambda source, target: moves.append((source, target)) or move(source, target)
    try:
        jobs, adapters = greedy_jobs(3, 14, vocab=128, longest=19, most=23, adapter_every=4)
        results = run_engine(engine, jobs, adapters)
        assert moves and len(set(seen_widths)) > 1
        seen_widths.clear()
        alone = run_engine(engine, [([5, 6, 7], 9, Sampling())])[0]
        assert seen_widths == [1] * 8  # the first token comes from the prefill
    finally:
        engine.close()
    assert_generate_answers(params, lora, jobs, adapters, results)
    assert alone.token_ids == generate_tokens(params, [[5, 6, 7]], max_new_tokens=9)[0]


def test_engine_with_an_fp8_cache_equals_generate_tokens(tiny):
    """An fp8 cache: prompts copied into rows and rows moved byte for byte (index_copy_ has no
    fp8 kernels), the answers generate_tokens gives with the same cache dtype."""
    params, _, _ = tiny
    engine = Engine(params, None, slots=2, cache_dtype=torch.float8_e4m3fn)
    try:
        jobs = [([5, 6, 7], 3, Sampling()), ([9, 1], 12, Sampling()), ([4] * 5, 6, Sampling())]
        results = run_engine(engine, jobs)
    finally:
        engine.close()
    for (prompt, max_tokens, _), result in zip(jobs, results, strict=True):
        expected = generate_tokens(
            params, [prompt], max_new_tokens=max_tokens, cache_dtype=torch.float8_e4m3fn
        )
        assert result.token_ids == expected[0]


@pytest.mark.filterwarnings("ignore:.*no tokenizer.json", "ignore:.*flash-linear-attention")
@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3_5_moe_text"])
def test_engine_rows_with_deltanet_states_equal_generate_tokens(model_type):
    """Qwen3.5's gated DeltaNet layers keep a conv and a recurrent state per row: a joining
    request's prefill starts from zero states, a moved row takes its states along, and passes of
    different adapters each start from the step's states. Requests of many lengths over 3 rows
    (rows leave, later ones move down, new ones join mid-decode, base and adapter rows mixed):
    every answer is its single-request generate_tokens answer."""
    from tests.test_qwen3_5 import TINY, TINY_MOE

    fields = {**(TINY if model_type == "qwen3_5_text" else TINY_MOE), "max_position_embeddings": 48}
    config = (transformers.Qwen3_5TextConfig if model_type == "qwen3_5_text"
              else transformers.Qwen3_5MoeTextConfig)(**fields)  # fmt: skip
    with saved_checkpoint(config) as (_, directory):
        params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu")
    # adapters on the DeltaNet projections too: base and adapter passes update states differently
    lora = fnlm.lora.init(params, r=4, alpha=8, seed=1, targets=("in_qkv", "in_z", "in_b", "q"))
    with torch.no_grad():
        for t in fnlm.lora.parameters(lora):
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())) * 0.3)
    engine = Engine(params, None, adapters={"a": lora}, slots=3)
    moves, move = [], engine._move
    engine._move = lambda source, target: moves.append((source, target)) or move(source, target)
    try:
        jobs, adapters = greedy_jobs(5, 9, vocab=96, longest=13, most=15, adapter_every=3)
        results = run_engine(engine, jobs, adapters)
        assert moves and engine.most_rows == 3
    finally:
        engine.close()
    assert_generate_answers(params, lora, jobs, adapters, results)


@pytest.mark.gpu
def test_engine_on_cuda_equals_generate_tokens():
    """The ring step on CUDA (eager: the engine does not capture it, see Engine._step_fn): rows
    joining mid-decode get generate_tokens' ids. On the H200 (2026-12-03) the eager step gave
    them for all 7 requests; the captured one, as the process's first graphs, did not."""
    with saved_checkpoint(tiny_llama(max_position_embeddings=64)) as (_, directory):
        params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cuda")
    engine = Engine(params, None, slots=3, compile=False)
    try:
        jobs = [
            ([i + 1, 2 * i + 3, 7][: 1 + i % 3], [20, 6, 9][i % 3], Sampling()) for i in range(7)
        ]
        results = run_engine(engine, jobs)
        assert engine._steps  # a step per width, kept
    finally:
        engine.close()
    for (prompt, max_tokens, _), result in zip(jobs, results, strict=True):
        assert result.token_ids == generate_tokens(params, [prompt], max_new_tokens=max_tokens)[0]


class _CapturedEngine(Engine):
    """The engine with its ring step captured as a CUDA graph, as it was before 2026-12-03 (see
    Engine._step_fn): what this file's GPU test checks before the engine captures again."""

    def _step_fn(self, adapter, width):
        from fnlm.generate.step import capture

        key = ("captured", adapter, width)
        if key not in self._steps:
            self._steps[key] = capture(super()._step_fn(adapter, width))
        return self._steps[key]


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["captured first", "after an eager engine"])
def test_captured_ring_step_on_cuda_equals_generate_tokens(order):
    """The ring step captured as a CUDA graph gives generate_tokens' ids for 7 requests over 3
    slots, whether its captures are the process's first graphs or an eager engine ran before (on
    2026-12-03 the first order failed on an H200; on 2026-12-04, at 3a12d5d, neither did)."""
    with saved_checkpoint(tiny_llama(max_position_embeddings=64)) as (_, directory):
        params, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cuda")
    jobs = [([i + 1, 2 * i + 3, 7][: 1 + i % 3], [20, 6, 9][i % 3], Sampling()) for i in range(7)]
    engines = [Engine, _CapturedEngine] if order == "after an eager engine" else [_CapturedEngine]
    for kind in engines:
        engine = kind(params, None, slots=3, compile=False)
        try:
            results = run_engine(engine, jobs)
        finally:
            engine.close()
        for (prompt, max_tokens, _), result in zip(jobs, results, strict=True):
            want = generate_tokens(params, [prompt], max_new_tokens=max_tokens)[0]
            assert result.token_ids == want, (kind.__name__, prompt)


def test_engine_refuses_bad_requests(tiny):
    params, tok, _ = tiny
    with pytest.raises(ArgumentError, match="context"):
        Engine(params, tok, context=CONTEXT + 1)
    with pytest.raises(ArgumentError, match="slots"):
        Engine(params, tok, slots=0)
    with saved_checkpoint(tiny_llama(hidden_size=32, head_dim=8)) as (_, directory):
        other, _ = fnlm.load(directory, quant=None, dtype=torch.float32, device="cpu")
    with pytest.raises(
        LoraError, match=r"adapters\['other'\]: adapter layers.0.attn.q: .* \(64, 64\)"
    ):
        Engine(
            params, tok, adapters={"a": random_lora(params), "other": fnlm.lora.init(other, r=2)}
        )
    engine = Engine(params, tok, slots=1)
    try:
        with pytest.raises(ArgumentError, match="adapter"):
            engine.submit(Request(prompt=[1], on_event=print, adapter="x"))
        with pytest.raises(ArgumentError, match="context"):
            engine.submit(Request(prompt=[1] * CONTEXT, on_event=print))
    finally:
        engine.close()


def test_embedded_model_chat_over_http_equals_generate():
    """The real SmolLM2-135M-Instruct (fp32): the chat answer over HTTP is fnlm.generate's."""
    need_http()
    params, tok = fnlm.load(quant=None, dtype=torch.float32, device="cpu")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = fnlm.generate(params, tok, messages, max_new_tokens=16)
    engine = Engine(params, tok, slots=2, context=256)
    try:
        with Server(engine, "smollm2") as url:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
            answer = client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=16, temperature=0
            )
    finally:
        engine.close()
    assert answer.choices[0].message.content == expected
    assert "Paris" in expected
