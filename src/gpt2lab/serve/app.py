"""The HTTP side of `gpt2lab serve`: OpenAI's Completions API over the engine, the playground,
health, Prometheus metrics and the remote-tokenizer endpoints lm-evaluation-harness uses.

Each request becomes one engine sequence per prompt and choice; the engine thread sends their
events to the request's asyncio queue. A client that goes away cancels its sequences: a stream
through Starlette cancelling the response, a plain request by polling for the disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from .engine import Engine, Event, QueueFull, Sampling, Seq
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Logprobs,
    Sampled,
    context_exceeded,
    parse,
    stops,
    usage,
)

PUBLIC = ("/health", "/", "/static/", "/favicon.ico")  # open without the API key (the playground asks for it)
POLL_S = 0.25  # how often a plain (non-streaming) request checks that its client is still there


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is a `gpt2lab serve` flag."""

    max_prompt_tokens: int = 1024
    max_tokens: int = 1024
    max_n: int = 16
    max_body_bytes: int = 4 << 20
    max_streams: int = 256


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("gpt2lab_requests_running", "Sequences in the running batch", registry=r).set_function(
            lambda: engine.running)
        Gauge("gpt2lab_requests_waiting", "Sequences waiting for a slot in the batch", registry=r).set_function(
            lambda: engine.waiting)
        self.prompt_tokens = Counter("gpt2lab_prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("gpt2lab_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("gpt2lab_http_requests", "API requests answered", ["status"], registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("gpt2lab_time_to_first_token_seconds", "Time from request to first token",
                              buckets=buckets, registry=r)
        self.per_token = Histogram("gpt2lab_time_per_output_token_seconds", "Time between generated tokens",
                                   buckets=buckets, registry=r)


@dataclass
class Choice:
    """One choice of a response while it is generated."""

    index: int
    prompt_text: str
    logprobs: Logprobs | None
    echo: bool
    started: float
    text: list[str] = field(default_factory=list)
    whole: dict[str, list[Any]] = field(default_factory=dict)  # every logprobs piece, for a whole response
    finish: str | None = None
    tokens: int = 0
    last: float | None = None  # when the previous token arrived

    def add(self, event: Event, at: float, metrics: Metrics) -> tuple[str, dict[str, Any] | None]:
        """The text and logprobs `event` adds to this choice (the echoed prompt first)."""
        text = event.text
        if self.echo and self.last is None:
            text = self.prompt_text + text
        if self.logprobs is not None:
            for t in event.prompt or ():
                self.logprobs.add(t.id, t.logprob, t.top)
            for t in event.tokens:
                self.logprobs.add(t.id, t.logprob, t.top)
        if event.tokens:
            n = len(event.tokens)
            if self.last is None:
                metrics.ttft.observe(at - self.started)
            else:
                metrics.per_token.observe((at - self.last) / n)
            metrics.generation_tokens.inc(n)
        self.last = at
        self.tokens += len(event.tokens)
        self.text.append(text)
        if event.finish_reason is not None:
            self.finish = "length" if event.finish_reason == "length" else "stop"
        if self.logprobs is None:
            return text, None
        piece = self.logprobs.take()
        for key, values in piece.items():
            self.whole.setdefault(key, []).extend(values)
        return text, piece


class Job:
    """One request's sequences, and the events the engine thread sends back for them."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event, float]] = asyncio.Queue()
        self.seqs: list[Seq] = []
        self.open = 0

    def listener(self, index: int) -> Any:
        def on_event(event: Event) -> None:  # in the engine thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event, time.perf_counter()))
            except RuntimeError:  # the event loop is gone: nobody is listening
                self.cancel()

        return on_event

    def add(self, seq: Seq) -> None:
        self.seqs.append(seq)
        self.open += 1

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, Event, float]]:
        """Events until every sequence has finished; with `request`, cancel when its client leaves
        (polled every POLL_S, whether or not events keep coming)."""
        checked = time.monotonic()
        while self.open:
            try:
                index, event, at = await asyncio.wait_for(self.queue.get(), timeout=POLL_S)
            except TimeoutError:
                event = None
            if request is not None and time.monotonic() - checked >= POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    self.cancel()
                    return
            if event is None:
                continue
            if event.finish_reason is not None:
                self.open -= 1
            yield index, event, at


class Server:
    """What the routes share: the engine, the tokenizer, the limits and the metrics."""

    def __init__(self, engine: Engine, tokenizer: Any, *, model_name: str, limits: Limits,
                 chat_template: str | None) -> None:
        self.engine, self.tokenizer, self.model_name, self.limits = engine, tokenizer, model_name, limits
        self.n_ctx = engine.n_ctx
        self.vocab_size = engine.model.config.vocab_size
        self.metrics = Metrics(engine)
        self.streams = 0
        self.chat_source, self.chat = chat_template, None
        if chat_template is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            self.chat = ImmutableSandboxedEnvironment().from_string(chat_template)

    # -- requests into sequences --

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def prompts(self, prompt: Any) -> list[list[int]]:
        """Token ids of each prompt, whatever form it came in."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is an empty list: give a string, strings, token ids or lists of them",
                           param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = self.tokenizer.encode(p, allowed_special="all") if isinstance(p, str) else list(p)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary 0..{self.vocab_size - 1}",
                               param="prompt")
            if len(ids) > self.limits.max_prompt_tokens:
                raise APIError(400, f"a prompt of {len(ids)} tokens is over this server's limit of "
                               f"{self.limits.max_prompt_tokens} (--max-prompt-tokens)", param="prompt")
            out.append(ids)
        return out

    def sampling(self, req: Sampled, prompt_len: int, max_tokens: int | None, *, logprobs: int | None,
                 prompt_logprobs: bool) -> Sampling:
        if max_tokens is None:
            max_tokens = min(self.n_ctx - prompt_len, self.limits.max_tokens)
        if max_tokens > self.limits.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {self.limits.max_tokens} "
                           "(--max-tokens)", param="max_tokens")
        if prompt_len + max_tokens > self.n_ctx:
            raise context_exceeded(self.n_ctx, prompt_len, max_tokens)
        bias = []
        for key, value in (req.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= self.vocab_size:
                raise APIError(400, f"logit_bias key {key!r} is not a token id 0..{self.vocab_size - 1}",
                               param="logit_bias")
            bias.append((int(key), value))
        return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                        top_k=max(req.top_k, 0), repetition_penalty=req.repetition_penalty,
                        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                        logit_bias=tuple(bias), seed=req.seed, stop=stops(req.stop), logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs, stop_at_eot=not req.ignore_eos)

    def start(self, prompts: list[list[int]], samplings: list[Sampling], n: int, *, echo: bool,
              logprobs: bool) -> tuple[Job, list[Choice]]:
        """Submit n sequences per prompt (choice index = prompt index * n + i); QueueFull becomes a 429."""
        if n > self.limits.max_n:
            raise APIError(400, f"n {n} is over this server's limit of {self.limits.max_n} (--max-n)", param="n")
        job, choices, now = Job(), [], time.perf_counter()
        for p, (ids, sampling) in enumerate(zip(prompts, samplings, strict=True)):
            group = object()
            text = self.tokenizer.decode(ids)
            context = ids or [self.engine.eot_id]  # an empty prompt starts from <|endoftext|>, not echoed
            for i in range(n):
                seeded = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + i)
                if not ids:
                    seeded = replace(seeded, prompt_logprobs=False)
                index = p * n + i
                # text_offset counts from the prompt's start, echoed or not (as OpenAI's does)
                tracker = Logprobs(self.tokenizer, 0 if echo else len(text)) if logprobs else None
                choices.append(Choice(index=index, prompt_text=text, echo=echo, started=now, logprobs=tracker))
                job.add(Seq(context, seeded, job.listener(index), decoder=self.tokenizer.stream_decoder(),
                            group=group))
        try:
            self.engine.submit(job.seqs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts))
        return job, choices

    # -- completions --

    def completion(self, req: CompletionRequest) -> tuple[Job, list[Choice], int]:
        self.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported: GPT-2 continues text, it does not fill in",
                           param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (other than best_of = n): ask for n choices and "
                           "rank them by their logprobs", param="best_of")
        prompts = self.prompts(req.prompt)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens 0 asks for nothing: give max_tokens >= 1, or echo the prompt",
                           param="max_tokens")
        samplings = [self.sampling(req, len(ids), req.max_tokens, logprobs=req.logprobs,
                                   prompt_logprobs=req.echo and req.logprobs is not None) for ids in prompts]
        job, choices = self.start(prompts, samplings, req.n, echo=req.echo, logprobs=req.logprobs is not None)
        return job, choices, sum(len(ids) for ids in prompts)

    def chat_prompt(self, req: ChatRequest) -> str:
        if self.chat is None:
            raise APIError(400, "GPT-2 has no chat format: start `gpt2lab serve` with --chat-template FILE to "
                           "serve /v1/chat/completions, or use /v1/completions", param="messages")
        messages = [m.model_dump() for m in req.messages]
        return self.chat.render(messages=messages, add_generation_prompt=True)


def _response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine: Engine, tokenizer: Any, *, model_name: str, api_key: str | None = None,
               cors_origins: Sequence[str] = (), limits: Limits | None = None,
               chat_template: str | None = None) -> FastAPI:
    """The FastAPI app over a started engine (the app stops it when it shuts down)."""
    limits = limits or Limits(max_prompt_tokens=engine.n_ctx, max_tokens=engine.n_ctx)
    server = Server(engine, tokenizer, model_name=model_name, limits=limits, chat_template=chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.stop)  # what is still running ends with an error event

    app = FastAPI(title="gpt2lab", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    app.add_middleware(_Guard, api_key=api_key, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        error = APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=e.status_code)

    _routes(app, server)
    return app


def _routes(app: FastAPI, server: Server) -> None:
    static = resources.files("gpt2lab.serve") / "static"

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        page = static / "index.html"
        if not page.is_file():
            raise APIError(404, "the playground is not installed with this copy of gpt2lab", code="not_found")
        return FileResponse(str(page))

    if static.is_dir():
        app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return _model_card(server)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        eot = "<|endoftext|>"
        return {"tokenizer_class": "GPT2Tokenizer", "eos_token": eot, "bos_token": eot, "pad_token": None,
                "unk_token": eot, "chat_template": server.chat_source,
                "model_max_length": server.n_ctx, "vocab_size": server.vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        obj = _json(await _body(request, server.limits.max_body_bytes))
        text = obj.get("prompt")
        if not isinstance(text, str):
            raise APIError(400, "prompt must be a string", param="prompt")
        ids = server.tokenizer.encode(text, allowed_special="all")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.n_ctx}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        obj = _json(await _body(request, server.limits.max_body_bytes))
        ids = obj.get("tokens")
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < server.vocab_size for t in ids):
            raise APIError(400, f"tokens must be a list of token ids 0..{server.vocab_size - 1}", param="tokens")
        return {"prompt": server.tokenizer.decode(ids)}

    _completion_routes(app, server)


def _completion_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse(await _body(request, server.limits.max_body_bytes), CompletionRequest)
        if req.stream:
            _open_stream(server)
        job, choices, prompt_tokens = server.completion(req)
        head = {"id": _response_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": server.model_name}
        if req.stream:
            include = req.stream_options is not None and req.stream_options.include_usage
            return _stream(server, job, choices, head, prompt_tokens, include, _completion_chunk)
        return JSONResponse(await _collect(server, request, job, choices, head, prompt_tokens, "text"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse(await _body(request, server.limits.max_body_bytes), ChatRequest)
        server.check_model(req.model)
        prompt = server.prompts(server.chat_prompt(req))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.stream:
            _open_stream(server)
        sampling = server.sampling(req, len(prompt[0]), max_tokens, logprobs=None, prompt_logprobs=False)
        job, choices = server.start(prompt, [sampling], req.n, echo=False, logprobs=False)
        head = {"id": _response_id("chatcmpl"), "object": "chat.completion.chunk" if req.stream else
                "chat.completion", "created": int(time.time()), "model": server.model_name}
        if req.stream:
            include = req.stream_options is not None and req.stream_options.include_usage
            return _stream(server, job, choices, head, len(prompt[0]), include, _chat_chunk)
        return JSONResponse(await _collect(server, request, job, choices, head, len(prompt[0]), "chat"))


def _model_card(server: Server) -> dict[str, Any]:
    return {"id": server.model_name, "object": "model", "created": 0, "owned_by": "gpt2lab",
            "max_model_len": server.n_ctx}


def _json(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object")
    return obj


def _open_stream(server: Server) -> None:
    if server.streams >= server.limits.max_streams:
        raise APIError(429, f"{server.streams} streams are open, this server's limit (--max-streams); retry "
                       "shortly", type="rate_limit_error", code="too_many_streams", headers={"Retry-After": "1"})


async def _collect(server: Server, request: Request, job: Job, choices: list[Choice], head: dict[str, Any],
                   prompt_tokens: int, kind: str) -> dict[str, Any]:
    try:
        async for index, event, at in job.events(request):
            if event.error is not None and event.finish_reason in ("error", "cancelled"):
                raise APIError(500 if event.finish_reason == "error" else 503,
                               f"generation failed: {event.error}", type="server_error")
            choices[index].add(event, at, server.metrics)
    finally:
        job.cancel()  # a no-op for finished sequences
    if kind == "chat":
        out = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                "finish_reason": c.finish, "logprobs": None} for c in choices]
    else:
        out = [{"text": "".join(c.text), "index": c.index, "finish_reason": c.finish,
                "logprobs": None if c.logprobs is None else c.whole} for c in choices]
    return {**head, "choices": out, "usage": usage(prompt_tokens, sum(c.tokens for c in choices))}


def _completion_chunk(choice: Choice, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> dict:
    return {"text": text, "index": choice.index, "logprobs": logprobs, "finish_reason": finish}


def _chat_chunk(choice: Choice, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> dict:
    delta = {"content": text} if text or finish is None else {}
    if len(choice.text) == 1:  # the choice's first chunk
        delta = {"role": "assistant", **delta}
    return {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _stream(server: Server, job: Job, choices: list[Choice], head: dict[str, Any], prompt_tokens: int,
            include_usage: bool, chunk: Any) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for index, event, at in job.events():
                if event.error is not None and event.finish_reason in ("error", "cancelled"):
                    error = APIError(500 if event.finish_reason == "error" else 503,
                                     f"generation failed: {event.error}", type="server_error")
                    yield _sse(error.body())
                    break
                choice = choices[index]
                text, logprobs = choice.add(event, at, server.metrics)
                if text or logprobs and logprobs["tokens"] or choice.finish is not None:
                    yield _sse({**head, "choices": [chunk(choice, text, logprobs, choice.finish)]})
            else:
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(prompt_tokens, sum(c.tokens for c in choices))})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    def close() -> None:
        job.cancel()
        server.streams -= 1

    server.streams += 1
    return _Stream(events(), close, media_type="text/event-stream",
                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Guard:
    """The API key and the request counter, as plain ASGI middleware. Starlette's BaseHTTPMiddleware
    (`@app.middleware("http")`) would hide a client's disconnect from the routes behind it, and a
    plain request whose client left would then run to its end."""

    def __init__(self, app: Any, *, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        public = path in PUBLIC or path.startswith("/static/")
        if self.api_key is not None and not public and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), self.api_key.encode()):
                error = APIError(401, "Incorrect API key provided: pass it as `Authorization: Bearer KEY`",
                                 type="invalid_request_error", code="invalid_api_key")
                return await JSONResponse(error.body(), status_code=401)(scope, receive, send)
        if not path.startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


class _Stream(StreamingResponse):
    """A stream that stops its generation however it ends: finished, failed, or its client gone
    (Starlette then cancels the response, possibly before the body was ever started)."""

    def __init__(self, content: AsyncIterator[str], on_close: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


__all__ = ["Limits", "create_app"]
