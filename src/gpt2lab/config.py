"""Configuration as keyword-only dataclasses: a model's shape (GPTConfig, and the named presets)
and a training run's (TrainConfig). No torch here."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from .device import native_bf16
from .errors import ConfigError

# Bounds far beyond any GPT-2 (gpt2-xl: 48 layers, 25 heads, 1600 wide, 1024 context, 50,257 ids),
# so that a corrupt or hand-edited config.json is an error, not an allocation that fails deep in torch.
LIMITS = {"n_layer": 4096, "n_head": 4096, "n_embd": 1 << 16, "n_ctx": 1 << 20, "vocab_size": 1 << 24}


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """The shape of a GPT-2 model. Field names follow GPT-2's own `hparams.json`."""

    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    n_ctx: int = 1024
    """Context length: the number of learned positions."""
    vocab_size: int = 50257
    """Number of token ids (GPT-2's BPE has 50257, the last being <|endoftext|>)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (training only)."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon, as in GPT-2."""

    def __post_init__(self) -> None:
        for name, most in LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= most:
                raise ConfigError(f"GPTConfig.{name} must be an integer from 1 to {most:,}, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.layer_norm_epsilon < 1:
            raise ConfigError(f"layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown GPTConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> GPTConfig:
        """Read a Hugging Face `GPT2Config` dict (config.json written by save_pretrained)."""
        if d.get("model_type", "gpt2") != "gpt2":
            raise ConfigError(f"model_type is {d.get('model_type')!r}, not 'gpt2'")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"activation_function {act!r} is not GPT-2's tanh GELU")
        if d.get("n_inner") not in (None, 4 * d["n_embd"]):
            raise ConfigError(f"n_inner={d['n_inner']} is not 4 * n_embd; gpt2lab supports GPT-2's MLP only")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(flag):
                raise ConfigError(f"{flag}=True is not GPT-2 (it changes the attention numerics)")
        if not d.get("scale_attn_weights", True):
            raise ConfigError("scale_attn_weights=False is not GPT-2")
        return cls(
            n_layer=d["n_layer"], n_head=d["n_head"], n_embd=d["n_embd"],
            n_ctx=d.get("n_positions", d.get("n_ctx", 1024)), vocab_size=d["vocab_size"],
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
        )

    def to_hf(self) -> dict[str, Any]:
        """The `GPT2Config` fields that describe this model."""
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd,
            "n_positions": self.n_ctx, "n_ctx": self.n_ctx, "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_epsilon, "activation_function": "gelu_new",
            "n_inner": None, "resid_pdrop": self.dropout, "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
            "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256,
        }

    def num_params(self) -> int:
        """Parameter count with the output head tied to the token embedding."""
        d, L = self.n_embd, self.n_layer
        per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        return self.vocab_size * d + self.n_ctx * d + L * per_block + 2 * d


PRESETS: dict[str, GPTConfig] = {
    # OpenAI's four released sizes.
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # Small shapes for CPU work and tests (vocab_size is usually replaced by the tokenizer's).
    "gpt2-nano": GPTConfig(n_layer=3, n_head=3, n_embd=48, n_ctx=128),
    "gpt2-micro": GPTConfig(n_layer=4, n_head=4, n_embd=128, n_ctx=256),
    "gpt2-mini": GPTConfig(n_layer=6, n_head=6, n_embd=384, n_ctx=256),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """A named preset, with fields replaced by `overrides` (e.g. vocab_size, dropout)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# On a CPU with native bf16, bf16 autocast trains a 6 x 384 GPT-2 1.9x faster than fp32 and a
# 4 x 128 one 1.3x; at 96 wide it breaks even, and narrower models (the demo's 48) run 10% slower,
# their matmuls too small to repay the casts (benchmarks/train/throughput.py and the demo's trials).
CPU_BF16_WIDTH = 128


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that shapes a training run. Every field is also a `gpt2lab train` option."""

    model: str = "gpt2-mini"
    """Model preset (gpt2, gpt2-medium, ..., gpt2-mini) or a config.json; the vocabulary comes from the data."""
    dropout: float = 0.0
    """Dropout probability while training (fine-tuning replaces the checkpoint's with it)."""
    batch_size: int = 32
    """Sequences per optimizer step, over all processes (prompt/completion fine-tuning: examples)."""
    micro_batch: int = 0
    """Sequences per forward pass in each process (0: batch_size / processes); the rest is accumulation."""
    block_size: int = 0
    """Tokens per training sequence (0: the model's context length)."""
    max_steps: int = 1000
    """Optimizer steps to train for (fewer when max_minutes, a signal or patience ends the run first)."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint) after this much wall-clock time; 0 for no limit."""
    lr: float = 6e-4
    """Peak learning rate, reached after warmup."""
    min_lr: float = 6e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr."""
    decay_steps: int = 0
    """Step at which the cosine reaches min_lr (0: max_steps; with max_minutes, the end of the time budget)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Weight decay, applied to 2-D weights only (not biases or LayerNorm parameters)."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW on every parameter. muon: Muon (momentum 0.95; --beta1/--beta2/--eps are
    AdamW's) on the blocks' weight matrices and AdamW on the embeddings, biases and gains, at the
    same --lr (gpt2lab.optim; needs torch 2.9 or later)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    seed: int = 0
    """Seed of the model init, the data order and dropout."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPUs, and on CPUs with native bf16 (AVX512-BF16, AMX) for models 128
    or more wide; else fp32. bf16: bf16 autocast on any device."""
    compile: bool = False
    """Compile the model with torch.compile."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (a GPU when there is one; torchrun ranks take their local GPU)."""
    fsdp: bool = False
    """Under torchrun, shard parameters, gradients and optimizer state with FSDP2 instead of DDP."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    eval_interval: int = 100
    """Evaluate on the validation data every N steps, at the start and at the end (0: only at the end)."""
    eval_batches: int = 20
    """Validation batches per evaluation."""
    log_interval: int = 10
    """Write a metrics line every N steps."""
    ckpt_interval: int = 500
    """Save a checkpoint every N steps, at the end, and (with keep_best) at every new best."""
    keep_last: int = 3
    """Checkpoints to keep (the best one, with keep_best, is kept besides)."""
    keep_best: bool = False
    """Save a checkpoint whenever the validation loss improves, keep it, and name it in best.json."""
    patience: int = 0
    """Stop after this many evaluations without a better validation loss (0: never)."""
    tensorboard: bool = False
    """Also write TensorBoard logs to RUN_DIR/tensorboard (needs the tensorboard package)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device for MFU (0: a data-sheet table for GPUs, a measured matmul on CPU)."""

    def bf16(self, device_type: str, width: int | None = None) -> bool:
        """Whether a run computes under bf16 autocast on this kind of device, for a model `width` wide.

        auto: where bf16 is native and pays: on GPUs, and on CPUs with AVX512-BF16 or AMX for models
        at least CPU_BF16_WIDTH wide (tests/test_train.py checks that its loss curve follows fp32's).
        """
        if self.precision != "auto":
            return self.precision == "bf16"
        if device_type == "cuda":
            return True
        return device_type == "cpu" and native_bf16() and (width is None or width >= CPU_BF16_WIDTH)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # nan and inf pass every comparison below unnoticed
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        if not self.eps > 0:
            raise ConfigError(f"eps must be positive, got {self.eps}")
        positive = ("batch_size", "max_steps", "log_interval", "ckpt_interval", "keep_last", "eval_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("micro_batch", "block_size", "warmup_steps", "decay_steps", "eval_interval", "patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or positive, got {getattr(self, name)}")
        for name in ("max_minutes", "weight_decay", "grad_clip", "peak_tflops", "min_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"AdamW betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.optimizer == "muon":
            import torch  # here, not at the top: this module stays free of torch

            if not hasattr(torch.optim, "Muon"):
                raise ConfigError(f"--optimizer muon needs torch 2.9 or later (torch.optim.Muon) and this is torch "
                                  f"{torch.__version__}: upgrade torch or use --optimizer adamw")
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError("--optimizer muon does not run under --fsdp: Muon orthogonalises whole matrices and "
                              "FSDP shards them; train with DDP (leave out --fsdp) or with --optimizer adamw")
        if self.patience and not self.eval_interval:
            raise ConfigError("patience needs periodic evaluation: set eval_interval too")
        if self.micro_batch and self.batch_size % self.micro_batch:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch ({self.micro_batch})")

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(micro_batch, gradient accumulation steps) for `world_size` processes."""
        micro = self.micro_batch or self.batch_size // world_size
        if micro == 0 or self.batch_size % (micro * world_size):
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch ({micro or '?'}) "
                f"x processes ({world_size}); change --batch-size or --micro-batch"
            )
        return micro, self.batch_size // (micro * world_size)

