"""gpt2lab: train, fine-tune, run, evaluate and serve GPT-2 on PyTorch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public names -> the module that defines them. They are imported on first use, so that
# `import gpt2lab` (and `gpt2lab tokenizer ...`) does not pay for importing torch.
_EXPORTS = {
    "GPT": "model",
    "GPTConfig": "config",
    "PRESETS": "config",
    "preset": "config",
    "Tokenizer": "tokenizer",
    "export_hf": "checkpoint",
    "load_model": "checkpoint",
    "load_tokenizer": "checkpoint",
    "save_checkpoint": "checkpoint",
}
__all__ = ["GPT", "GPTConfig", "PRESETS", "Tokenizer", "export_hf", "load_model", "load_tokenizer", "preset",
           "save_checkpoint"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .checkpoint import export_hf, load_model, load_tokenizer, save_checkpoint
    from .config import PRESETS, GPTConfig, preset
    from .model import GPT
    from .tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpt2lab' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
