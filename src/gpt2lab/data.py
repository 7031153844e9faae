"""Corpora -> token shards -> training batches, and the catalog of named corpora.

`prepare` turns a corpus into a data folder; `TokenShards` and `Loader` read it back:

    manifest.json        written last: a folder holding it is complete
    tokenizer/           the tokenizer the tokens were made with (Tokenizer.save)
    train_000000.bin ... the training split, one stream of tokens cut into shards
    val_000000.bin ...   the held-out split: whole documents, none of them also in train

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

import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .errors import DataError
from .fetch import sha256_file

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gpt2lab-tokens"
FORMAT_VERSION = 1
MAGIC = b"GPT2LTOK"
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, bytes per token, token count, reserved


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

    def _finish(self) -> None:
        self._file.seek(0)
        self._file.write(HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self._count))
        self._file.close()
        self._file = None
        name = shard_name(self.split, len(self.shards))
        os.replace(self._tmp, self.folder / name)
        self.shards.append({"file": name, "tokens": self._count, "sha256": sha256_file(self.folder / name)})


# -- reading a prepared folder ---------------------------------------------------------------


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared data folder (raises DataError when the folder is not complete)."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        why = ("does not exist" if not Path(data_dir).exists()
               else "has no manifest.json (never prepared, or interrupted)")
        raise DataError(f"{data_dir} is not a prepared data folder: it {why}; "
                        f"run `gpt2lab prepare SOURCE --out {data_dir}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); prepare the folder again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} is not a gpt2lab data manifest; prepare the folder again")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise DataError(f"{path} was written by a newer gpt2lab (version {manifest['version']}); upgrade gpt2lab")
    return manifest


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a prepared folder was made with (checked against the manifest's hash)."""
    from .tokenizer import Tokenizer

    manifest = read_manifest(data_dir)
    tok = Tokenizer.from_dir(Path(data_dir) / "tokenizer")
    if tok.sha256 != manifest["tokenizer"]["sha256"]:
        raise DataError(f"{data_dir}/tokenizer is vocabulary {tok.sha256[:12]}..., but the tokens were made with "
                        f"{manifest['tokenizer']['sha256'][:12]}...; prepare the folder again")
    return tok


class TokenShards:
    """A memory-mapped view of one split of a prepared folder, as one stream of `n_tokens` tokens."""

    def __init__(self, data_dir: str | Path, split: Split) -> None:
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        manifest = read_manifest(data_dir)
        info = manifest["splits"][split]
        if not info["shards"]:
            raise DataError(f"{data_dir} has no {split} tokens (prepared with --val-fraction 0?); "
                            "prepare it again with a validation split")
        self.data_dir, self.split = Path(data_dir), split
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]
        self.paths = [self.data_dir / s["file"] for s in info["shards"]]
        counts = []
        for path, rec in zip(self.paths, info["shards"], strict=True):
            if not path.is_file():
                raise DataError(f"{path} is missing; prepare the folder again")
            self.dtype, count = read_shard_header(path)
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
        return out


class Loader:
    """Batches of (x, y) from one split: windows of block_size + 1 tokens, y being x shifted by one.

    A batch is a function of (seed, step, index) alone, never of what was read before, so a
    resumed run reads exactly what an uninterrupted one would have, and `index` (the global
    micro-batch index within the step, rank * grad_accum + micro_step) makes 2 ranks x 1
    micro-batch read the same data as 1 rank x 2 micro-batches. Windows start anywhere in the
    split's stream, uniformly, and may cross shard and document boundaries.
    """

    def __init__(self, data_dir: str | Path, split: Split, *, batch_size: int, block_size: int,
                 seed: int = 0) -> None:
        for name, value, least in (("batch_size", batch_size, 1), ("block_size", block_size, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or value < least:
                raise DataError(f"{name} must be an integer >= {least}, got {value!r}")
        self.shards = TokenShards(data_dir, split)
        if self.shards.n_tokens < block_size + 1:
            raise DataError(f"the {split} split of {data_dir} has {self.shards.n_tokens} tokens, fewer than one "
                            f"window of block_size + 1 = {block_size + 1}; use a smaller block size or more data")
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.vocab_size = self.shards.vocab_size

    def get(self, step: int, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch `index` of optimizer step `step`: x, y int64 of shape (batch_size, block_size)."""
        rng = np.random.default_rng([self.seed, step, index])  # a fresh stream per batch: no hidden state
        starts = rng.integers(0, self.shards.n_tokens - self.block_size, size=self.batch_size)
        return self._batch(starts)

    def eval_batches(self, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """n fixed batches for validation, the same on every call: windows evenly spaced over the split."""
        last = self.shards.n_tokens - self.block_size - 1
        starts = np.linspace(0, last, n * self.batch_size).round().astype(np.int64)
        for b in range(n):
            yield self._batch(starts[b * self.batch_size:(b + 1) * self.batch_size])

    def _batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.from_numpy(self.shards.read(starts, self.block_size + 1))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
