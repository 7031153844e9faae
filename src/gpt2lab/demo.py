"""`make demo`: a small GPT-2 learns Shakespeare on two CPU cores in eight minutes.

Fetch the corpus, learn a BPE vocabulary from its training split, prepare token shards, train
under a time budget, then print samples, the loss plot's path and the held-out loss in bits per
byte next to a unigram baseline. Every stage is a public gpt2lab function; this module only
strings them together (the settings were chosen by the trials in docs/design/demo-model.md).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from . import data as datasets
from .checkpoint import load_model
from .errors import ConfigError, DataError, FetchError
from .generate import Generator
from .metrics import raise_if_stopped
from .tokenizer import train_tokenizer
from .train import FitResult, TrainConfig, pretrain

# What eight minutes on two cores buys best (docs/design/demo-model.md).
DEMO_CONFIG = TrainConfig(
    model="gpt2-micro", block_size=128, batch_size=32, max_steps=100_000, max_minutes=8.0,
    optimizer="muon", lr=8e-3, min_lr=0.0, warmup_steps=50, compile=True,
    eval_interval=200, eval_batches=8, log_interval=20, ckpt_interval=500, keep_last=2,
)
DEMO_VOCAB = 4096
PROMPTS = ("Romeo.\n", "Ham.\nTo be, or not to be", "KING.\nMy lords,")
NO_CORPUS_HELP = ("with no network and no package index the demo cannot fetch Shakespeare: run "
                  "`gpt2lab demo --data PATH` (or `make demo DATA=PATH`) on your own text, a folder of .txt "
                  "files or a .jsonl file with a text field")


def demo(*, data: str | None = None, out: str = "runs/demo", vocab_size: int = DEMO_VOCAB, threads: int = 2,
         config: TrainConfig = DEMO_CONFIG) -> str:
    """Train a small GPT-2 on Shakespeare on this CPU for a few minutes, then sample from it and report.

    data: your own corpus instead of Shakespeare: a text file, a folder of .txt files or a .jsonl file (a text field)
    out: folder for the vocabulary, the prepared tokens and the runs (each run gets a new folder)
    vocab_size: ids of a BPE vocabulary learned from the training split; 0 uses GPT-2's own 50,257
    threads: CPU threads to train with
    """
    cpus = len(os.sched_getaffinity(0))
    if not 1 <= threads <= cpus:
        raise ConfigError(f"--threads must be from 1 to {cpus} (the CPUs this process may use), got {threads}")
    if vocab_size != 0 and not 257 <= vocab_size < 2**32:
        raise ConfigError(f"--vocab-size must be 0 (GPT-2's vocabulary) or at least 257 (the bytes and "
                          f"<|endoftext|>), got {vocab_size}")
    if data is not None and (local := datasets.local_source(data)) is not None and not local.exists():
        raise DataError(f"--data {data} does not exist: give a folder of .txt files, a .jsonl file or a text file")
    torch.set_num_threads(threads)
    root = Path(out)
    source = data or "shakespeare"
    try:
        if source in datasets.CATALOG:
            datasets.corpus_files(source)  # fetch first: without a network, say so before any work
        if vocab_size:
            tok_dir = learned_vocabulary(source, vocab_size, root)
            data_dir = root / "data" / tok_dir.name
            datasets.prepare_own(source, data_dir, tokenizer=str(tok_dir))
        else:
            data_dir = root / "data" / "gpt2"
            datasets.prepare_own(source, data_dir, tokenizer="gpt2")
    except FetchError as e:
        if data is None:
            raise FetchError(f"{NO_CORPUS_HELP} ({e})") from e
        raise
    run_dir = root / f"run-{datetime.now():%Y%m%d-%H%M%S}"
    cpu, wall = _cpu_seconds(), time.monotonic()
    result = pretrain(data_dir, run_dir, config)
    text = report(result, run_dir, data_dir)
    if note := contention_note(_cpu_seconds() - cpu, time.monotonic() - wall, threads):
        text += "\n" + note
    raise_if_stopped(result, text)
    return text


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def contention_note(cpu_s: float, wall_s: float, threads: int) -> str | None:
    """A line for the report when training got less CPU time than its threads could use.

    The demo stops after its minutes whatever happens, so a busy machine costs steps, not time. Its
    threads keep their cores busy when alone (torch's workers wait spinning), so a share of CPU time
    well under threads x wall means another program took some of those cores.
    """
    share = cpu_s / max(wall_s * threads, 1e-9)
    if share >= 0.8:
        return None
    return (f"note: training had {share:.0%} of the CPU time of its {threads} thread(s): another program was busy "
            f"on these cores, so it trained fewer steps than a quiet machine would, and its held-out loss is higher")


def learned_vocabulary(source: str, vocab_size: int, root: Path) -> Path:
    """A BPE vocabulary of `vocab_size` ids learned from the training split of `source` only.

    The split is made by `prepare` itself, with a byte vocabulary (256 bytes and <|endoftext|>,
    no merges), and its text read back exactly; so the held-out text never shapes the
    vocabulary, for any source, and nothing needs fetching. Cached by content under root.
    """
    bytes_tok = root / "tokenizers" / "bytes"
    if not (bytes_tok / "tokenizer.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "empty.txt").write_text(" ")  # 257 ids leave no room for merges: any text will do
            train_tokenizer([str(Path(tmp) / "empty.txt")], vocab_size=257, out=str(bytes_tok))
    bytes_dir = root / "data" / "bytes"
    datasets.prepare_own(source, bytes_dir, tokenizer=str(bytes_tok))
    data = datasets.DataFolder.open(bytes_dir)
    folder = root / "tokenizers" / f"bpe{vocab_size}-{data.fingerprint[:12]}"
    if (folder / "tokenizer.json").is_file():
        return folder
    tok = data.tokenizer
    shards = data.shards("train")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "train.txt"
        with open(text, "wb") as f:  # bytes: a chunk may end inside a character
            for start in range(0, len(shards), 1 << 22):
                ids = shards.read([start], min(1 << 22, len(shards) - start))[0]
                ids[ids == tok.eot_id] = tok.encode("\n")[0]  # a document boundary becomes a line break
                f.write(tok.decode_bytes(ids))
        train_tokenizer([str(text)], vocab_size=vocab_size, out=str(folder))
    return folder


def unigram_bits_per_byte(data_dir: str | Path) -> float:
    """The entropy of the training split's token frequencies, in bits per byte of text.

    A model that ignores context entirely can do no better (on text like its training text);
    a model worth the name must be well below it.
    """
    data = datasets.DataFolder.open(data_dir)
    shards = data.shards("train")
    counts = np.zeros(shards.vocab_size, dtype=np.int64)
    for start in range(0, len(shards), 1 << 22):
        counts += np.bincount(shards.read([start], min(1 << 22, len(shards) - start))[0], minlength=len(counts))
    p = counts[counts > 0] / counts.sum()
    bits_per_token = float(-(p * np.log2(p)).sum())
    return bits_per_token / data.bytes_per_token("train")


def report(result: FitResult, run_dir: Path, data_dir: Path) -> str:
    """Samples from the trained model, and its held-out bits per byte against the unigram baseline."""
    tokenizer = datasets.DataFolder.open(data_dir).tokenizer
    generator = Generator(load_model(run_dir), tokenizer)
    lines = [f"trained {result.step} steps in {result.elapsed_s / 60:.1f} min ({result.stop_reason.replace('_', ' ')})"]
    for title, options in (("greedy", dict(greedy=True)),
                           ("sampled, temperature 0.8, top-k 40", dict(temperature=0.8, top_k=40))):
        lines.append(f"\n--- {title} ---")
        for seed, prompt in enumerate(PROMPTS):  # a seed per prompt: one seed would give them one random stream
            completion = generator.generate(prompt, max_new_tokens=60, seed=seed, **options)[0]
            lines += [prompt + completion.text, ""]
    unigram = unigram_bits_per_byte(data_dir)
    bpb = result.val_bpb if result.val_bpb is not None else math.nan
    lines += [
        f"held-out loss: {bpb:.3f} bits per byte (a unigram model of the training tokens: {unigram:.3f}; "
        f"{tokenizer.vocab_size}-id vocabulary)",
        f"loss plot: {run_dir / 'loss.png'}",
        f"checkpoint: {result.checkpoint} (gpt2lab.load_model({str(run_dir)!r}) loads it)",
    ]
    return "\n".join(lines)
