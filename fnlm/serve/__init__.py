"""`fnlm serve`: an OpenAI-compatible local server over a model and its LoRA adapters.

    params, tok = fnlm.load()
    engine = Engine(params, tok, adapters={"pirate": fnlm.lora.load("runs/demo/adapter", params)})
    serve(engine, "smollm2", port=8000)     # blocks; OpenAI clients use http://127.0.0.1:8000/v1

    with Server(engine, "smollm2") as url:  # in a background thread (tests, notebooks)
        openai.OpenAI(base_url=url, api_key="-").chat.completions.create(...)

Two parts: `engine` (continuous batching over the static cache's rows, no HTTP) and `app` (the
OpenAI routes on starlette). Needs the `serve` extra: `pip install fnlm[serve]`.
"""

from __future__ import annotations

import socket
import threading

from fnlm.serve.engine import Engine, Request, Result

__all__ = ["Engine", "Request", "Result", "Server", "create_app", "serve"]


def create_app(engine: Engine, name: str):
    """The starlette app (see fnlm.serve.app)."""
    from fnlm.serve.app import create_app as create  # starlette: the optional `serve` extra

    return create(engine, name)


def serve(engine: Engine, name: str, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:  # fmt: skip
    """Serve `engine` with uvicorn until interrupted; the base model is called `name`."""
    import uvicorn  # the optional `serve` extra

    uvicorn.run(create_app(engine, name), host=host, port=port, log_level=log_level)


class Server:
    """uvicorn serving `engine` from a background thread on `host` and a free port (or `port`);
    `with Server(...) as url` gives the base URL ("http://127.0.0.1:PORT/v1") and stops the server
    on exit (the engine stays open: close it yourself)."""

    def __init__(self, engine: Engine, name: str, *, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(create_app(engine, name), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it started")
            self.thread.join(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()
