"""`gpt2lab serve`: load a model, start the engine, run the HTTP app under uvicorn until Ctrl-C or
SIGTERM (uvicorn stops accepting, lets in-flight requests finish for --grace seconds, then the
engine ends the rest)."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

from ..errors import ConfigError, GPT2LabError
from ..hub import is_hub_name
from ..quantize import Mode
from . import Model

INSTALL = "gpt2lab serve needs its extra: pip install 'gpt2lab[serve]' (FastAPI, uvicorn, prometheus-client)"


def serve(model: Model, /, *, host: str = "127.0.0.1", port: int = 8000, mode: Mode = "fp32",
          api_key: str | None = None, model_name: str | None = None, chat_template: Path | None = None,
          cors_origins: list[str] | None = None, max_batch: int = 64,
          max_queue: int = 256, max_prompt_tokens: int | None = None, max_tokens: int | None = None,
          max_n: int = 16, max_body_bytes: int = 4 << 20, max_streams: int = 256, grace: float = 10.0,
          device: str = "auto") -> None:
    """Serve a model over HTTP: OpenAI's Completions API, a playground at /, /health and /metrics.

    Args:
        model: a gpt2lab checkpoint, a training run folder, an HF GPT-2 folder, or a Hub name (gpt2, owner/name[@rev])
        host: the address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)
        port: the TCP port
        mode: fp32; bf16 weights; or int8 weight-only quantization (faster on CPU, see the generation guide)
        api_key: require `Authorization: Bearer KEY` on everything but /health and the playground's page
            (default: $GPT2LAB_API_KEY, else no key)
        model_name: the name clients ask for (default: the model folder's name, or the Hub name as given)
        chat_template: a Jinja2 template that turns chat messages into a prompt: serves /v1/chat/completions
        cors_origins: origins whose pages may call the API (repeatable; default: none, CORS off)
        max_batch: sequences generated together (the KV cache holds this many)
        max_queue: sequences waiting for a place in the batch; more get 429 with Retry-After
        max_prompt_tokens: tokens one prompt may have (default: the model's context)
        max_tokens: tokens one choice may generate (default: the model's context)
        max_n: choices per prompt (n)
        max_body_bytes: size of a request body
        max_streams: streaming responses open at once; more get 429
        grace: seconds in-flight requests get to finish after Ctrl-C or SIGTERM
        device: auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps
    """
    try:
        import uvicorn

        from ..serve.app import Limits, create_app
        from ..serve.engine import Engine
    except ImportError:
        raise GPT2LabError(INSTALL) from None
    from ..generate import Generator

    for name, value in [("--port", port), ("--max-batch", max_batch), ("--max-queue", max_queue),
                        ("--max-n", max_n), ("--max-body-bytes", max_body_bytes), ("--max-streams", max_streams)]:
        if value < (0 if name == "--port" else 1) or (name == "--port" and value > 65535):
            raise ConfigError(f"{name} must be {'0..65535' if name == '--port' else 'positive'}, got {value}")
    if not 0 <= grace < float("inf"):
        raise ConfigError(f"--grace must be a number of seconds, got {grace}")
    template = _read_template(chat_template)
    _check_port(host, port)
    gen = Generator.load(model, mode=mode, device=device)
    n_ctx = gen.model.config.n_ctx
    limits = Limits(max_prompt_tokens=_upto(max_prompt_tokens, n_ctx, "--max-prompt-tokens"),
                    max_tokens=_upto(max_tokens, n_ctx, "--max-tokens"), max_n=max_n,
                    max_body_bytes=max_body_bytes, max_streams=max_streams)
    engine = Engine(gen.model, gen.tokenizer, max_batch=max_batch, max_waiting=max_queue).start()
    local = Path(model).exists() or not is_hub_name(model)
    name = model_name or (Path(model).resolve().name if local else model)  # a Hub model by its own name
    key = api_key if api_key is not None else os.environ.get("GPT2LAB_API_KEY") or None
    app = create_app(engine, gen.tokenizer, model_name=name, api_key=key, cors_origins=cors_origins or (),
                     limits=limits, chat_template=template)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"gpt2lab serve: {name} ({mode}) on {where} - playground at /, API at /v1"
          f"{', API key required' if key else ''}; Ctrl-C stops", file=sys.stderr, flush=True)
    # On Ctrl-C or SIGTERM uvicorn stops accepting and waits for open connections; after `grace`
    # seconds the engine ends what still runs, so each stream gets an error event and [DONE]
    # before uvicorn's own deadline would cut the connections.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace + 5,
                            lifespan="on")

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            if not self.should_exit:
                timer = threading.Timer(grace, engine.stop)
                timer.daemon = True  # the process may end before it fires: nothing is left to stop then
                timer.start()
            super().handle_exit(sig, frame)

    Server(config).run()
    engine.stop()


def _read_template(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read --chat-template {path}: {getattr(e, 'strerror', None) or e}") from None
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().from_string(text)
    except TemplateSyntaxError as e:
        raise ConfigError(f"--chat-template {path} line {e.lineno}: {e.message}") from None
    return text


def _upto(value: int | None, n_ctx: int, flag_name: str) -> int:
    if value is None:
        return n_ctx
    if not 1 <= value <= n_ctx:
        raise ConfigError(f"{flag_name} must be from 1 to the model's context of {n_ctx}, got {value}")
    return value


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is taken before the model is loaded (uvicorn would exit with a log line)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host} is not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port, or stop "
                              "what is using it") from None
