"""OpenAI's legacy Completions API: request validation and response shapes.

Requests are checked with pydantic (strict types: "1" is not a number, NaN is not a float);
what fails becomes a 400 in OpenAI's error shape. Token strings follow OpenAI: a token whose
bytes are not whole UTF-8 characters is shown as `bytes:\\xe2\\x80` (so no two alternatives
collide as keys), and `text_offset` counts characters from the start of the prompt, echoed or
not, so a completion's first offset is the prompt's length.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
Number = Annotated[float, Field(allow_inf_nan=False)]


class APIError(Exception):
    """An error response: `status`, OpenAI's `type`, the `param` at fault and a `code`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class Sampled(BaseModel):
    """The sampling fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")  # clients send fields of newer API versions; they are ignored

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[str, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = None
    # Extensions (as vLLM has them)
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0
    repetition_penalty: Annotated[Number, Field(gt=0)] = 1.0
    ignore_eos: StrictBool = False  # go on past <|endoftext|> (benchmarks: always max_tokens tokens)


class CompletionRequest(Sampled):
    prompt: Prompt
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    suffix: StrictStr | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(Sampled):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None


def parse(body: bytes, model: type[BaseModel]) -> Any:
    """A validated request from a JSON body, or an APIError 400 naming what is wrong."""
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)) or None
        if first["type"] == "missing":
            raise APIError(400, f"you must provide a {param} parameter", param=param) from None
        raise APIError(400, f"{param}: {first['msg']} (got {_short(first.get('input'))})", param=param) from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _short(value: Any) -> str:
    text = json.dumps(value)[:60] if not isinstance(value, str) else repr(value[:60])
    return text


def stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if any(s == "" for s in stop):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return tuple(stop)


def token_string(data: bytes) -> str:
    """A token as OpenAI shows it: its text, or `bytes:\\xNN...` when it is not whole UTF-8 characters."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def finite(x: float | None) -> float | None:
    """A logprob JSON can carry: -inf (a token the model gives no chance) becomes the float's lowest."""
    if x is None or math.isfinite(x):
        return x
    return -3.4028234663852886e38 if x < 0 else 3.4028234663852886e38


class Logprobs:
    """The `logprobs` object of one choice, built token by token: tokens, token_logprobs,
    top_logprobs (each with the chosen token) and text_offset (characters from the prompt's start)."""

    def __init__(self, tokenizer: Any, offset: int) -> None:
        self.tokenizer = tokenizer
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        data = self.tokenizer.token_bytes(token_id)
        string = token_string(data)
        self.tokens.append(string)
        self.token_logprobs.append(finite(logprob))
        self.text_offset.append(self.offset)
        self.offset += len(data.decode("utf-8", errors="replace"))
        if top is None:
            self.top_logprobs.append(None)
        else:
            alternatives = {token_string(self.tokenizer.token_bytes(i)): finite(lp) for i, lp in top}
            alternatives.setdefault(string, finite(logprob))
            self.top_logprobs.append(alternatives)

    def take(self) -> dict[str, Any]:
        """What was added since the last take (a stream chunk's share), then start afresh."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def context_exceeded(n_ctx: int, prompt: int, completion: int) -> APIError:
    """The error clients match on (OpenAI's wording and code) when a request does not fit the context."""
    return APIError(400, f"This model's maximum context length is {n_ctx} tokens, however you requested "
                         f"{prompt + completion} tokens ({prompt} in your prompt; {completion} for the completion). "
                         "Please reduce your prompt; or completion length.",
                    param="prompt", code="context_length_exceeded")
