"""The demo: every stage on a tiny corpus, the unigram baseline, and the offline fallback."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from gpt2lab import load_model
from gpt2lab.demo import contention_note, demo, learned_vocabulary, unigram_bits_per_byte
from gpt2lab.tokenizer import Tokenizer, train_tokenizer
from gpt2lab.train import TrainConfig


def write_corpus(folder, n_docs: int = 10, words: int = 600) -> None:
    rng = np.random.default_rng(0)
    vocab = "thou art the king and i am thy servant my lord what say you to this good night".split()
    folder.mkdir()
    for i in range(n_docs):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(vocab, size=words)) + "\n")


def test_unigram_baseline_is_the_entropy_of_token_frequencies_per_byte(tmp_path):
    from gpt2lab import data

    (tmp_path / "corpus").mkdir()
    for i in range(10):
        (tmp_path / "corpus" / f"{i}.txt").write_text("ab" * 50)  # 100 bytes, 50 a and 50 b
    (tmp_path / "x.txt").write_text(" ")
    train_tokenizer([str(tmp_path / "x.txt")], vocab_size=257, out=str(tmp_path / "tok"))  # bytes only
    data.prepare(str(tmp_path / "corpus"), out=tmp_path / "data", tokenizer=str(tmp_path / "tok"), progress=False)
    # One byte per token, and <|endoftext|> after each document: per document 50 a, 50 b, 1 eot.
    p = np.array([50, 50, 1]) / 101
    bits_per_token = -(p * np.log2(p)).sum()
    assert unigram_bits_per_byte(tmp_path / "data") == pytest.approx(bits_per_token * 101 / 100)


def test_learned_vocabulary_sees_the_training_split_only(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(10):
        # Document 9 is the held-out one (val_fraction 0.05 holds out the 10th): give it a word of its own.
        word = "zyzzyva" if i == 9 else "thou art"
        (tmp_path / "corpus" / f"{i}.txt").write_text((word + " ") * 300)
    folder = learned_vocabulary(str(tmp_path / "corpus"), 300, tmp_path / "out")
    tok = Tokenizer.from_dir(folder)
    assert len(tok.encode(" thou")) == 1
    assert len(tok.encode(" zyzzyva")) > 3  # never merged: the trainer did not see it
    assert learned_vocabulary(str(tmp_path / "corpus"), 300, tmp_path / "out") == folder  # cached


def test_learned_vocabulary_of_one_text_file_leaves_out_its_held_out_tail(tmp_path):
    # One document: the validation split is the text's tail, here the "zyzzyva" lines after the first.
    (tmp_path / "input.txt").write_text("thou art " * 2000 + "\n" + "zyzzyva\n" * 40)
    folder = learned_vocabulary(str(tmp_path / "input.txt"), 300, tmp_path / "out")
    tok = Tokenizer.from_dir(folder)
    assert len(tok.encode(" thou")) == 1
    assert len(tok.encode("zyzzyva")) > 3


def test_demo_trains_samples_plots_and_reports_bits_per_byte(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = TrainConfig(model="gpt2-nano", batch_size=4, block_size=32, max_steps=6, warmup_steps=2, lr=3e-3,
                      eval_interval=3, eval_batches=2, log_interval=1, ckpt_interval=3, device="cpu")
    report = demo(data=str(tmp_path / "corpus"), out=str(tmp_path / "out"), vocab_size=300, threads=1, config=cfg)
    assert "--- greedy ---" in report and "--- sampled" in report and report.count("Romeo.") == 2
    line = next(x for x in report.splitlines() if x.startswith("held-out loss"))
    bpb, unigram = (float(x) for x in re.findall(r"\d+\.\d+", line)[:2])
    assert math.isfinite(bpb) and 0 < unigram < 8
    run = next((tmp_path / "out").glob("run-*"))
    assert (run / "loss.png").is_file()
    assert load_model(run).config.vocab_size == 300


def test_demo_without_network_says_so_and_points_to_data(tmp_path, monkeypatch, capsys):
    from gpt2lab.cli import main

    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no network" in err and "--data PATH" in err
    assert len(err.strip().splitlines()) == 1


def test_the_demo_says_when_another_program_took_its_cpu(tmp_path):
    """The demo and a busy loop share one core: it still stops on time, and the report says why it
    trained less. Alone, nothing is said."""
    write_corpus(tmp_path / "corpus")
    cfg = TrainConfig(model="gpt2-nano", batch_size=4, block_size=32, max_steps=10**6, max_minutes=0.1,
                      warmup_steps=2, lr=3e-3, eval_interval=0, log_interval=50, ckpt_interval=10**6, device="cpu")
    core = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    try:
        os.sched_setaffinity(0, {core})
        start = time.monotonic()
        report = demo(data=str(tmp_path / "corpus"), out=str(tmp_path / "out"), vocab_size=300, threads=1, config=cfg)
        assert time.monotonic() - start < 60
    finally:
        busy.kill()
        busy.wait()
        os.sched_setaffinity(0, saved)
    note = report.splitlines()[-1]
    assert note.startswith("note: training had ") and "another program was busy" in note
    assert 20 <= int(re.search(r"had (\d+)%", note).group(1)) <= 75
    assert contention_note(cpu_s=95, wall_s=50, threads=2) is None
