"""`gpt2lab convert` and `gpt2lab info`: checkpoints between formats, and what one holds;
the work is gpt2lab.checkpoint's."""

from __future__ import annotations

from typing import Any, Literal

from .. import checkpoint
from . import Annotated, positional


def convert(src: Annotated[str, positional("SRC")], dst: Annotated[str, positional("DST")], /, *,
            to: Literal["hf", "gpt2lab"] = "gpt2lab", force: bool = False) -> str:
    """Convert a checkpoint between gpt2lab's format and a Hugging Face GPT-2 folder.

    Args:
        src: a gpt2lab checkpoint, run folder, HF folder, or Hub model name (gpt2, owner/name[@revision])
        dst: a new or empty folder to write
        to: the format to write
        force: replace DST if it holds a checkpoint of this kind that gpt2lab wrote (never anything else)
    """
    return checkpoint.convert(src, dst, to=to, force=force)


def info(path: Annotated[str, positional("PATH")], /) -> dict[str, Any]:
    """Describe a checkpoint: format, config, parameter count and size on disk.

    Args:
        path: a gpt2lab checkpoint, run folder, HF folder, LoRA adapter, or Hub model name (gpt2, owner/name)
    """
    return checkpoint.info(path)
