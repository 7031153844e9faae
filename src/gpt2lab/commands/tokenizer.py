"""`gpt2lab tokenizer encode|decode|count|train`: reading files and standard input, checking
--output files, printing. The library (gpt2lab.tokenizer) does the tokenizing and training."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import tokenizer as library
from ..errors import TokenizerError
from ..files import atomic_write, check_file_destination
from ..tokenizer import Tokenizer
from . import Annotated, flag

Files = Annotated[list[str] | None, flag("input")]  # --input A --input B


def encode_files(files: Files = None, *, tokenizer: str | None = None, allow_special: bool = False,
                 json_lists: bool = False) -> str:
    """Encode text into token ids: one line of space-separated ids per input.

    Args:
        files: UTF-8 text files (default: read stdin)
        tokenizer: a tokenizer or checkpoint folder (default: GPT-2's)
        allow_special: encode "<|endoftext|>" in the text as the special token, not as plain text
        json_lists: print each input's ids as a JSON list
    """
    if not files:
        _stdin()  # closed: refused before the tokenizer is loaded
    tok = _pick(tokenizer)
    names, texts = zip(*_iter_text(files), strict=True)
    all_ids = tok.encode_batch(list(texts), allowed_special="all" if allow_special else frozenset())
    if json_lists:
        return "\n".join(json.dumps(ids) for ids in all_ids)
    return "\n".join(" ".join(map(str, ids)) for ids in all_ids)


def decode_ids(files: Files = None, *, tokenizer: str | None = None, output: str | None = None,
               force: bool = False) -> str:
    """Decode token ids (space-separated, or a JSON list) into text.

    Args:
        files: files of ids (default: read stdin)
        tokenizer: a tokenizer or checkpoint folder (default: GPT-2's)
        output: write the tokens' bytes to this file, byte for byte (even a character cut in two), instead of printing
        force: replace an existing --output file (never an input, a link, a FIFO or a device)
    """
    def check_output(path: Path) -> None:
        check_file_destination(path, flag="--output", error=TokenizerError, force=force,
                               sources=files or (),
                               keep={"the tokenizer folder": tokenizer} if tokenizer else None)

    if output is not None:
        check_output(Path(output))
    if not files:
        _stdin()  # closed: refused before the tokenizer is loaded
    tok = _pick(tokenizer)
    ids: list[int] = []
    for name, text in _iter_text(files):
        ids += _parse_ids(text, name, tok)
    if output is None:
        return tok.decode(ids)  # text: an incomplete character becomes U+FFFD
    data = tok.decode_bytes(ids)
    check_output(Path(output))  # again, as late as possible: reading stdin may have taken a while
    atomic_write(output, data)
    return f"wrote {len(ids)} tokens as {len(data)} bytes to {output}"


def count_tokens(files: Files = None, *, tokenizer: str | None = None) -> dict[str, Any]:
    """Count the tokens in text files (or stdin).

    Args:
        files: UTF-8 text files (default: read stdin)
        tokenizer: a tokenizer or checkpoint folder (default: GPT-2's)
    """
    if not files:
        _stdin()  # closed: refused before the tokenizer is loaded
    tok = _pick(tokenizer)
    names, texts = zip(*_iter_text(files), strict=True)
    counts = [len(ids) for ids in tok.encode_batch(list(texts))]
    size = sum(len(t.encode("utf-8")) for t in texts)
    return {"tokenizer": tok.name, "tokens": sum(counts), "bytes": size,
            "bytes_per_token": round(size / max(sum(counts), 1), 3), "files": dict(zip(names, counts, strict=True))}


def train_tokenizer(files: Files = None, *, vocab_size: int = 50257, out: str | None = None,
                    min_frequency: int = 2, force: bool = False) -> str:
    """Learn a byte-level BPE vocabulary with GPT-2's pre-tokenization from text files.

    Args:
        files: UTF-8 text files to learn from, required (read in chunks: any size works)
        vocab_size: ids in the result: 256 bytes + merges + <|endoftext|> (the last id)
        out: required: a new or empty folder to write encoder.json, vocab.bpe and gpt2lab's tokenizer.json into
        min_frequency: a pair must occur this often to be merged
        force: replace the tokenizer that gpt2lab wrote to --out before (never a folder holding other files)
    """
    tok = library.train_tokenizer(files, vocab_size=vocab_size, out=out, min_frequency=min_frequency, force=force)
    short = f"; asked for {vocab_size}, but no more pairs occur {min_frequency}+ times" \
        if tok.vocab_size < vocab_size else ""
    return f"wrote {tok.name} ({tok.vocab_size} ids{short}) to {out}"


# Plain ASCII digits only: int() would also take "1_000", "+5", " 7", "٣" or "１", and JSON's
# true/false are ints to Python.
_ID = re.compile(r"-?[0-9]+")  # a minus sign only so that the error can say the id is out of range
_ASCII_SPACE = re.compile(r"[ \t\n\r\f\v]+")
_IDS_HINT = "write token ids in ASCII digits, space-separated or as a JSON list of integers"


class _NotAnId(str):
    """A JSON number that is not an integer (1.0, 1e3, NaN), kept as it was written."""


def _parse_ids(text: str, name: str, tok: Tokenizer) -> list[int]:
    """The ids in `text` (input `name`): space-separated or a JSON list, each an id of `tok`."""
    text = text.strip(" \t\n\r\f\v")
    # (the id or None, the token as written)
    if text.startswith("["):
        try:
            items = json.loads(text, parse_float=_NotAnId, parse_constant=_NotAnId)
        except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deep
            raise TokenizerError(f"{name}: not a JSON list of token ids ({e}); {_IDS_HINT}") from None
        tokens = [(x if type(x) is int else None,  # type(): not bool
                   x if isinstance(x, _NotAnId) else json.dumps(x)) for x in items]
    else:
        # More digits than any vocabulary's ids have is out of range, whatever int()'s digit limit.
        tokens = [((int(t) if len(t) < 20 else tok.vocab_size) if _ID.fullmatch(t) else None, t)
                  for t in (_ASCII_SPACE.split(text) if text else [])]
    ids: list[int] = []
    for n, (i, spelled) in enumerate(tokens, 1):
        if i is None:
            raise TokenizerError(f"{name}: {_short(spelled)} (token {n}) is not a token id; {_IDS_HINT}")
        if not 0 <= i < tok.vocab_size:
            raise TokenizerError(f"{name}: token id {_short(spelled)} (token {n}) is not in vocabulary {tok.name} "
                                 f"(ids are 0..{tok.vocab_size - 1})")
        ids.append(i)
    return ids


def _short(token: str, limit: int = 40) -> str:
    """A token as an error message shows it: quoted, escaped, one line, not too long."""
    return repr(token if len(token) <= limit else token[:limit] + "...")


def _iter_text(sources: Sequence[str] | None) -> Iterator[tuple[str, str]]:
    """(name, text) of each file, or of stdin when there are none. Text is read exactly (\\r\\n kept)."""
    if not sources:
        yield "<stdin>", _utf8(_read_stdin(), "<stdin>")
        return
    for src in sources:
        p = Path(src)
        if not p.is_file():
            raise TokenizerError(f"{src} is not a file")
        yield src, _utf8(p.read_bytes(), src)


def _stdin() -> Any:
    """Standard input, its bytes where it has them; a one-line error where it is closed."""
    stdin = sys.stdin
    # Python sets sys.stdin to None when the process starts with descriptor 0 closed (`0<&-`).
    if stdin is None or getattr(stdin, "closed", False):
        raise TokenizerError("standard input is closed, so there is nothing to read: give files with --input FILE, "
                             "or pipe the input in")
    return getattr(stdin, "buffer", stdin)


def _read_stdin() -> bytes:
    """All of standard input, or a one-line error where there is none to read."""
    try:
        data = _stdin().read()
    except OSError as e:  # e.g. `< folder`: EISDIR
        raise TokenizerError(f"cannot read standard input ({e.strerror or e}): give files with --input FILE, "
                             "or pipe the input in") from None
    # A text stream without bytes (a StringIO): back to the bytes it stands for, lone surrogates
    # kept as invalid UTF-8 so that _utf8 reports them.
    return data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")


def _utf8(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{name} is not UTF-8 text (bad byte at offset {e.start}); convert it first") from None


def _pick(tokenizer: str | None) -> Tokenizer:
    return Tokenizer.from_spec(tokenizer)
