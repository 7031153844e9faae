"""gpt2lab serve against real clients: the `openai` package, raw httpx, and lm-evaluation-harness,
on a live server (uvicorn on a free port, in this process) over a tiny random GPT-2."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from gpt2lab import save_checkpoint
from gpt2lab.config import GPTConfig
from gpt2lab.generate import GenerationConfig, Generator
from gpt2lab.model import GPT
from gpt2lab.serve.app import create_app
from gpt2lab.serve.engine import Engine
from gpt2lab.tokenizer import Tokenizer

uvicorn = pytest.importorskip("uvicorn")

CHAT = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A server on a free port in a thread of this process; stop() shuts it down."""

    def __init__(self, gen: Generator, **options) -> None:
        engine_options = {k: options.pop(k) for k in ("max_batch", "max_waiting") if k in options}
        self.engine = Engine(gen.model, gen.tokenizer, **engine_options).start()
        app = create_app(self.engine, gen.tokenizer, model_name="tiny", **options)
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tok = Tokenizer.gpt2()
    path = tmp_path_factory.mktemp("serve") / "tiny"
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_ctx=128, vocab_size=tok.vocab_size))
    with torch.no_grad():  # a random GPT-2 with tied weights repeats its last token: louder MLPs vary the text
        model.transformer.wte.weight.mul_(4)
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(3)
            block.mlp.c_proj.weight.mul_(10)
    save_checkpoint(model, path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def gen(tiny_path) -> Generator:
    return Generator.load(tiny_path)


@pytest.fixture(scope="module")
def live(gen):
    server = Live(gen, chat_template=CHAT, max_batch=16, max_waiting=64)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_ids(gen: Generator, prompt: str, n: int) -> list[int]:
    """What `gpt2lab generate --greedy` makes of `prompt`."""
    config = GenerationConfig(greedy=True, max_new_tokens=n, stop_at_eot=True)
    return gen.generate([prompt], config)[0].token_ids


def logprobs_of(gen: Generator, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position, in this process: (T, V)."""
    with torch.inference_mode():
        return gen.model(torch.tensor([ids]))[0].float().log_softmax(-1)


# -- the API, through the openai client ---------------------------------------------------------


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}


def test_every_prompt_form_and_n_give_choices_in_order(client, gen):
    tok = gen.tokenizer
    forms = {"string": "The cat", "strings": ["The cat", "A dog sat"], "ids": tok.encode("The cat"),
             "id lists": [tok.encode("The cat"), tok.encode("A dog sat")]}
    expect = {p: gen.tokenizer.decode(greedy_ids(gen, p, 6)) for p in ("The cat", "A dog sat")}
    for name, prompt in forms.items():
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, n=2)
        prompts = ["The cat"] if name in ("string", "ids") else ["The cat", "A dog sat"]
        assert [c.index for c in r.choices] == list(range(2 * len(prompts))), name
        assert [c.text for c in r.choices] == [expect[p] for p in prompts for _ in range(2)], name
        assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
        assert r.usage.completion_tokens == sum(len(tok.encode(c.text)) for c in r.choices)
        assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"


def test_greedy_equals_generate_alone_and_under_load(client, gen):
    prompts = [f"Request number {i} says" for i in range(16)]
    expect = [gen.tokenizer.decode(greedy_ids(gen, p, 24)) for p in prompts]
    alone = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=24, temperature=0)
    assert alone.choices[0].text == expect[0]
    with ThreadPoolExecutor(16) as pool:  # 16 requests in flight at once, each its own HTTP request
        texts = list(pool.map(lambda p: client.completions.create(
            model="tiny", prompt=p, max_tokens=24, temperature=0).choices[0].text, prompts))
    assert texts == expect


def test_a_seeded_sample_is_the_same_alone_and_under_load(client):
    def sample(prompt: str, seed: int) -> str:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=1.0,
                                         top_p=0.9, seed=seed).choices[0].text

    alone = sample("Once upon", 7)
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda i: sample("Once upon" if i == 3 else f"noise {i}", 7 if i == 3 else i),
                               range(8)))
    assert loaded[3] == alone
    assert sample("Once upon", 8) != alone  # the seed matters
    assert sample("Once upon", 2**70 + 7) == alone and sample("Once upon", -1)  # any JSON integer is a seed


def test_logprobs_equal_the_models_log_softmax(client, gen):
    prompt = "In the beginning was"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    ids = gen.tokenizer.encode(prompt) + greedy_ids(gen, prompt, 8)
    ref = logprobs_of(gen, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == r.choices[0].text
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        top = torch.topk(ref[i - 1], 3)
        want = {gen.tokenizer.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)}
        for token, value in want.items():
            assert lp.top_logprobs[i][token] == pytest.approx(value, abs=1e-4)
    # Greedy: each generated token's logprob is exactly the best alternative's (lm-eval's check).
    for i in range(len(gen.tokenizer.encode(prompt)), len(ids)):
        assert lp.token_logprobs[i] == max(lp.top_logprobs[i].values())
    assert lp.text_offset == [len(gen.tokenizer.decode(ids[:i])) for i in range(len(ids))]


def test_logprobs_zero_is_the_chosen_token_and_offsets_start_after_the_prompt(client, gen):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert [list(t) for t in lp.top_logprobs] == [[tok] for tok in lp.tokens]
    assert all(math.isfinite(v) for v in lp.token_logprobs)
    assert lp.text_offset[0] == len("Hello")


def test_echo_with_max_tokens_zero_scores_the_prompt(client, gen):
    ids = gen.tokenizer.encode("Score this text please")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == "Score this text please" and c.finish_reason == "length"
    ref = logprobs_of(gen, ids)
    assert c.logprobs.token_logprobs[1:] == pytest.approx([ref[i - 1, ids[i]].item() for i in range(1, len(ids))],
                                                          abs=1e-4)
    assert r.usage.completion_tokens == 0


def test_stop_strings_are_left_out(client, gen):
    full = client.completions.create(model="tiny", prompt="The", max_tokens=30, temperature=0).choices[0].text
    cut = full[len(full) // 3:len(full) // 3 + 3]
    assert cut and cut not in full[:len(full) // 3]
    stops = ["@@1", "@@2", "@@3", "@@4", "@@5", cut]  # more than OpenAI's four
    r = client.completions.create(model="tiny", prompt="The", max_tokens=30, temperature=0, stop=stops)
    assert r.choices[0].text == full[:full.index(cut)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="The", max_tokens=30, temperature=0, stop=cut,
                                         stream=True)
    pieces = [c.choices[0].text for c in streamed]
    assert "".join(pieces) == full[:full.index(cut)]


def test_streaming_chunks_usage_and_finish_reasons(client, gen):
    chunks = list(client.completions.create(model="tiny", prompt=["Alpha", "Beta"], n=2, max_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    texts, finished = {}, {}
    for chunk in chunks[:-1]:
        (c,) = chunk.choices
        assert c.index not in finished, "a chunk after the choice's finish_reason"
        texts[c.index] = texts.get(c.index, "") + c.text
        if c.finish_reason is not None:
            finished[c.index] = c.finish_reason
    assert finished == {i: "length" for i in range(4)}
    whole = client.completions.create(model="tiny", prompt=["Alpha", "Beta"], n=2, max_tokens=10, temperature=0)
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]


def test_multibyte_tokens_are_shown_as_bytes(client, gen):
    text = "snow ☃ and 🦙 llamas"
    r = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=2)
    tokens = r.choices[0].logprobs.tokens
    partial = [t for t in tokens if t.startswith("bytes:")]
    assert partial and all(t[6:].startswith("\\x") for t in partial)
    assert len(tokens) == len(gen.tokenizer.encode(text))


def test_errors_have_openais_shape_and_status(live, client):
    cases = [
        (dict(prompt="x", temperature=-1), 400, "temperature"),
        (dict(prompt="x", max_tokens=500), 400, None),
        (dict(prompt="x", top_p=0), 400, "top_p"),
        (dict(prompt=[], max_tokens=1), 400, "prompt"),
        (dict(prompt="x", suffix="y"), 400, "suffix"),
        (dict(prompt="x", best_of=3), 400, "best_of"),
        (dict(prompt=[99999999]), 400, "prompt"),
        (dict(prompt="x", logit_bias={"banana": 1}), 400, "logit_bias"),
    ]
    for kwargs, status, param in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny", **kwargs)
        assert e.value.status_code == status, kwargs
        error = e.value.response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and (param is None or error["param"] == param)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="word " * 100, max_tokens=100)
    assert e.value.code == "context_length_exceeded"
    message = e.value.response.json()["error"]["message"]
    assert message.startswith("This model's maximum context length is 128 tokens, however you requested "
                              "201 tokens (101 in your prompt; 100 for the completion).")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    raw = httpx.post(f"{live.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    raw = httpx.post(f"{live.url}/v1/completions", content=b'{"prompt": "x", "temperature": NaN}')
    assert raw.status_code == 400
    raw = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": "5"})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "max_tokens"
    assert httpx.get(f"{live.url}/nowhere").status_code == 404


def test_chat_needs_a_template(live, gen):
    chat = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)
    r = chat.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                     temperature=0)
    expect = gen.tokenizer.decode(greedy_ids(gen, "user: Hi\nassistant:", 5))
    assert r.choices[0].message.content == expect and r.choices[0].message.role == "assistant"
    streamed = chat.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expect
    bare = Live(gen)
    try:
        plain = openai.OpenAI(base_url=f"{bare.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="chat-template"):
            plain.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
    finally:
        bare.stop()


# -- raw HTTP: SSE, disconnects, keys, a full queue ----------------------------------------------


def sse(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def running(url: str, headers: dict | None = None) -> float:
    text = httpx.get(f"{url}/metrics", headers=headers).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("gpt2lab_requests_running")))


def test_raw_sse_and_json_values_are_finite(live):
    with httpx.stream("POST", f"{live.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "stream": True,
                                                                   "logprobs": 2, "logit_bias": {"50256": -100}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    for data in events[:-1]:
        json.loads(data, parse_constant=lambda name: pytest.fail(f"{name} in the stream"))


def test_a_client_that_disconnects_mid_stream_stops_its_generation(live):
    before = live.engine.steps
    with httpx.stream("POST", f"{live.url}/v1/completions",
                      json={"prompt": "Go on", "max_tokens": 120, "stream": True}) as r:
        for _ in r.iter_lines():
            if live.engine.steps > before + 3:
                break
    deadline = time.monotonic() + 1.0
    while running(live.url) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running(live.url) == 0
    steps = live.engine.steps
    time.sleep(0.3)
    assert live.engine.steps == steps  # nothing runs on for a client that is gone


def test_a_plain_request_whose_client_leaves_is_cancelled(live):
    # 25 ms a decode step: 120 tokens take 3 s however fast the machine, so the client surely leaves
    # (after 0.3 s) while its request runs, and an uncancelled request would outlive the deadline.
    slow = live.engine.model.lm_head.register_forward_hook(lambda *args: time.sleep(0.025))
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}/v1/completions", json={"prompt": "Go on", "max_tokens": 120}, timeout=0.3)
        deadline = time.monotonic() + 1.5
        while running(live.url) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running(live.url) == 0
    finally:
        slow.remove()


def test_api_key_guards_everything_but_health(gen):
    keyed = Live(gen, api_key="s3cret")
    try:
        assert httpx.get(f"{keyed.url}/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(f"{keyed.url}{path}", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(f"{keyed.url}{path}").status_code == 401
            assert httpx.get(f"{keyed.url}{path}", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2).choices
    finally:
        keyed.stop()


def test_a_full_queue_answers_429_with_retry_after(gen):
    small = Live(gen, max_batch=1, max_waiting=2)
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*[c.post(f"{small.url}/v1/completions",
                                                     json={"prompt": "x", "max_tokens": 40}) for _ in range(8)])

        statuses = [r for r in asyncio.run(burst())]
        busy = [r for r in statuses if r.status_code == 429]
        assert busy and all(r.headers["retry-after"] == "1" for r in busy)
        assert busy[0].json()["error"]["type"] == "rate_limit_error"
        assert all(r.status_code == 200 for r in statuses if r not in busy)
    finally:
        small.stop()


# -- lm-evaluation-harness's local-completions client --------------------------------------------


def test_lm_eval_local_completions_scores_like_the_model(live, gen):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=f"{live.url}/v1/completions", model="tiny", tokenizer_backend="remote",
                             max_length=128, num_concurrent=2, batch_size=2, max_retries=1)
    pairs = [("The cat sat on", " the mat"), ("Alpha beta", " gamma delta"), ("One two", " three")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    tok = gen.tokenizer
    for (context, continuation), (score, greedy) in zip(pairs, results, strict=True):
        ctx, cont = tok.encode(context), tok.encode(continuation)
        ref = logprobs_of(gen, ctx + cont)
        want = sum(ref[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))
        assert score == pytest.approx(want, abs=1e-3)
        best = all(ref[len(ctx) + i - 1].argmax().item() == t for i, t in enumerate(cont))
        assert greedy == best
    # Its greedy check on a continuation that is the model's own greedy one.
    own = tok.decode(greedy_ids(gen, "The cat sat on", 3))
    (score, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("The cat sat on", own), 0)],
                                       disable_tqdm=True)
    assert greedy is True
    out = lm.generate_until([Instance("generate_until", {}, ("The cat", {"until": ["\n\n"], "max_gen_toks": 6}), 0)],
                            disable_tqdm=True)
    assert out == [tok.decode(greedy_ids(gen, "The cat", 6)).split("\n\n")[0]]


def test_tokenizer_endpoints(live, gen):
    info = httpx.get(f"{live.url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 128
    ids = httpx.post(f"{live.url}/tokenize", json={"prompt": "Hi there<|endoftext|>"}).json()["tokens"]
    assert ids == gen.tokenizer.encode("Hi there<|endoftext|>", allowed_special="all")
    assert httpx.post(f"{live.url}/detokenize", json={"tokens": ids}).json() == {"prompt": "Hi there<|endoftext|>"}
    assert httpx.post(f"{live.url}/detokenize", json={"tokens": [-1]}).status_code == 400


def test_metrics_are_prometheus_text(live, client):
    client.completions.create(model="tiny", prompt="count me", max_tokens=3)
    text = httpx.get(f"{live.url}/metrics").text
    for name in ("gpt2lab_requests_running", "gpt2lab_requests_waiting", "gpt2lab_prompt_tokens_total",
                 "gpt2lab_generation_tokens_total", "gpt2lab_time_to_first_token_seconds_bucket",
                 "gpt2lab_time_per_output_token_seconds_bucket"):
        assert name in text, name


def test_cors_is_off_unless_origins_are_listed(live, gen):
    ask = {"Origin": "http://ok.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{live.url}/v1/completions", headers=ask)
    assert "access-control-allow-origin" not in r.headers
    allowed = Live(gen, cors_origins=["http://ok.example"])
    try:
        r = httpx.options(f"{allowed.url}/v1/completions", headers=ask)
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        r = httpx.options(f"{allowed.url}/v1/completions", headers=ask | {"Origin": "http://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "http://evil.example"
    finally:
        allowed.stop()





def test_serve_without_its_extra_says_how_to_install_it(monkeypatch, capsys):
    import sys

    from gpt2lab.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if `pip install gpt2lab` without [serve]
    assert main(["serve", "anything"]) == 2
    assert "pip install 'gpt2lab[serve]'" in capsys.readouterr().err


def test_decode_attention_gives_a_row_the_same_bits_whatever_the_batch(threads):
    """PyTorch's flash kernel for CPU does not (a row's last bits change with the rows beside it,
    with two threads or more); the engine's decoding attention must, for any batch, subset of rows
    and thread count."""
    from gpt2lab.serve.engine import decode_attention

    threads(max(2, torch.get_num_threads()))
    torch.manual_seed(0)
    B, H, W, D = 9, 12, 128, 64  # GPT-2's heads, a cache 128 wide of which each row uses 65 to 128
    q, keys, values = torch.randn(B, H, 1, D), torch.randn(B + 3, H, W, D), torch.randn(B + 3, H, W, D)
    mask = (torch.arange(W)[None] < torch.randint(65, W + 1, (B,))[:, None])[:, None, None, :]
    whole = decode_attention(q, keys[:B], values[:B], mask)
    for i in range(B):
        assert torch.equal(decode_attention(q[i:i + 1], keys[i:i + 1], values[i:i + 1], mask[i:i + 1]), whole[i:i + 1])
    some = torch.tensor([1, 4, 5, 8])
    assert torch.equal(decode_attention(q[some], keys[some], values[some], mask[some]), whole[some])
    threads(1)
    assert torch.equal(decode_attention(q, keys[:B], values[:B], mask), whole)
    expect = F.scaled_dot_product_attention(q, keys[:B], values[:B], attn_mask=mask)
    torch.testing.assert_close(whole, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8"])
def test_batching_does_not_change_greedy_tokens_in_each_speed_mode(tiny_path, gen, mode):
    """(tests/test_gemv.py and the test above check the two parts at GPT-2's own widths.)"""
    from gpt2lab.serve.engine import Sampling, Seq

    engine = Engine(Generator.load(tiny_path, mode=mode).model, gen.tokenizer, max_batch=16).start()
    prompts = [gen.tokenizer.encode(f"Client {i} asks about " + "word " * (i % 7)) for i in range(12)]

    def run(batch: list[list[int]]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in batch]
        left = threading.Semaphore(0)

        def listener(i):
            def on_event(event):
                out[i] += [t.id for t in event.tokens]
                if event.finish_reason:
                    left.release()
            return on_event

        engine.submit([Seq(p, Sampling(max_tokens=24, temperature=0, stop_at_eot=False), listener(i))
                       for i, p in enumerate(batch)])
        for _ in batch:
            assert left.acquire(timeout=60)
        return out

    try:
        alone = [run([p])[0] for p in prompts]
        assert run(prompts) == alone  # prefilled together, decoded side by side: the same tokens
    finally:
        engine.stop()


def test_ignore_eos_goes_on_past_endoftext(client):
    forced = {"50256": 100}
    r = client.completions.create(model="tiny", prompt="x", max_tokens=5, logit_bias=forced, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == "" and r.usage.completion_tokens == 0
    r = client.completions.create(model="tiny", prompt="x", max_tokens=5, logit_bias=forced, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
