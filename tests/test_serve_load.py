"""`gpt2lab serve` as a process: 64 streaming clients at once with some walking away, and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from gpt2lab import save_checkpoint
from gpt2lab.config import GPTConfig
from gpt2lab.generate import GenerationConfig, Generator
from gpt2lab.model import GPT
from gpt2lab.tokenizer import Tokenizer

pytest.importorskip("uvicorn")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    tok = Tokenizer.gpt2()
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_ctx=256, vocab_size=tok.vocab_size))
    with torch.no_grad():  # varied text from a random model (see test_serve.py)
        model.transformer.wte.weight.mul_(4)
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(3)
            block.mlp.c_proj.weight.mul_(10)
    path = tmp_path_factory.mktemp("load") / "tiny"
    save_checkpoint(model, path, tokenizer=tok)
    return path


class Process:
    def __init__(self, ckpt: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"GPT2LAB_TEST_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "gpt2lab", "serve", str(ckpt), "--port", str(self.port),
                                      *args], env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

    def rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def stream(client: httpx.AsyncClient, url: str, prompt: str, tokens: int, leave_after: int | None) -> str | None:
    """The streamed text, or None for a client that leaves after `leave_after` chunks."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    text, chunks = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            text.append(event["choices"][0]["text"])
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return None
    return "".join(text)


def test_64_streaming_clients_with_some_leaving(ckpt):
    gen = Generator.load(ckpt)
    prompts = [f"Client {i} asks about {w}" for i, w in enumerate(random.Random(0).choices(
        ["rivers", "stars", "bread", "engines", "music", "glass"], k=64))]
    tokens = 40
    expect = [c.text for c in gen.generate(prompts, GenerationConfig(greedy=True, max_new_tokens=tokens))]
    leaving = set(range(0, 64, 10))  # a tenth of them go away mid-stream
    server = Process(ckpt, "--max-batch", "64")
    try:
        async def run() -> list[str | None]:
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=100)) as client:
                return await asyncio.gather(*[stream(client, server.url, p, tokens, 3 if i in leaving else None)
                                              for i, p in enumerate(prompts)])

        asyncio.run(run())  # the first round warms up: the KV cache grows to its size for this load
        time.sleep(1)
        before = server.rss()
        results = asyncio.run(run())
        time.sleep(1)
        after = server.rss()
        assert server.proc.poll() is None
        for i, text in enumerate(results):
            if i in leaving:
                assert text is None
            else:
                assert text == expect[i], i
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "gpt2lab_requests_running 0.0" in metrics
        assert after <= before * 1.10, f"RSS grew from {before / 2**20:.0f} to {after / 2**20:.0f} MiB"
    finally:
        server.stop()


def test_sigterm_stops_accepting_and_ends_in_flight_streams_cleanly(ckpt):
    server = Process(ckpt, "--grace", "1")
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                          json={"prompt": "Keep going", "max_tokens": 250, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert "choices" in first
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"  # finished, or ended with an error event, then [DONE]
        assert server.proc.wait(timeout=30) == 128 + signal.SIGTERM  # as every gpt2lab command stopped so
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=2)
    finally:
        server.stop()
