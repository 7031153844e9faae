"""`gpt2lab demo` (and `make demo`); the stages are gpt2lab.demo's."""

from __future__ import annotations

from .. import demo as library
from ..config import TrainConfig
from . import FLAT, Annotated


def demo(*, data: str | None = None, out: str = "runs/demo", vocab_size: int = library.DEMO_VOCAB, threads: int = 2,
         config: Annotated[TrainConfig, FLAT] = library.DEMO_CONFIG) -> str:
    """Train a small GPT-2 on Shakespeare on this CPU for a few minutes, then sample from it and report.

    Args:
        data: your own corpus instead of Shakespeare: a text file, a folder of .txt files or a .jsonl file
        out: folder for the vocabulary, the prepared tokens and the runs (each run gets a new folder)
        vocab_size: ids of a BPE vocabulary learned from the training split; 0 uses GPT-2's own 50,257
        threads: CPU threads to train with
    """
    return library.demo(data=data, out=out, vocab_size=vocab_size, threads=threads, config=config)
