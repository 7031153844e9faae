"""`gpt2lab prepare`: tokenize a corpus into a data folder and print what was written, as JSON;
the work is gpt2lab.data.prepare's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import data
from . import Annotated, positional


def prepare(source: Annotated[str, positional("SOURCE")], /, *, out: Path | None = None, tokenizer: str = "gpt2",
            field: str = "text", val_fraction: float = 0.05, shard_tokens: int = 1 << 24, workers: int | None = None,
            decode_errors: data.DecodeErrors = "strict", force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Tokenize a corpus into train/val token shards in a data folder, for `gpt2lab train --data DIR`.

    Running it again on unchanged input (same files, sizes and mtimes; same options and tokenizer) does nothing.

    Args:
        source: a catalog name (shakespeare, kjv), a text file, a folder, a .jsonl file, or hf:NAME[:CONFIG][@SPLIT]
        out: the data folder (default: data/NAME): new, empty or one prepare wrote; replaced when complete
        tokenizer: gpt2, or a folder holding a tokenizer (e.g. one trained with gpt2lab)
        field: the text field of JSONL rows and Hugging Face datasets
        val_fraction: share held out: whole documents, evenly spaced; from too few documents, the text's tail
        shard_tokens: tokens per shard file
        workers: threads that tokenize (default: all cores)
        decode_errors: bytes that are not UTF-8: strict stops, naming the file and byte offset; replace writes U+FFFD
        force: replace a data folder prepared from other input or options, or redo an unchanged one
        progress: show a progress bar
    """
    return data.prepare(source, out=out, tokenizer=tokenizer, field=field, val_fraction=val_fraction,
                        shard_tokens=shard_tokens, workers=workers, decode_errors=decode_errors, force=force,
                        progress=progress)
