"""The OpenAI-compatible HTTP face of an `Engine`: /v1/chat/completions, /v1/completions,
/v1/models, with streaming as server-sent events, on starlette (served by uvicorn).

The base model is served under its name and each adapter under its own: a request picks one with
`model`. Understood fields: messages / prompt (a string, a list of strings or a list of token
ids), max_tokens (max_completion_tokens), temperature, top_p, seed, stop, n, stream,
stream_options.include_usage, and as extras top_k, min_p, repetition_penalty. Fields that would
change the output but are not implemented (logprobs, presence/frequency penalties, tools,
response_format) are refused with 400 rather than ignored. Errors are OpenAI-style JSON:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from fnlm.errors import ArgumentError, FnlmError
from fnlm.generate.sampling import Sampling
from fnlm.generate.text import render_chat
from fnlm.serve.engine import Engine, Request, Result

MAX_STOPS = 4  # as OpenAI
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "response_format", "logit_bias")
PENALTIES = ("presence_penalty", "frequency_penalty")


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP `status` and {"error": {...}}."""

    def __init__(self, status: int, message: str, *, param=None, code=None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind,
        )  # fmt: skip

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def create_app(engine: Engine, name: str) -> Starlette:
    """A starlette app serving `engine`: the base model as `name`, each adapter by its name."""
    models = {name: None, **{a: a for a in engine.adapter_names}}
    created = int(time.time())

    def card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "fnlm"}

    async def list_models(_request: HttpRequest) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [card(m) for m in models]})

    async def get_model(request: HttpRequest) -> JSONResponse:
        model_id = request.path_params["model"]
        if model_id not in models:
            raise _unknown_model(model_id, models)
        return JSONResponse(card(model_id))

    async def chat(request: HttpRequest):
        return await _complete(engine, models, await _body(request), chat=True)

    async def completions(request: HttpRequest):
        return await _complete(engine, models, await _body(request), chat=False)

    async def api_error(_request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def http_error(_request, exc: HTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    async def server_error(_request, exc: Exception) -> JSONResponse:
        message = f"{type(exc).__name__}: {exc}"
        return ApiError(500, message, kind="server_error").response()

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={ApiError: api_error, HTTPException: http_error, 500: server_error},
    )


async def _body(request: HttpRequest) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _unknown_model(model, models) -> ApiError:
    return ApiError(
        404, f"The model {model!r} does not exist; this server has {sorted(models)}",
        param="model", code="model_not_found",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Reading a request


def _prompts(engine: Engine, body: dict, chat: bool) -> list[list[int]]:
    """Token ids of each prompt: the rendered conversation, or the completion prompt(s)."""
    tok = engine.tok
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of messages", param="messages")
        conversation = [_message(m, i) for i, m in enumerate(messages)]
        try:
            text = render_chat(tok, conversation, 0)
            return [tok.encode(text, add_special_tokens=False)]  # the template writes its bos
        except FnlmError as e:
            raise ApiError(400, str(e), param="messages") from None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(i) for i in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(
            400, "prompt must be a string, a list of strings or a list of token ids", param="prompt"
        )
    ids = []
    for p in prompt:
        if isinstance(p, str):
            ids.append(tok.encode(p, add_special_tokens=True))
        elif isinstance(p, list) and p and all(_is_int(i) for i in p):
            ids.append(list(p))
        else:
            raise ApiError(400, f"prompt entries must be strings or token-id lists, got {p!r}",
                           param="prompt")  # fmt: skip
    vocab = engine.params.config.vocab_size
    for p in ids:
        if any(not 0 <= i < vocab for i in p):
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
    return ids


def _message(m, index: int) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, f"messages[{index}] must be an object with a role", param="messages")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text is understood
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, f"messages[{index}]: only text content parts are supported",
                               param="messages")  # fmt: skip
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{index}].content must be a string", param="messages")
    return {"role": m["role"], "content": content}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _options(body: dict, chat: bool) -> dict:
    """max_tokens, sampling, stop, n and stream of a request, checked."""
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, [], {}, {"type": "text"}):
            raise ApiError(400, f"{key} is not supported by this server", param=key)
    for key in PENALTIES:
        if body.get(key) not in (None, 0, 0.0):
            raise ApiError(400, f"{key} is not supported (use repetition_penalty)", param=key)
    max_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(max_key)
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise ApiError(400, f"{max_key} must be a positive integer, got {max_tokens!r}",
                       param=max_key, code="invalid_value")  # fmt: skip
    knobs = {}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        if body.get(key) is not None:
            knobs[key] = body[key]
    temperature = knobs.get("temperature", 1.0)  # OpenAI's default is 1
    if isinstance(temperature, int | float) and not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must lie in [0, 2], got {temperature!r}",
                       param="temperature", code="invalid_value")  # fmt: skip
    knobs["temperature"] = temperature
    try:
        sampling = Sampling(**knobs)
    except ArgumentError as e:
        raise ApiError(400, str(e), param=str(e).split()[0], code="invalid_value") from None
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS}",
                       param="stop")  # fmt: skip
    n = body.get("n", 1)
    if not _is_int(n) or not 1 <= n <= 16:
        raise ApiError(400, f"n must be an integer in [1, 16], got {n!r}", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", param="stream")
    usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    return dict(max_tokens=max_tokens, sampling=sampling, stop=stops, n=n, stream=stream,
                include_usage=usage)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Answering


async def _complete(engine: Engine, models: dict, body: dict, *, chat: bool):
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model is required (a name from /v1/models)", param="model")
    if model not in models:
        raise _unknown_model(model, models)
    options = _options(body, chat)
    prompts = _prompts(engine, body, chat)
    for p in prompts:
        if len(p) >= engine.context:
            raise ApiError(
                400, f"This model's maximum context length is {engine.context} tokens; the prompt "
                f"has {len(p)} tokens and leaves no room to generate. Shorten the prompt.",
                param="messages" if chat else "prompt", code="context_length_exceeded",
            )  # fmt: skip
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    requests = []
    for index in range(len(prompts) * options["n"]):
        put = lambda kind, data, index=index: loop.call_soon_threadsafe(
            events.put_nowait, (index, kind, data)
        )  # noqa: E731
        requests.append(Request(
            prompt=prompts[index // options["n"]], on_event=put, adapter=models[model],
            max_tokens=options["max_tokens"], sampling=options["sampling"], stop=options["stop"],
            stream=options["stream"],
        ))  # fmt: skip
    try:
        for request in requests:
            engine.submit(request)
    except ArgumentError as e:
        for request in requests:
            request.cancelled = True
        raise ApiError(400, str(e)) from None
    answer = _Answer(model, chat, len(requests))
    if options["stream"]:
        return StreamingResponse(
            _stream(answer, events, requests, options["include_usage"]),
            media_type="text/event-stream",
        )
    results: dict[int, Result] = {}
    try:
        while len(results) < len(requests):
            index, kind, data = await events.get()
            if kind == "error":
                raise ApiError(500, str(data), kind="server_error")
            if kind == "done":
                results[index] = data
    finally:
        for request in requests:
            request.cancelled = True  # no-op for finished ones; frees the rest
    return JSONResponse(answer.whole(results))


class _Answer:
    """The OpenAI response objects of one request."""

    def __init__(self, model: str, chat: bool, count: int):
        self.model, self.chat, self.count = model, chat, count
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def whole(self, results: dict[int, Result]) -> dict:
        choices = []
        for index in range(self.count):
            result = results[index]
            choice = {"index": index, "finish_reason": result.finish_reason, "logprobs": None}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice["text"] = result.text
            choices.append(choice)
        return {**self._head(self.object), "choices": choices, "usage": usage(results.values())}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None,
              first: bool = False) -> dict:  # fmt: skip
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}  # fmt: skip
        return {**self._head("text_completion"), "choices": [choice]}


def usage(results) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _stream(answer: _Answer, events: asyncio.Queue, requests: list[Request],
                  include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    results: dict[int, Result] = {}
    try:
        if answer.chat:
            for index in range(answer.count):
                yield _sse(answer.chunk(index, "", first=True))
        while len(results) < len(requests):
            index, kind, data = await events.get()
            if kind == "piece":
                yield _sse(answer.chunk(index, data))
            elif kind == "done":
                results[index] = data
                yield _sse(answer.chunk(index, None, finish_reason=data.finish_reason))
            else:
                error = {"message": str(data), "type": "server_error", "param": None, "code": None}
                yield _sse({"error": error})
                return
        if include_usage:
            yield _sse({**answer._head(answer.chunk(0, None)["object"]), "choices": [],
                        "usage": usage(results.values())})  # fmt: skip
        yield "data: [DONE]\n\n"
    finally:
        for request in requests:
            request.cancelled = True
