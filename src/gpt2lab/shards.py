"""The token-shard format and the one reader of a prepared data folder.

A shard is a 32-byte little-endian header, then its tokens:

    bytes 0-7    magic b"GPT2LTOK"
    bytes 8-11   uint32 format version (1)
    bytes 12-15  uint32 bytes per token: 2 (uint16), or 4 (uint32) when the vocabulary has over 65,536 ids
    bytes 16-23  uint64 number of tokens
    bytes 24-31  zero (reserved)

`DataFolder.open(path)` reads the manifest once and hands out the tokenizer, the loaders and bytes
per token; nothing else reads the manifest or names the files. `is_data_folder` says whether a
folder is one that `gpt2lab.data.prepare` wrote. The layout of a folder is described in gpt2lab.data.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import files
from .errors import DataError
from .fetch import sha256_file
from .tokenizer import Tokenizer

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
