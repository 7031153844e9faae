"""Serving: `gpt2lab serve` in each speed mode against `transformers serve --continuous-batching`,
from 1, 4, 16 and 64 concurrent streaming clients.

    flock /tmp/gpt2lab-bench.lock .venv/bin/python benchmarks/serve/bench.py [--quick]

GPT-2 124M with random weights (GPT-2's init, given structure as benchmarks/generate/bench.py
does, so that the quality figures mean something), saved as a gpt2lab checkpoint and exported as
a Hugging Face folder for the anchor, both with GPT-2's tokenizer. Every request is a short
prompt from a pool of 16 + 64 new tokens, greedy, streamed through OpenAI's legacy Completions
API (/v1/completions, which both servers serve). Random weights seldom emit <|endoftext|>, but
to make every request exactly 64 tokens gpt2lab gets `logit_bias {"50256": -100}` and
transformers serve a per-request `generation_config` with `eos_token_id: -1` (its way of turning
EOS off).

Each client sends its requests back to back (2 each); the 1-client run sends the pool's first 8
prompts one at a time: it is the one-at-a-time baseline (the same requests as the concurrent runs,
whose clients take the pool's prompts in turn). Reported per server and client count: aggregate
generated tokens/s (all completion tokens / wall time from the first request to the last
response), time to first token (request sent -> first chunk with text) and the time between
chunks (what a streaming client sees between two pieces of text), p50 and p95; and how many
responses have the same text as that server's one-at-a-time run for the same prompt. Every
server runs in each of 2 rounds (restarted, the order reversed), each figure is its best round.

Quality of each mode (against fp32, the way benchmarks/generate does it): the pool's first 8
prompts, one at a time, greedy with `logprobs`: the fraction of generated tokens equal to fp32's;
then fp32's prompt + continuation scored by each mode (`echo`, `max_tokens 0`, `logprobs 1`):
the mean |logprob difference|, perplexity, and agreement of the argmax with fp32's.

Servers run one at a time as subprocesses on free ports with 2 torch threads (the machine's
cores); this client is one asyncio process (aiohttp) that parses little. The machine is shared,
so the load average before and after is printed with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 64
CLIENTS = (1, 4, 16, 64)
MODES = ("fp32", "bf16", "int8")
EOT = 50256
HF = "transformers"
# transformers serve sizes its paged KV cache from free memory when not told: on a CPU that is
# ~11 GiB of RAM (a 45 s first request). 128 pages of 256 tokens hold 64 requests twice over.
HF_NUM_BLOCKS, HF_MAX_BATCH_TOKENS = 128, 1024
REFERENCE = "the issue's figures for transformers serve on this CPU: 25.2 tok/s from 1 client, 148 tok/s from 16"
PROMPTS = (
    "The quick brown fox",
    "Once upon a time, in a small village by the sea,",
    "The history of the Roman Empire",
    "In 1969, the first humans",
    "def fibonacci(n):",
    "My favourite recipe for bread is",
    "The stock market today",
    "Scientists have discovered a new species of",
    "Dear Sir or Madam, I am writing to",
    "The best way to learn a language is",
    "It was a dark and stormy night;",
    "Breaking news: the city council",
    "Water boils at 100 degrees Celsius because",
    "Here are three tips for better sleep:",
    "The meaning of life is",
    "Q: What is the capital of France?\nA:",
)


# -- the weights (in a subprocess, so that the driver never imports torch) ------------------------


def write_weights(ckpt: Path, hf: Path, seed: int = 0) -> None:
    """GPT-2 124M at GPT-2's init, given benchmarks/generate's structure (block weights x2,
    positions x4, final LayerNorm x8: predictions with ~3 nats of entropy, not a flat ~10.8)."""
    import torch

    from gpt2lab import GPT, Tokenizer, export_hf, preset, save_checkpoint

    torch.manual_seed(seed)
    model = GPT(preset("gpt2")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")):
                p.mul_(2.0)
        model.transformer.wpe.weight.mul_(4.0)
        model.transformer.ln_f.weight.mul_(8.0)
    tokenizer = Tokenizer.gpt2()
    save_checkpoint(model, ckpt, tokenizer=tokenizer)
    export_hf(model, hf, tokenizer=tokenizer)


# -- the servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore"}


def gpt2lab_command(ckpt: Path, port: int, mode: str, max_batch: int) -> list[str]:
    return [sys.executable, "-m", "gpt2lab", "serve", str(ckpt), "--port", str(port), "--mode", mode,
            "--max-batch", str(max_batch), "--grace", "1"]


def hf_command(folder: Path, port: int, args: argparse.Namespace) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(folder), "--continuous-batching",
           "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if not args.hf_auto_cache:
        cmd += ["--cb-num-blocks", str(HF_NUM_BLOCKS), "--cb-max-batch-tokens", str(HF_MAX_BATCH_TOKENS)]
    return cmd


@contextlib.contextmanager
def running(cmd: list[str], env: dict[str, str], log: Path, url: str, timeout: float) -> Iterator[dict]:
    """Start a server, wait for GET url/health to answer 200, yield its facts; always stop it."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    facts: dict[str, Any] = {"pid": proc.pid}
    try:
        t = time.perf_counter()
        while not healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail(log)}")
            if time.perf_counter() - t > timeout:
                raise RuntimeError(f"{' '.join(cmd)} not ready after {timeout:.0f} s:\n{tail(log)}")
            time.sleep(0.5)
        facts["ready_s"] = time.perf_counter() - t
        yield facts
        facts["peak_rss_mib"] = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def tail(log: Path, n: int = 3000) -> str:
    return log.read_bytes()[-n:].decode(errors="replace")


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# -- request bodies --------------------------------------------------------------------------------


def gpt2lab_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "logit_bias": {str(EOT): -100},
            **extra}


def gpt2lab_stream(prompt: str) -> dict[str, Any]:
    return gpt2lab_body(prompt, stream=True, stream_options={"include_usage": True})


def hf_stream(prompt: str) -> dict[str, Any]:
    # transformers serve ignores stream_options and always ends with a usage chunk; a request's own
    # generation_config is how it takes eos_token_id (-1: no EOS) for one request.
    config = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "eos_token_id": -1}
    return {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "generation_config": json.dumps(config)}


# -- the client ------------------------------------------------------------------------------------


async def stream_one(session: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed completion: when it was sent, when each chunk with text arrived, its text, tokens."""
    sent = time.perf_counter()
    arrivals: list[float] = []
    pieces: list[str] = []
    tokens = None
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:500]}")
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter()  # before parsing: the client's own work is not the server's latency
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"{url}: {obj['error']}")
            for choice in obj.get("choices") or ():
                if choice.get("text"):
                    arrivals.append(now)
                    pieces.append(choice["text"])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    return {"prompt": body["prompt"], "sent": sent, "arrivals": arrivals, "text": "".join(pieces), "tokens": tokens}


async def load(url: str, make_body: Callable[[str], dict], clients: int, per_client: int) -> dict[str, Any]:
    """`clients` concurrent clients, each sending `per_client` requests back to back."""
    import aiohttp

    async def client(i: int, session: Any) -> list[dict]:
        out = []
        for r in range(per_client):
            out.append(await stream_one(session, url, make_body(PROMPTS[(i * per_client + r) % len(PROMPTS)])))
        return out

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        try:
            done = await asyncio.gather(*(client(i, session) for i in range(clients)))
        except (aiohttp.ClientError, TimeoutError) as e:  # the server failed: reported, the others still run
            raise RuntimeError(f"{url}: {type(e).__name__}: {e}") from None
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "responses": [r for rs in done for r in rs]}


def summarize(run: dict[str, Any], clients: int) -> dict[str, Any]:
    responses = run["responses"]
    ttft = [(r["arrivals"][0] - r["sent"]) * 1e3 for r in responses if r["arrivals"]]
    gaps = [(b - a) * 1e3 for r in responses for a, b in itertools.pairwise(r["arrivals"])]
    tokens = sum(r["tokens"] or 0 for r in responses)
    return {
        "clients": clients, "requests": len(responses), "tokens": tokens, "seconds": round(run["seconds"], 2),
        "tokens_per_s": round(tokens / run["seconds"], 1),
        "ttft_p50_ms": pct(ttft, 0.5), "ttft_p95_ms": pct(ttft, 0.95),
        "chunk_gap_p50_ms": pct(gaps, 0.5), "chunk_gap_p95_ms": pct(gaps, 0.95),
        "not_64_tokens": sum(r["tokens"] != NEW_TOKENS for r in responses),
        "texts": [[r["prompt"], r["text"]] for r in responses],
    }


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile of xs, linearly interpolated (None when there is nothing to measure)."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 1)


def sweep(url: str, make_body: Callable[[str], dict], clients: tuple[int, ...], per_client: int, one: int,
          label: str) -> list[dict[str, Any]]:
    """Warm the server up, then one run per client count (1 client: the first `one` prompts, in turn)."""
    asyncio.run(load(url, make_body, 1, 1))  # the first request (transformers serve sets up its batcher here)
    asyncio.run(load(url, make_body, 4, 1))
    rows = []
    for c in clients:
        row = summarize(asyncio.run(load(url, make_body, c, one if c == 1 else per_client)), c)
        print(f"{label:>14} {c:3} clients: {row['tokens_per_s']:7.1f} tok/s, TTFT p50 {row['ttft_p50_ms']} ms, "
              f"chunk gap p50 {row['chunk_gap_p50_ms']} ms", file=sys.stderr, flush=True)
        rows.append(row)
    texts = dict(map(tuple, rows[0]["texts"]))  # the 1-client run's
    for row in rows:
        same = [texts[p] == t for p, t in row["texts"] if p in texts]
        row["same_text_as_one_at_a_time"] = sum(same) / len(same)
    return rows


def merge(best: dict[str, list[dict]], label: str, rows: list[dict[str, Any]]) -> None:
    """Keep each client count's best round (by tok/s, with that round's latencies); note every round's tok/s."""
    old = {r["clients"]: r for r in best.get(label, [])}
    merged = []
    for row in rows:
        prev = old.get(row["clients"])
        rounds = [*(prev["rounds_tokens_per_s"] if prev else []), row["tokens_per_s"]]
        keep = row if prev is None or row["tokens_per_s"] > prev["tokens_per_s"] else prev
        merged.append({**keep, "rounds_tokens_per_s": rounds})
    best[label] = merged


# -- quality ---------------------------------------------------------------------------------------


async def post_json(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Non-streaming completions, one at a time."""
    import aiohttp

    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=600)) as session:
        for body in bodies:
            try:
                async with session.post(url + "/v1/completions", json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:500]}")
                    out.append((await resp.json())["choices"][0])
            except (aiohttp.ClientError, TimeoutError) as e:
                raise RuntimeError(f"{url}: {type(e).__name__}: {e}") from None
    return out


def greedy(url: str, prompts: list[str]) -> list[dict[str, Any]]:
    """Each prompt's greedy continuation: its text, token strings and their logprobs."""
    choices = asyncio.run(post_json(url, [gpt2lab_body(p, logprobs=0) for p in prompts]))
    return [{"text": c["text"], "tokens": c["logprobs"]["tokens"]} for c in choices]


def scored(url: str, prompts: list[str], continuations: list[str]) -> list[dict[str, Any]]:
    """Each (prompt + continuation) scored by the model: per continuation token its logprob and the argmax."""
    bodies = [{"prompt": p + c, "max_tokens": 0, "echo": True, "logprobs": 1} for p, c in zip(prompts, continuations,
                                                                                                strict=True)]
    out = []
    for p, choice in zip(prompts, asyncio.run(post_json(url, bodies)), strict=True):
        lp = choice["logprobs"]
        keep = [i for i, off in enumerate(lp["text_offset"]) if off >= len(p)]
        out.append({"tokens": [lp["tokens"][i] for i in keep],
                    "logprobs": [lp["token_logprobs"][i] for i in keep],
                    "argmax": [max(lp["top_logprobs"][i].items(), key=lambda kv: kv[1])[0] for i in keep]})
    return out


def compare(ref_greedy: list[dict], greedy_: list[dict], ref_scored: list[dict], scored_: list[dict]) -> dict:
    """One mode against fp32: greedy token agreement, and on fp32's text: |dlogprob|, perplexity, argmax."""
    pairs = [(a, b) for r, m in zip(ref_greedy, greedy_, strict=True)
             for a, b in zip(r["tokens"], m["tokens"], strict=True)]
    diffs, nll, argmax = [], [], []
    for r, m in zip(ref_scored, scored_, strict=True):
        if r["tokens"] != m["tokens"]:
            raise RuntimeError("the same text was tokenized differently by two servers")
        diffs += [abs(a - b) for a, b in zip(r["logprobs"], m["logprobs"], strict=True)]
        nll += [-b for b in m["logprobs"]]
        argmax += [a == b for a, b in zip(r["argmax"], m["argmax"], strict=True)]
    return {"greedy_token_agreement": sum(a == b for a, b in pairs) / len(pairs),
            "greedy_identical": sum(r["tokens"] == m["tokens"] for r, m in zip(ref_greedy, greedy_, strict=True)),
            "requests": len(greedy_), "mean_abs_logprob_diff": sum(diffs) / len(diffs),
            "perplexity": math.exp(sum(nll) / len(nll)), "argmax_agreement": sum(argmax) / len(argmax),
            "scored_tokens": len(diffs)}


# -- the driver ------------------------------------------------------------------------------------


def provenance(threads: int) -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"git": sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""), "python": platform.python_version(),
            "torch": version("torch"), "transformers": version("transformers"), "aiohttp": version("aiohttp"),
            "cpu": cpu, "cores": os.cpu_count(), "server_threads": threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a short check that the script works: 1 and 4 clients, fp32, one round")
    p.add_argument("--clients", type=int, nargs="+", help=f"client counts (default {' '.join(map(str, CLIENTS))})")
    p.add_argument("--modes", nargs="+", choices=MODES, help="gpt2lab speed modes (default: all three)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (servers restarted, order reversed each round); "
                   "each figure is its best round")
    p.add_argument("--one-at-a-time", type=int, default=8, help="requests of the 1-client run")
    p.add_argument("--per-client", type=int, default=2, help="requests each of several clients sends")
    p.add_argument("--quality-prompts", type=int, default=8, help="prompts for the quality measurement")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    p.add_argument("--no-anchor", action="store_true", help="skip transformers serve")
    p.add_argument("--hf-auto-cache", action="store_true",
                   help="let transformers serve size its KV cache from free memory (~11 GiB here) instead of "
                        f"--cb-num-blocks {HF_NUM_BLOCKS} --cb-max-batch-tokens {HF_MAX_BATCH_TOKENS}")
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds a server may take to start")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/serve.json"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:  # the weights, in a subprocess
        write_weights(Path(args.child[0]), Path(args.child[1]))
        return
    if args.quick:
        args.clients, args.modes, args.rounds = args.clients or [1, 4], args.modes or ["fp32"], 1
        args.one_at_a_time, args.quality_prompts = 4, 4
    clients = tuple(args.clients or CLIENTS)
    if 1 not in clients:
        p.error("--clients must include 1: the 1-client run is the one-at-a-time baseline")
    clients = (1, *sorted(set(clients) - {1}))
    report: dict[str, Any] = {"provenance": provenance(args.threads), "load_before": os.getloadavg(),
                              "new_tokens": NEW_TOKENS, "prompts": len(PROMPTS), "one_at_a_time": args.one_at_a_time,
                              "per_client": args.per_client, "rounds": args.rounds, "runs": {}, "servers": {},
                              "quality": {}, "failed": {},
                              "anchor": None if args.no_anchor else " ".join(hf_command(Path("HF_FOLDER"), 0, args)[2:])
                              .replace(" --port 0", "")}
    env = server_env(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpt2lab-serve-bench-") as tmp:
        ckpt, hf = Path(tmp) / "gpt2-random", Path(tmp) / "gpt2-random-hf"
        subprocess.run([sys.executable, __file__, "--child", str(ckpt), str(hf)], check=True, env=env)
        servers = [(f"gpt2lab {m}", lambda port, m=m: gpt2lab_command(ckpt, port, m, max(clients)), gpt2lab_stream)
                   for m in (args.modes or MODES)]
        if not args.no_anchor:
            servers.append((HF, lambda port: hf_command(hf, port, args), hf_stream))
        prompts = list(PROMPTS[:args.quality_prompts])
        greedy_out: dict[str, list] = {}
        scored_out: dict[str, list] = {}
        for r in range(args.rounds):
            for label, command, body in servers if r % 2 == 0 else servers[::-1]:
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                try:
                    with running(command(port), env, Path(tmp) / "server.log", url, args.ready_timeout) as facts:
                        merge(report["runs"], label, sweep(url, body, clients, args.per_client, args.one_at_a_time,
                                                           label))
                        if r == 0 and label != HF:  # fp32 comes first: the others score its text
                            mode = label.split()[1]
                            greedy_out[mode] = greedy(url, prompts)
                            ref = greedy_out.get("fp32") or greedy_out[mode]
                            scored_out[mode] = scored(url, prompts, [g["text"] for g in ref])
                    report["servers"][label] = facts
                except RuntimeError as e:  # report it, go on with the others
                    report["failed"][f"{label} (round {r})"] = str(e)
                    print(f"{label} failed: {e}", file=sys.stderr)
        base = "fp32" if "fp32" in greedy_out else next(iter(greedy_out), None)
        for mode in greedy_out:
            report["quality"][mode] = compare(greedy_out[base], greedy_out[mode], scored_out[base], scored_out[mode])
        report["quality_base"] = base
    report["load_after"] = os.getloadavg()
    report["wall_s"] = round(time.perf_counter() - started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))


# -- the tables ------------------------------------------------------------------------------------


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def render(report: dict[str, Any]) -> str:
    prov, runs = report["provenance"], report["runs"]
    lines = [f"gpt2lab {prov['git']}, torch {prov['torch']}, transformers {prov['transformers']}, {prov['cpu']}, "
             f"{prov['cores']} cores, {prov['server_threads']} torch threads per server; load average "
             f"{report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after; {report['wall_s']} s",
             f"gpt2 124M (random weights), {report['new_tokens']} new tokens per request, greedy, streamed from "
             f"/v1/completions; 1 client = the first {report['one_at_a_time']} of {report['prompts']} short prompts, "
             f"one at a time; N clients = {report['per_client']} requests each, back to back. Best of "
             f"{report['rounds']} rounds (servers restarted, order reversed); every round's tok/s in brackets.",
             "", "| server | clients | requests | tok/s (rounds) | TTFT p50 ms | TTFT p95 ms | chunk gap p50 ms | "
             "chunk gap p95 ms | text as one-at-a-time |", "|---|---|---|---|---|---|---|---|---|"]
    for label, rows in runs.items():
        for r in rows:
            short = f", {r['not_64_tokens']} not {report['new_tokens']} tokens" if r["not_64_tokens"] else ""
            rounds = ", ".join(f"{x:g}" for x in r["rounds_tokens_per_s"])
            lines.append(f"| {label} | {r['clients']} | {r['requests']} | {r['tokens_per_s']} ({rounds}{short}) | "
                         f"{fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p95_ms'])} | {fmt(r['chunk_gap_p50_ms'])} | "
                         f"{fmt(r['chunk_gap_p95_ms'])} | {fmt(r['same_text_as_one_at_a_time'], '.0%')} |")
    hf = {r["clients"]: r["tokens_per_s"] for r in runs.get(HF, [])}
    lines += ["", "Aggregate tok/s as ratios: to the same server one at a time (its 1-client run), and to "
              "transformers serve --continuous-batching with as many clients:", "",
              "| server | clients | tok/s | x one at a time | x transformers serve |", "|---|---|---|---|---|"]
    for label, rows in runs.items():
        one = rows[0]["tokens_per_s"]
        for r in rows:
            vs_hf = f"{r['tokens_per_s'] / hf[r['clients']]:.2f}x" if r["clients"] in hf else "-"
            lines.append(f"| {label} | {r['clients']} | {r['tokens_per_s']} | {r['tokens_per_s'] / one:.2f}x | "
                         f"{vs_hf} |")
    lines += ["", goal(runs, hf)]
    if HF in runs:
        lines.append(f"transformers serve here: {hf.get(1, '-')} tok/s from 1 client, {hf.get(16, '-')} from 16 "
                     f"({REFERENCE}); started as `transformers serve {report['anchor']}`, sent the same "
                     "/v1/completions requests (with generation_config {\"eos_token_id\": -1}).")
        ours, theirs = dict(map(tuple, runs.get("gpt2lab fp32", [{}])[0].get("texts", []))), dict(
            map(tuple, runs[HF][0]["texts"]))
        same = [ours[k] == theirs[k] for k in theirs if k in ours]
        if same:
            lines.append(f"gpt2lab fp32's greedy text equals transformers serve's for {sum(same)} of {len(same)} "
                         "prompts (one at a time).")
    q = report["quality"]
    if q:
        lines += ["", f"Quality against {report['quality_base']} ({next(iter(q.values()))['requests']} prompts, "
                  f"greedy, one at a time; then {report['quality_base']}'s text scored by each mode):", "",
                  "| mode | greedy tokens as fp32 | identical continuations | mean abs logprob diff | perplexity "
                  "| change | argmax agreement |", "|---|---|---|---|---|---|---|"]
        ref = q[report["quality_base"]]["perplexity"]
        for mode, m in q.items():
            lines.append(f"| {mode} | {m['greedy_token_agreement']:.1%} | {m['greedy_identical']}/{m['requests']} | "
                         f"{m['mean_abs_logprob_diff']:.4f} | {m['perplexity']:.3f} | "
                         f"{100 * (m['perplexity'] / ref - 1):+.2f}% | {m['argmax_agreement']:.1%} |")
    for label, facts in report["servers"].items():
        lines.append(f"{label}: ready in {facts['ready_s']:.1f} s, peak RSS {fmt(facts.get('peak_rss_mib'), '.0f')} "
                     "MiB (its last round)")
    lines += [f"failed: {k}: {v.splitlines()[0]}" for k, v in report["failed"].items()]
    return "\n".join(lines)


def goal(runs: dict[str, list[dict]], hf: dict[int, float]) -> str:
    """At 16 clients: >= 4x one client's aggregate and >= 2x transformers serve's, in some mode."""
    verdicts, met = [], []
    for label, rows in runs.items():
        if label == HF:
            continue
        by = {r["clients"]: r["tokens_per_s"] for r in rows}
        if 16 not in by:
            continue
        scale = by[16] / by[1]
        vs = by[16] / hf[16] if 16 in hf else None
        ok = scale >= 4 and vs is not None and vs >= 2
        verdicts.append(f"{label.split()[1]} {scale:.2f}x one client, {fmt(vs, '.2f')}x transformers")
        if ok:
            met.append(label.split()[1])
    if not verdicts:
        return "Goal (16 clients: >= 4x one client and >= 2x transformers serve): not measured (no 16-client run)"
    return ("Goal (16 clients: >= 4x one client's tok/s and >= 2x transformers serve --continuous-batching's, in "
            f"some mode): {'MET in ' + ', '.join(met) if met else 'NOT MET'} ({'; '.join(verdicts)})")


if __name__ == "__main__":
    main()
