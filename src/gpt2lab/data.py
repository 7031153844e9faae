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

Where documents come from (files, folders, JSONL, hf:, the catalog) is gpt2lab.corpora's; the shard
format and the reader of a folder are gpt2lab.shards's. Both are re-exported here, so `gpt2lab.data`
stays the one import path.

A split's stream holds its documents in corpus order, each followed by the tokenizer's
<|endoftext|> id. Shards cut that stream every `shard_tokens` tokens, so a document may continue
into the next shard, and the loader's windows may start anywhere and cross shard boundaries.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from . import files
from .corpora import (
    CATALOG,
    PIECE_CHARS,
    READ_BYTES,
    Corpus,
    DecodeErrors,
    Document,
    _open_source,
    _sha256_json,
    _Source,
    corpus_files,
    file_documents,
    jsonl_documents,
    jsonl_rows,
    read_text,
    register,
    row_documents,
    text_pieces,
)
from .errors import DataError
from .shards import (
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MANIFEST,
    MANIFEST_FORMAT,
    SHARD_NAME,
    SPLITS,
    VAL_SPLITS,
    DataFolder,
    Loader,
    Split,
    TokenShards,
    ValSplit,
    _raw_manifest,
    _ShardWriter,
    _val_split,
    is_data_folder,
    load_tokenizer,
    read_manifest,
    read_shard_header,
    shard_name,
    token_dtype,
)
from .tokenizer import Tokenizer, cpu_count, safe_cuts

# gpt2lab.data is the import path for all of it: the corpora (gpt2lab.corpora) and the shard format
# and its reader (gpt2lab.shards) are re-exported here beside prepare.
__all__ = [
    "BATCH_CHARS", "CATALOG", "FORMAT_VERSION", "HEADER", "MAGIC", "MANIFEST", "MANIFEST_FORMAT", "PIECE_CHARS",
    "READ_BYTES", "SHARD_NAME", "SPLITS", "VAL_SPLITS", "Corpus", "DataFolder", "DecodeErrors", "Document",
    "Loader", "Split", "TokenShards", "ValSplit", "corpus_files", "file_documents", "held_out", "is_data_folder",
    "jsonl_documents", "jsonl_rows", "load_tokenizer", "prepare", "prepare_own", "read_manifest", "read_shard_header",
    "read_text", "register", "row_documents", "shard_name", "tail_cut", "text_pieces", "token_dtype", "up_to_date",
]

BATCH_CHARS = 1 << 18  # characters a tokenizer thread encodes at once


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
    """(batch, its token ids), in order. Each batch is a task for one of `workers` threads, and up
    to two per thread wait in line, so that every core keeps encoding while this thread reads the
    next batches and writes the finished ones (tiktoken releases the GIL; reading and writing hold
    it). Small batches keep the pipeline's start and end, when some cores idle, short."""
    threads = max(1, workers or cpu_count())
    with ThreadPoolExecutor(threads) as pool:
        ahead: collections.deque[tuple[list[_Piece], Future[list[list[int]]]]] = collections.deque()
        for batch in batches:
            ahead.append((batch, pool.submit(tok.encode_batch, [p.text for p in batch], num_threads=1)))
            if len(ahead) > 2 * threads:
                done, ids = ahead.popleft()
                yield done, ids.result()
        while ahead:
            done, ids = ahead.popleft()
            yield done, ids.result()


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


def local_source(source: str) -> Path | None:
    """The file or folder a source names on this machine (None for catalog and hf: sources)."""
    if source in CATALOG or source.startswith("hf:"):
        return None
    with contextlib.suppress(RuntimeError):  # ~user that does not exist: _open_source says so
        return Path(source).expanduser()
    return None


def _check_out(source: str, out: Path) -> None:
    """Refuse, before any work, an `out` that prepare may never write: a file, a training run, a
    folder of the user's files, the source or a folder holding it, or a folder inside the source."""
    local = local_source(source)
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
    tok = Tokenizer.from_spec(tokenizer)
    options = {"field": field, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
               "decode_errors": decode_errors}
    return src, tok, options, _sha256_json([FORMAT_VERSION, src.fingerprint, tok.sha256, options])


def _default_out(source: str) -> Path:
    name = source.removeprefix("hf:").split("@")[0].replace(":", "-").rstrip("/").split("/")[-1]
    return Path("data") / (Path(name).stem or "corpus")


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
