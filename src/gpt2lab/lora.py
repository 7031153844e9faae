"""LoRA (Hu et al., 2021): train a low-rank update B·A beside each frozen linear layer, or merge it in.

    y = x Wᵀ + b + (alpha / rank) · dropout(x) Aᵀ Bᵀ        A (rank, in), B (out, rank)

A starts as nn.Linear's own init (Kaiming uniform) and B at zero, so an adapted model computes
exactly what its base does until B trains. `LoRALinear` is an nn.Linear that keeps the base's
`weight` and `bias` under their own names and adds `lora_A`, `lora_B`: state-dict keys of the
base are unchanged, and the adapter is the tensors whose names end in lora_A / lora_B.

An adapter folder holds
    adapter.json         {"format": "gpt2lab-lora", rank, alpha, dropout, targets, modules,
                          "base": {path, format, sha256 of its weight files, config}}
    adapter.safetensors  the lora_A / lora_B tensors, named as in the model's state dict
    tokenizer/           the base's tokenizer record
checkpoint.load_model(adapter folder) loads the base it names, checks the hash, and merges.

peft would do this too, but it needs transformers and accelerate at run time, and gpt2lab's
model is a plain nn.Module: LoRALinear, apply_lora and merge_lora below are the whole method.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError

ADAPTER_CONFIG = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FORMAT = "gpt2lab-lora"
ADAPTER_VERSION = 1
# What --lora-targets may name; a module is adapted when its name ends in "." + a target.
TARGETS = ("c_attn", "c_proj", "c_fc", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Where LoRA goes and how big it is."""

    rank: int = 8
    """Rank r of each update B·A."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank (so changing rank keeps the learning rate meaningful)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
    """Linear layers to adapt: c_attn, c_fc, c_proj (both attention's and the MLP's), attn.c_proj, mlp.c_proj."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0 < self.alpha < float("inf"):
            raise ConfigError(f"LoRA alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("LoRA needs at least one target module")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ConfigError(f"unknown LoRA target(s) {unknown}; choose from {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


class LoRALinear(nn.Linear):
    """An nn.Linear whose weight and bias are a base layer's (frozen), plus a trainable B·A."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight we are about to share
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scale = config.scale
        # The adapters train in fp32 over a bf16 (or fp16) base; otherwise in the base's dtype.
        dtype = torch.float32 if base.weight.dtype in (torch.bfloat16, torch.float16) else base.weight.dtype
        kw = {"device": base.weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(config.rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as in the paper's code
        # nn.Dropout copies its input even at p=0, and that copy is what A's gradient keeps: one
        # more activation per adapted layer. Without dropout A sees the very tensor the base saves.
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        low = F.linear(self.lora_dropout(x), self.lora_A)  # (..., rank)
        # Added in place: no (..., out) temporary for the update, and no backward needs `out` itself.
        flat = out.view(-1, self.out_features)
        B = self.lora_B.to(low.dtype)  # under autocast, F.linear gave bf16; in-place ops are not autocast
        return flat.addmm_(low.view(-1, low.shape[-1]), B.t(), alpha=self.scale).view(out.shape)

    def delta(self) -> torch.Tensor:
        """The update to the weight, (out, in): scale · B·A."""
        return self.scale * (self.lora_B @ self.lora_A)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing what this layer computes (without dropout)."""
        with torch.device("meta"):
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            plain.weight = nn.Parameter(self.weight + self.delta().to(self.weight.dtype))
            if self.bias is not None:
                plain.bias = nn.Parameter(self.bias.detach().clone())
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scale={self.scale:g}"


def frozen_bf16(name: str) -> bool:
    """Whether a bf16 LoRA run holds this tensor of the base in bf16: the blocks' Linear weights and
    biases. Under bf16 autocast these layers compute with bf16 copies of them anyway, so holding
    them in bf16 gives the same results at half the memory (gpt2-xl's base: 3.0 GB, not 5.9).
    Embeddings (the tied head with them) and LayerNorms keep fp32, and so does the residual stream.
    """
    return name.startswith("transformer.h.") and name.endswith(
        tuple(f"{m}.{p}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") for p in ("weight", "bias")))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def target_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the nn.Linear modules that `targets` select (the tied output head never is)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
            and any(name.endswith("." + t) for t in targets)]


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and wrap the targeted linear layers in LoRALinear, in place.

    Returns the adapted modules' names. Only the lora_A / lora_B tensors require grad afterwards.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers: merge them first (merge_lora)")
    names = target_names(model, config.targets)
    if not names:
        raise ConfigError(f"LoRA targets {list(config.targets)} match no linear layer of the model")
    for name in names:
        layer = model.get_submodule(name)
        side = min(layer.in_features, layer.out_features)
        if config.rank > side:
            raise ConfigError(f"LoRA rank {config.rank} exceeds the smaller side ({side}) of {name}: a low-rank "
                              "update must have a lower rank; choose a smaller --lora-rank")
    model.requires_grad_(False)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), config))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into a plain nn.Linear, in place; the model is a plain, trainable GPT again."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(model, name, m.merged())
    return model.requires_grad_(True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter: every lora_A / lora_B tensor, contiguous on the CPU, named as in the state dict."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
            if k.endswith((".lora_A", ".lora_B"))}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- adapter folders -------------------------------------------------------------------------


def save_adapter(model: nn.Module, folder: Path, *, config: LoRAConfig, base: dict[str, Any]) -> None:
    """Write adapter.json and adapter.safetensors into an existing folder.

    base: how to find and check the base model: {"path", "format", "sha256", "config"}.
    """
    tensors = lora_state_dict(model)
    if not tensors:
        raise ValueError("the model has no LoRA layers to save")
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, **config.to_dict(), "modules": modules,
            "base": base}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: str | Path) -> tuple[LoRAConfig, dict[str, Any]]:
    """(the LoRAConfig, the whole adapter.json) of an adapter folder."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a LoRA adapter: it has no {ADAPTER_CONFIG}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the adapter is corrupt") from e
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path} is not a gpt2lab LoRA adapter record")
    if meta.get("version", 0) > ADAPTER_VERSION:
        raise CheckpointError(f"{path} was written by a newer gpt2lab (version {meta['version']}); upgrade gpt2lab")
    try:
        config = LoRAConfig(rank=meta["rank"], alpha=meta["alpha"], dropout=meta["dropout"],
                            targets=tuple(meta["targets"]))
        if not {"path", "sha256"} <= set(meta["base"]):
            raise KeyError("base.path and base.sha256")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is incomplete or invalid ({e!r}); the adapter is corrupt") from e
    return config, meta


def safetensors_numel(path: Path) -> int:
    """Elements in a safetensors file, from its header (no tensor is read)."""
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def load_adapter_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy an adapter folder's lora_A / lora_B tensors into a model that already has LoRA layers."""
    path = Path(folder) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; the adapter is incomplete") \
            from None
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt") from e
    expected = lora_state_dict(model)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise CheckpointError(f"{path} does not fit this model's LoRA layers (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); was it trained on another base or with other targets?")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != expected[name].shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, the model expects "
                                      f"{tuple(expected[name].shape)}; the rank or the base differs")
            params[name].copy_(t)


def load_adapter(model: nn.Module, folder: str | Path) -> LoRAConfig:
    """Apply the LoRA layers an adapter folder describes to `model` (its base) and load its weights."""
    config, _ = read_adapter_config(folder)
    apply_lora(model, config)
    load_adapter_weights(model, folder)
    return config
