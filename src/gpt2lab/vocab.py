"""A byte-level BPE vocabulary and the files it is read from.

A vocabulary is two files in OpenAI's format (Hugging Face uses the same content under other names):
    encoder.json  (HF: vocab.json)   {token: id}; ordinary tokens are bytes spelled with GPT-2's
                                     byte -> printable-character map, special ones are literal text
    vocab.bpe     (HF: merges.txt)   "#version: 0.2", then one merge "left right" per line, in order
A Hugging Face fast-tokenizer file (tokenizer.json) of GPT-2's kind is read too. gpt2lab.tokenizer
turns a Vocabulary into a Tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import TokenizerError


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, so BPE files can be plain text.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, ...) are shifted to
    U+0100 and up, in byte order. Space becomes "Ġ", newline "Ċ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in out)
    out.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return out


@functools.cache
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


@functools.cache
def _unspell_table() -> dict[int, str]:
    # str.translate to Latin-1 characters, then .encode("latin-1"): the bytes, at C speed. Latin-1
    # characters that GPT-2 never writes (space, controls) go to one that makes the encode fail.
    table = {ord(c): "\uffff" for c in map(chr, range(256))}
    table.update({ord(c): chr(b) for c, b in unicode_to_byte().items()})
    return table


def _unspell(spelled: str) -> bytes:
    """The bytes a token spelled in GPT-2's files stands for (UnicodeEncodeError if not spelled so)."""
    return spelled.translate(_unspell_table()).encode("latin-1")


def _spell(token: bytes) -> str:
    """A token's bytes as GPT-2's files write them."""
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


# -- the vocabulary ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """A byte-level BPE vocabulary: every token by id, and the merges in priority order.

    tokens[i] is bytes for an ordinary token, str for a special token (e.g. "<|endoftext|>").
    """

    tokens: tuple[bytes | str, ...]
    merges: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def from_json(cls, encoder: dict[str, int], merges: list[tuple[str, str]], *, source: str) -> Vocabulary:
        """Read the contents of encoder.json and vocab.bpe, checking that they describe a byte-level BPE."""
        def as_bytes(spelled: str, where: str) -> bytes:
            try:
                return _unspell(spelled)
            except UnicodeEncodeError as e:
                raise TokenizerError(f"{source}: {where} {spelled!r} is not spelled with GPT-2's byte characters; "
                                     "this is not a byte-level BPE vocabulary") from e

        if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
            raise TokenizerError(f"{source}: the encoder must be a JSON object mapping tokens to integer ids")
        n = len(encoder)
        if sorted(encoder.values()) != list(range(n)):
            raise TokenizerError(f"{source}: token ids must be 0..{n - 1}, each used once; this encoder has gaps "
                                 "or repeats")
        ordinary: set[str] = set(byte_to_unicode().values())
        missing = [c for c in ordinary if c not in encoder]
        if missing:
            raise TokenizerError(f"{source}: the encoder lacks the byte token {missing[0]!r} ({len(missing)} missing); "
                                 "a byte-level BPE vocabulary needs all 256")
        byte_merges: list[tuple[bytes, bytes]] = []
        for i, merge in enumerate(merges):
            if not (isinstance(merge, tuple | list) and len(merge) == 2 and all(isinstance(m, str) for m in merge)):
                raise TokenizerError(f"{source}: merge {i + 1} is {merge!r}, not a pair of tokens 'left right'")
            left, right = merge
            for part in (left, right, left + right):
                if part not in encoder:
                    raise TokenizerError(f"{source}: merge {i + 1} ({left} {right}) uses {part!r}, which the encoder "
                                         "lacks; encoder and merges do not belong together")
            ordinary.add(left + right)
            byte_merges.append((as_bytes(left, "merge part"), as_bytes(right, "merge part")))
        tokens: list[bytes | str] = [b""] * n
        for spelled, i in encoder.items():
            # Entries that no merge creates (e.g. "<|endoftext|>") are special tokens, taken literally.
            tokens[i] = as_bytes(spelled, "token") if spelled in ordinary else spelled
        return cls(tokens=tuple(tokens), merges=tuple(byte_merges))

    def to_json(self) -> tuple[dict[str, int], list[str]]:
        """(encoder.json's mapping, vocab.bpe's merge lines)."""
        encoder = {(t if isinstance(t, str) else _spell(t)): i for i, t in enumerate(self.tokens)}
        return encoder, [f"{_spell(a)} {_spell(b)}" for a, b in self.merges]

    @functools.cached_property
    def sha256(self) -> str:
        """A hash of the content (tokens by id, merges in order), the same whichever files it came from."""
        h = hashlib.sha256(b"gpt2lab byte-level BPE v1\n")
        h.update(b"".join(b"S" + t.encode() + b"\n" if isinstance(t, str) else b"T" + t.hex().encode() + b"\n"
                          for t in self.tokens))
        h.update(b"".join(b"M" + a.hex().encode() + b" " + b.hex().encode() + b"\n" for a, b in self.merges))
        return h.hexdigest()

    @property
    def special(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens) if isinstance(t, str)}



def read_bpe_files(encoder_json: str | Path, vocab_bpe: str | Path) -> Vocabulary:
    """Read a vocabulary from OpenAI's encoder.json + vocab.bpe (or HF's vocab.json + merges.txt)."""
    encoder_json, vocab_bpe = Path(encoder_json), Path(vocab_bpe)
    for f in (encoder_json, vocab_bpe):
        if not f.is_file():
            raise TokenizerError(f"{f} does not exist: give an encoder.json (vocab.json) and vocab.bpe (merges.txt)")
    try:
        encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
        lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{encoder_json} or {vocab_bpe} cannot be read ({e}); the file is corrupt") from e
    merges: list[tuple[str, str]] = []
    for n, line in enumerate(lines, 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{vocab_bpe}:{n}: expected a merge 'left right', got {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    return Vocabulary.from_json(encoder, merges, source=f"{encoder_json.name}+{vocab_bpe.name}")


def read_hf_tokenizer_json(path: Path) -> Vocabulary:
    """The vocabulary in a Hugging Face fast-tokenizer file, if it is GPT-2's kind of tokenizer:
    byte-level BPE with GPT-2's regex, no normalizer (anything else would give other ids)."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        byte_level = (model.get("type") == "BPE" and spec.get("normalizer") is None
                      and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                      and not pre.get("add_prefix_space", True))
        if not byte_level:
            raise TokenizerError(f"{path} is not GPT-2-style byte-level BPE (model {model.get('type')}, "
                                 f"pre-tokenizer {pre.get('type')}); gpt2lab reads only those")
        encoder = dict(model["vocab"])
        encoder.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise TokenizerError(f"{path} is not a readable Hugging Face tokenizer.json ({e})") from e
    return Vocabulary.from_json(encoder, merges, source=str(path))  # type: ignore[arg-type]

