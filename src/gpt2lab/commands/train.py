"""`gpt2lab train`: pretrain on a prepared data folder and report how the run ended; the loop is
gpt2lab.train's."""

from __future__ import annotations

import os

from ..config import TrainConfig
from ..metrics import raise_if_stopped, summary
from ..train import pretrain
from . import FLAT, Annotated

DEFAULTS = TrainConfig()


def train(*, data: str, out: str, config: Annotated[TrainConfig, FLAT] = DEFAULTS,
          resume: bool = False) -> str | None:
    """Train a GPT-2 from scratch on a prepared data folder (under torchrun: DDP, or FSDP2 with --fsdp).

    Args:
        data: a folder written by `gpt2lab prepare SOURCE --out DATA_DIR`
        out: the run folder: checkpoints/, metrics.jsonl, loss.png, provenance.jsonl
        resume: continue the run in --out from its newest checkpoint
    """
    result = pretrain(data, out, config, resume=resume)
    report = summary(result, out) if int(os.environ.get("RANK", "0")) == 0 else ""  # rank 0 reports
    raise_if_stopped(result, report)
    return report or None
