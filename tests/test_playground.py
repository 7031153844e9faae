"""The playground at / in a real headless browser (Debian's chromium, driven by Playwright) against a
real `gpt2lab serve` of a tiny random GPT-2: the page loads with nothing from another host, text
streams in token by token, each token is coloured by its probability and shows its alternatives,
a picked alternative continues the text from there, Stop cancels the generation on the server,
errors are shown, and the page fits a phone."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from gpt2lab import save_checkpoint
from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT
from gpt2lab.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "playground-test-key"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


# -- the server --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, *, key: str | None = KEY) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def complete(base: str, **request: Any) -> dict[str, Any]:
    """A whole (not streamed) completion from the server, as a client other than the page gets it."""
    data = json.dumps(request).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(base + "/v1/completions", data, headers), timeout=120) as r:
        return json.loads(r.read())


def running_requests(base: str) -> float:
    """The server's gpt2lab_requests_running gauge, from GET /metrics (Prometheus text)."""
    status, text = _get(base + "/metrics")
    assert status == 200, text
    match = re.search(r"^gpt2lab_requests_running(?:\{[^}]*\})?\s+(\S+)\s*$", text, re.M)
    assert match, f"no gpt2lab_requests_running in /metrics:\n{text}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """`gpt2lab serve` (with an API key) of a 1-layer GPT-2 with GPT-2's own tokenizer, so the text is
    varied (and holds multi-byte characters split over tokens). Its context of 4096 allows a
    generation long enough to be stopped halfway even on a fast machine."""
    root = tmp_path_factory.mktemp("playground")
    cache = str(tmp_path_factory.getbasetemp().parent / "gpt2lab-test-cache")  # conftest's shared cache
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's per-test setting is not on yet
        mp.setenv("GPT2LAB_CACHE", cache)
        tok = Tokenizer.gpt2()
        torch.manual_seed(0)
        config = GPTConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=4096, vocab_size=tok.vocab_size)
        save_checkpoint(GPT(config), root / "ckpt", tokenizer=tok)
        port = _free_port()
        # --grace 1: nothing is in flight at the end, and the default grace would hold teardown 10 s
        with open(root / "serve.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gpt2lab", "serve", str(root / "ckpt"),
                                     "--port", str(port), "--api-key", KEY, "--grace", "1"],
                                    stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gpt2lab serve exited with {proc.returncode}:\n{(root / 'serve.log').read_text()}")
            try:
                if _get(base + "/health", key=None)[0] == 200:
                    break
            except OSError:  # not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gpt2lab serve did not answer /health in 60 s:\n{(root / 'serve.log').read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("NO CHROMIUM ON PATH: the playground's browser test needs Debian's chromium "
                    "(apt-get install chromium); `playwright install` is not used (it downloads a browser)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playground's browser test needs playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


class Visit:
    """A page of the playground in a fresh browser context, recording every request and console error."""

    def __init__(self, browser: Any, base: str, *, viewport: dict[str, int] = LAPTOP, key: str | None = KEY,
                 **context: Any) -> None:
        self.base = base
        self.context = browser.new_context(viewport=viewport, **context)
        if key is not None:  # the key the page keeps in localStorage, there before the page loads
            self.context.add_init_script(f"localStorage.setItem('gpt2lab.apiKey', {json.dumps(key)})")
        self.runs = 0  # generations the page had started before the last one the test asked for
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.context.on("request", lambda r: self.requests.append(r.url))
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(base + "/")

    def close(self) -> None:
        self.context.close()

    def foreign_requests(self) -> list[str]:
        return [u for u in self.requests if not (u == self.base or u.startswith(self.base + "/"))]

    def set_controls(self, **values: Any) -> None:
        """Set inputs by id through the DOM (a folded settings panel or a range slider is no obstacle)."""
        self.page.evaluate("""values => {
            for (const [id, value] of Object.entries(values)) {
                const el = document.getElementById(id);
                el.value = String(value);
                el.dispatchEvent(new Event('input', {bubbles: true}));
                el.dispatchEvent(new Event('change', {bubbles: true}));
            }
        }""", {k.replace("_", "-"): v for k, v in values.items()})

    def tokens(self) -> int:
        return self.page.locator("#output .tok").count()

    def mark(self) -> None:
        """Note how many generations the page has started: finish() waits for a later one."""
        self.runs = int(self.page.get_attribute("#stats", "data-run") or 0)

    def finish(self, timeout: float = 30_000) -> str:
        """Wait for the generation started since mark() to end; its finish reason as the page shows it."""
        self.page.wait_for_function("""run => {
            const stats = document.getElementById('stats');
            return Number(stats.dataset.run || 0) > run && stats.dataset.finish;
        }""", arg=self.runs, timeout=timeout)
        return self.page.get_attribute("#stats", "data-finish")

    def generate(self, **controls: Any) -> None:
        self.set_controls(**controls)
        self.mark()
        self.page.click("#generate")


@pytest.fixture
def visit(browser, server) -> Iterator[Any]:
    pages: list[Visit] = []

    def open_page(**kwargs: Any) -> Visit:
        pages.append(Visit(browser, server, **kwargs))
        return pages[-1]

    yield open_page
    for v in pages:
        v.close()


# -- the tests ---------------------------------------------------------------------------------


def test_text_streams_in_coloured_by_probability_and_stop_cancels_on_the_server(visit, server):
    v = visit()
    page = v.page
    page.wait_for_selector("#model.ready")
    assert page.inner_text("#model") == "ckpt"  # GET /v1/models' first entry

    v.generate(prompt="The meaning of life is", max_tokens=4000, temperature=1, top_k=0, seed=7)
    # Streaming: the spans grow while the generation is still under way (4000 tokens take seconds at least).
    page.wait_for_function("document.querySelectorAll('#output .tok').length >= 5")
    first = v.tokens()
    page.wait_for_function(f"document.querySelectorAll('#output .tok').length >= {first + 5}")
    later = v.tokens()
    assert later > first
    assert page.is_enabled("#stop") and page.get_attribute("#stats", "data-finish") == ""
    assert "generating" in page.inner_text("#stats")
    assert running_requests(server) == 1

    page.click("#stop")
    assert v.finish() == "stopped"
    assert page.is_enabled("#generate") and page.is_disabled("#stop") and page.is_enabled("#continue")
    deadline = time.monotonic() + 2  # the server cancels the sequence when the connection closes
    while (n := running_requests(server)) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert n == 0, "Stop closed the stream but the server still runs the generation"
    assert v.tokens() < 4000
    assert re.search(r"[\d.]+ tok/s", page.inner_text("#stats"))

    # Every token span carries its probability, its colour bin matches it, and the colour is the legend's.
    spans = page.eval_on_selector_all("#output .tok:not(.plain)", """els => els.map(el => ({
        p: Number(el.dataset.p), bin: Number(el.dataset.bin),
        colour: getComputedStyle(el).backgroundColor,
        legend: getComputedStyle(document.querySelector(`.swatch[data-bin="${el.dataset.bin}"]`)).backgroundColor,
    }))""")
    assert len(spans) >= later - 2  # a stop may leave the last characters without their tokens
    edges = [0.01, 0.05, 0.2, 0.5, 0.8]
    for s in spans:
        assert 0 < s["p"] <= 1
        assert s["bin"] == sum(s["p"] >= e for e in edges)
        assert s["colour"] == s["legend"] and s["colour"] not in ("rgba(0, 0, 0, 0)", "transparent")
    text = page.eval_on_selector("#output", "el => el.textContent")
    assert text.startswith("The meaning of life is") and len(text) > len("The meaning of life is")

    # Hovering a token shows its top alternatives with percentages, the sampled one marked.
    page.hover("#output .tok:not(.plain) >> nth=2")
    page.wait_for_selector("#popover:not([hidden])")
    alternatives = page.locator("#popover .alt")
    assert alternatives.count() >= 5
    assert all(re.fullmatch(r"[\d.e+-]+%", t.strip()) for t in page.locator("#popover .alt .pct").all_inner_texts())
    assert page.locator("#popover .alt.chosen").count() == 1
    page.mouse.move(5, 5)  # away from the token and the popover: it goes
    page.wait_for_selector("#popover", state="hidden")

    assert v.errors == []
    assert v.foreign_requests() == [], "the page asked another host for something"
    assert any(u.endswith("/static/app.js") for u in v.requests) and any(u.endswith("/static/style.css")
                                                                         for u in v.requests)


def test_picking_an_alternative_continues_from_it(visit):
    v = visit()
    page = v.page
    page.wait_for_selector("#model.ready")
    v.generate(prompt="Once upon a time", max_tokens=12, temperature=1, top_k=0, seed=3)
    assert v.finish() == "length"
    stats = page.inner_text("#stats")
    assert "4 prompt + 12 completion = 16" in stats and "12 tokens" in stats and "tok/s" in stats, stats

    target = page.locator("#output .tok:not(.plain)").nth(3)
    target.hover()
    page.wait_for_selector("#popover:not([hidden])")
    choice = page.locator("#popover .alt:not(:disabled):not(.chosen)").first
    alt = choice.get_attribute("data-token")
    before = target.evaluate("""span => [...span.parentNode.children]
        .slice(0, [...span.parentNode.children].indexOf(span)).map(n => n.textContent).join('')""")
    v.mark()
    with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
        choice.click()
    body = json.loads(sent.value.post_data)
    assert body["prompt"] == before + alt  # everything before the token, then the alternative
    assert body["stream"] is True and body["logprobs"] == 5 and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 12 and body["seed"] == 3 and body["model"] == "ckpt"
    assert v.finish() == "length"
    text = page.eval_on_selector("#output", "el => el.textContent")
    assert text.startswith(before + alt) and len(text) > len(before + alt)
    assert page.locator("#output .tok.alt").count() == 1
    assert page.locator("#output .tok.alt").inner_text() == alt

    # Continue: the whole text so far is the next prompt.
    whole = page.eval_on_selector("#output", "el => el.textContent")
    v.mark()
    with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
        page.click("#continue")
    assert json.loads(sent.value.post_data)["prompt"] == whole
    assert v.finish() == "length"
    assert page.eval_on_selector("#output", "el => el.textContent").startswith(whole)
    assert v.errors == [] and v.foreign_requests() == []


def test_the_page_shows_exactly_the_text_the_server_generates(visit, server):
    """Spans are cut from the released text, so the page's text is the server's even where a character
    is split over tokens (the stream sends those as bytes:) or a stop string cuts a token short."""
    prompt, settings = "It was a dark and stormy night;", dict(max_tokens=80, temperature=1.0, top_k=0, seed=4)
    whole = complete(server, prompt=prompt, logprobs=0, **settings)["choices"][0]
    text, tokens = whole["text"], whole["logprobs"]["tokens"]
    assert len(tokens) == 80

    v = visit()
    page = v.page
    page.wait_for_selector("#model.ready")
    v.generate(prompt=prompt, **settings)
    assert v.finish() == "length"
    assert page.eval_on_selector("#output", "el => el.textContent") == prompt + text
    per_span = page.eval_on_selector_all("#output .tok:not(.plain)", "els => els.map(el => Number(el.dataset.tokens))")
    assert sum(per_span) == 80  # every token has its span, no token twice
    # (A random model's bytes: tokens rarely make a whole character: this seed's make U+FFFD, which the page
    # shows too. The test below covers characters split over tokens with a stream made by hand.)
    if any(t.startswith("bytes:") for t in tokens) and "\ufffd" not in text:  # a character over tokens: one span
        assert max(per_span) >= 2

    # A stop string from the middle of that text (typed with the escapes the hint documents): the text
    # ends just before it, though the server held text back and dropped the token it began in.
    at = next(i for i in range(len(text) // 2, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    stop = text[at:at + 3]
    typed = stop.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    v.generate(prompt=prompt, stop_strings=typed, **settings)
    assert v.finish() == "stop"
    assert page.eval_on_selector("#output", "el => el.textContent") == prompt + text[:text.find(stop)]
    assert v.errors == [] and v.foreign_requests() == []


def _sse(*events: Any) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def _chunk(text: str, tokens: list[str], finish: str | None = None, logprob: float = -0.5) -> dict[str, Any]:
    logprobs = {"tokens": tokens, "token_logprobs": [logprob] * len(tokens),
                "top_logprobs": [{t: logprob, " other": -1.5} for t in tokens], "text_offset": [0] * len(tokens)}
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "ckpt",
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}


def test_characters_split_over_tokens_and_held_back_text_render_exactly(visit):
    """The stream's awkward cases, made by hand (the test answers the page's request): a character
    over two and three tokens (bytes:), alone or among other tokens in a chunk, a token whose text comes
    in two chunks (its end held back as a possible stop string), and a stop string cutting the last token
    short."""
    stream = _sse(
        _chunk(" caf", [" caf"], logprob=-5),
        _chunk("", ["bytes:\\xc3"]), _chunk("é", ["bytes:\\xa9"]),  # é = c3 a9
        _chunk("", ["bytes:\\x20\\xe2\\x80"]), _chunk(" —", ["bytes:\\x94"]),  # " —" = 20 e2 80 94
        _chunk("ab", []), _chunk("\n x", ["ab\n", " x"], logprob=-2),  # "ab" released before its token "ab\n"
        _chunk("", ["bytes:\\xf0\\x9f"]), _chunk("", ["bytes:\\x98"]), _chunk("😀", ["bytes:\\x80"]),
        _chunk(" one two", [" one", " two"], logprob=-0.05),
        _chunk(" ñ!", ["bytes:\\x20\\xc3", "bytes:\\xb1", "!"], logprob=-0.05),  # ñ = c3 b1, in one chunk
        _chunk(" t", [], "stop"),  # the stop string began inside " th": its token is never sent
        {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "ckpt", "choices": [],
         "usage": {"prompt_tokens": 2, "completion_tokens": 15, "total_tokens": 17}},
        "[DONE]",
    )
    v = visit()
    page = v.page
    page.wait_for_selector("#model.ready")
    page.route("**/v1/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=stream.replace("\n\n", "\r\n\r\n", 3)))
    v.generate(prompt="Hi:")
    assert v.finish() == "stop"
    spans = page.eval_on_selector_all("#output > span", "els => els.map(el => [el.textContent, el.dataset.tokens])")
    assert spans == [["Hi:", None], [" caf", "1"], ["é", "2"], [" —", "2"], ["ab\n", "1"], [" x", "1"],
                     ["😀", "3"], [" one", "1"], [" two", "1"], [" ñ", "2"], ["!", "1"], [" t", None]]
    assert "2 prompt + 15 completion = 17" in page.inner_text("#stats")
    # p = e^-5; e^-1 and e^-1.5 (é, " —", 😀: the joint probability of their e^-0.5 tokens); e^-2; e^-0.05
    # fall in four bins of the scale, which have four colours
    bins = page.eval_on_selector_all("#output .tok:not(.plain)", """els => els.map(el =>
        [el.dataset.bin, getComputedStyle(el).backgroundColor])""")
    assert [b for b, _ in bins] == ["0", "3", "3", "2", "2", "3", "5", "5", "5", "5"]
    assert len({c for _, c in bins}) == 4
    page.hover("#output .tok >> nth=2")  # " —": the alternatives of its first token, both of its parts
    page.wait_for_selector("#popover:not([hidden])")
    assert "2 tokens make this text" in page.inner_text("#popover")
    assert page.locator("#popover .alt.chosen").is_disabled()  # bytes: cannot be written as a prompt
    assert page.locator("#popover .alt:not(.chosen)").is_enabled()

    # An error in the middle of a stream, and a busy server's 429, reach the error box.
    page.unroute("**/v1/completions")
    page.route("**/v1/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"},
        body=_sse(_chunk(" so", [" so"]), {"error": {"message": "generation failed: boom", "type": "server_error",
                                                     "param": None, "code": None}}, "[DONE]")))
    v.generate(prompt="Hi:")
    assert v.finish() == "error"
    assert "generation failed: boom" in page.inner_text("#error")
    assert page.eval_on_selector("#output", "el => el.textContent") == "Hi: so"
    page.unroute("**/v1/completions")
    page.route("**/v1/completions", lambda route: route.fulfill(
        status=429, headers={"Content-Type": "application/json", "Retry-After": "1"},
        body=json.dumps({"error": {"message": "the server is busy", "type": "rate_limit_error", "param": None,
                                   "code": "queue_full"}})))
    v.generate(prompt="Hi:")
    assert v.finish() == "error"
    assert "the server is busy" in page.inner_text("#error") and "429" in page.inner_text("#error")
    assert all("429" in e for e in v.errors), v.errors
    assert v.foreign_requests() == []


def test_stop_strings_and_errors_are_shown(visit):
    # Without the key: the page says so, and the server's 401 reaches the error box.
    v = visit(key=None)
    page = v.page
    page.wait_for_selector("#model.failed")
    assert "key" in page.inner_text("#model").lower()
    v.generate(prompt="Hello", max_tokens=4)
    assert v.finish() == "error"
    assert "Incorrect API key" in page.inner_text("#error") and "401" in page.inner_text("#error")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#model.ready")

    # A value the server refuses: its 400 names the parameter.
    v.generate(prompt="Hello", max_tokens=4, top_k=-5)
    assert v.finish() == "error"
    assert "top_k" in page.inner_text("#error")

    # Stop strings, one per line with \n escapes, are sent as a list.
    with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
        v.generate(prompt="Hello", max_tokens=4, top_k=0, stop_strings="\\n\\n\nThe end")
    assert json.loads(sent.value.post_data)["stop"] == ["\n\n", "The end"]
    assert v.finish() in ("length", "stop")
    assert page.is_hidden("#error")
    assert all("401" in e or "400" in e for e in v.errors), v.errors  # the browser logs the refused requests
    assert v.foreign_requests() == []


def test_the_page_fits_a_phone(visit):
    v = visit(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    page = v.page
    page.wait_for_selector("#model.ready")
    assert not page.locator("#settings").evaluate("el => el.open")  # the text first; settings fold away
    page.tap("#settings > summary")
    assert page.is_visible("#max-tokens")
    v.generate(prompt="On a small screen", max_tokens=24, seed=1)
    assert v.finish() == "length"
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing sticks out
    for selector in ("#prompt", "#output", "#generate", "#stop", ".legend", "#stats"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], selector

    page.locator("#output .tok:not(.plain)").nth(1).tap()  # a tap opens the alternatives
    page.wait_for_selector("#popover:not([hidden])")
    box = page.locator("#popover").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    assert box["y"] >= 0 and box["y"] + box["height"] <= PHONE["height"]
    page.touchscreen.tap(6, 6)  # a tap elsewhere closes it
    page.wait_for_selector("#popover", state="hidden")
    assert v.errors == [] and v.foreign_requests() == []
