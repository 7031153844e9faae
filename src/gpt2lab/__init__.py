"""gpt2lab: train, fine-tune, run, evaluate and serve GPT-2 on PyTorch."""

from .checkpoint import export_hf, load_model, load_tokenizer, save_checkpoint
from .config import PRESETS, GPTConfig, preset
from .model import GPT
from .tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "PRESETS", "Tokenizer", "export_hf", "load_model", "load_tokenizer", "preset",
           "save_checkpoint"]
__version__ = "0.1.0"
