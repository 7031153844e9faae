"""`prepare` throughput (MB of text per second) on the default corpus, against the usual ways.

    python benchmarks/prepare/throughput.py [--corpus shakespeare] [--repeats 5] [--workers N]

In one process, interleaved, on the same documents (Shakespeare's 42 works, 5.1 MB):
  gpt2lab prepare          the whole command: read, tokenize on `workers` threads, shards, hashes, manifest
  gpt2lab prepare, 1 thr   the same on one thread
  nanoGPT-style            read every file, tiktoken `encode_ordinary` per document on one thread,
                           append <|endoftext|>, np.array(uint16).tofile (nanoGPT's prepare.py)
  HF tokenizer             transformers' GPT2TokenizerFast on the list of documents (batched, Rust,
                           its own threads), then uint16 to a file
  ceiling                  tokenizer.encode_batch on the documents already in memory: no I/O at all
Each reference writes one uint16 file with the same tokens, which is checked.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import GPT2TokenizerFast

from gpt2lab import data
from gpt2lab.tokenizer import Tokenizer


def nanogpt_style(files: list[Path], tok: Tokenizer, out: Path) -> np.ndarray:
    enc = tok._enc  # tiktoken's Encoding for GPT-2's ranks, as nanoGPT uses (ids == ranks for GPT-2)
    ids: list[int] = []
    for f in files:
        ids += enc.encode_ordinary(f.read_text(encoding="utf-8"))
        ids.append(tok.eot_id)
    arr = np.array(ids, dtype=np.uint16)
    arr.tofile(out)
    return arr


def hf_style(files: list[Path], hf: GPT2TokenizerFast, eot: int, out: Path) -> np.ndarray:
    texts = [f.read_text(encoding="utf-8") for f in files]
    ids: list[int] = []
    for doc in hf(texts)["input_ids"]:
        ids += doc
        ids.append(eot)
    arr = np.array(ids, dtype=np.uint16)
    arr.tofile(out)
    return arr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()

    tok = Tokenizer.gpt2()
    files = data.corpus_files(args.corpus)
    texts = [f.read_text(encoding="utf-8") for f in files]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok.save_hf(tmp / "hf")
        hf = GPT2TokenizerFast.from_pretrained(tmp / "hf")
        runs = {
            f"gpt2lab prepare, {args.workers} thr": lambda: data.prepare(
                args.corpus, out=tmp / "a", tokenizer=tok, val_fraction=0, workers=args.workers,
                force=True, progress=False),
            "gpt2lab prepare, 1 thr": lambda: data.prepare(
                args.corpus, out=tmp / "b", tokenizer=tok, val_fraction=0, workers=1, force=True, progress=False),
            "nanoGPT-style, 1 thr": lambda: nanogpt_style(files, tok, tmp / "nano.bin"),
            "HF GPT2TokenizerFast": lambda: hf_style(files, hf, tok.eot_id, tmp / "hf.bin"),
            f"ceiling: encode_batch, {args.workers} thr": lambda: tok.encode_batch(texts, num_threads=args.workers),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):  # interleaved so drifts in machine load hit all alike
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)

        ours = data.DataFolder.open(tmp / "a").shards("train")
        ours = ours.read([0], ours.n_tokens)[0]
        for ref in ("nano.bin", "hf.bin"):
            assert np.array_equal(np.fromfile(tmp / ref, dtype=np.uint16), ours), f"{ref} differs from gpt2lab's tokens"

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"prepare {args.corpus}: {len(files)} documents, {mb:.2f} MB of text, {len(ours):,} tokens; "
          f"median of {args.repeats}, {os.cpu_count()} cores")
    base = med["nanoGPT-style, 1 thr"]
    for name, sec in med.items():
        print(f"  {name:32s} {sec:7.3f} s  {mb / sec:6.2f} MB/s  {base / sec:5.2f}x nanoGPT-style")


if __name__ == "__main__":
    main()
