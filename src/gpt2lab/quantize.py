"""Speed modes for inference on CPUs: bf16 weights, and int8 weight-only quantization.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth:
halving the bytes per weight roughly doubles tokens per second.

    fp32  the model as trained. Linear layers are computed by gpt2lab's kernel (gemv.py) from
          weights packed for streaming, or, where it cannot be built, by oneDNN; both stream the
          weights faster than F.linear does for one row (M=1 GEMV) on two threads.
    bf16  weights and activations in bfloat16, Linear layers on oneDNN with weights prepacked
          into its blocked layout (plain F.linear in bf16 is slower than fp32 for one row).
    int8  every Linear's weight (and the tied embedding / output head) as int8 with one scale
          per output row (symmetric, round to nearest); the weights are widened in the matmul
          (gpt2lab's kernel, or aten's _weight_int8pack_mm), so a weight costs 1 byte.

These modules are for inference only: they hold no gradients and are not saved by checkpoint.
`load` builds a model in a mode straight from a checkpoint, converting tensor by tensor, so that
a bf16 or int8 model never holds its float32 weights (gpt2-xl in int8: 1.6 GB, not 6.2).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import allocator, gemv
from .device import native_bf16
from .errors import GenerationError
from .model import GPT

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

Mode = Literal["fp32", "bf16", "int8"]
MODES: tuple[Mode, ...] = ("fp32", "bf16", "int8")


def load(path: str | Path, mode: Mode, *, tokenizer: Tokenizer | None = None,
         device: torch.device | str = "cpu", pack: bool = True) -> GPT:
    """load_model(path) then prepare(model, mode), holding each weight once on a CPU.

    Each tensor is read into its own memory, converted (made contiguous, to bf16, or quantized to
    int8) and dropped, largest first (the embedding, while little else is held), so the peak is
    about the converted model plus one tensor: a bf16 or int8 model never holds float32 weights,
    and an HF folder's transposed fp32 weights are not held twice. On a GPU, load_model's path.
    """
    from .checkpoint import adapter_folder, load_model, open_weights

    if mode not in MODES:
        raise GenerationError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if torch.device(device).type != "cpu" or adapter_folder(path) is not None:
        return prepare(load_model(path, tokenizer=tokenizer, device=device), mode, pack=pack)
    model, stored = open_weights(path, tokenizer=tokenizer, copy=True)
    weights = {f"{n}.weight" for n, m in model.transformer.h.named_modules(prefix="transformer.h")
               if isinstance(m, nn.Linear)} | {"transformer.wte.weight"}
    tensors: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
    for name, t in stored:
        if mode == "int8" and name in weights:
            tensors[name] = quantize_rows(t)
        elif mode == "int8" and name.removesuffix(".bias") + ".weight" in weights:
            tensors[name] = t.contiguous()  # a Linear's bias: Int8Linear picks its dtype, as in prepare
        else:  # contiguous: an HF folder's transposed weights, in the layout oneDNN reads fastest
            tensors[name] = t.to(torch.float32 if mode == "fp32" else torch.bfloat16).contiguous()
        del t
        allocator.release()  # each tensor converted leaves holes in the heap; 0.3-0.8 GB on gpt2-xl
    if mode in ("fp32", "bf16"):
        model.load_state_dict(tensors | {"lm_head.weight": tensors["transformer.wte.weight"]}, assign=True)
        model.tie_weights()
        del tensors  # prepare packs each Linear's weight; the plain one is freed as it goes
        return prepare(model, mode, pack=pack)
    return _assemble_int8(model, tensors, pack)


def _assemble_int8(model: GPT, tensors: dict[str, Any], pack: bool) -> GPT:
    """Fill a meta model with quantized Linear weights ((q, scales) pairs) and bf16 tensors."""
    for prefix, parent in model.transformer.h.named_modules(prefix="transformer.h"):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                key = f"{prefix}.{name}"
                setattr(parent, name, Int8Linear(*tensors.pop(key + ".weight"), tensors.pop(key + ".bias"), pack=pack))
                allocator.release()  # the unpacked copy's memory goes back to the OS
    model.lm_head = Int8Linear(*tensors.pop("transformer.wte.weight"), None, pack=pack)
    model.transformer.wte = TiedEmbedding(model.lm_head)
    for key, t in tensors.items():  # positions, LayerNorms
        module, _, attr = key.rpartition(".")
        setattr(model.get_submodule(module), attr, nn.Parameter(t, requires_grad=False))
    return model.eval()


def prepare(model: GPT, mode: Mode, *, pack: bool = True) -> GPT:
    """Convert a model (in place) for inference in `mode`; returns it in eval mode.

    pack: run the fp32/bf16 Linear layers through oneDNN (about 2x faster than F.linear for
          decoding's single rows at 2 threads). fp32 weights are used where they are (the head
          shares the embedding); bf16 weights are prepacked once, which is faster still, and the
          head gets a packed copy of the embedding (its size once more). torch.compile cannot
          trace these calls, so a compiled model is prepared with pack=False.
    """
    if mode not in MODES:
        raise GenerationError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(model.transformer.wte, nn.Embedding) or any(
            isinstance(m, PackedLinear | KernelLinear | Int8Linear) for m in model.modules()):
        raise GenerationError("this model was already prepared for a speed mode; prepare a model as loaded "
                              "(load_model), or load it in its mode with quantize.load(path, mode)")
    model.eval()
    if mode in ("fp32", "bf16"):
        model.to(torch.float32 if mode == "fp32" else torch.bfloat16)
        cpu = model.transformer.ln_f.weight.device.type == "cpu"
        # bf16 on the kernel only with the CPU's bf16 dot products: widened, it trails oneDNN in batches.
        if pack and cpu and gemv.kernels() is not None and (mode == "fp32" or native_bf16()):
            _replace_linears(model, lambda linear: KernelLinear(linear.weight, linear.bias))
            model.lm_head = KernelLinear(model.transformer.wte.weight, None)  # packed once, read by both
            model.transformer.wte = TiedEmbedding(model.lm_head)
        elif pack and cpu and _has_mkldnn_linear():
            _replace_linears(model, lambda linear: PackedLinear(linear.weight, linear.bias))
            model.lm_head = PackedLinear(model.transformer.wte.weight, None)
        return model
    # int8: quantize from the original weights, then the rest (LayerNorms, biases, positions) to bf16.
    _replace_linears(model, lambda linear: Int8Linear.from_weight(linear.weight, linear.bias, pack=pack))
    # The output head and the token embedding are one matrix in GPT-2: quantize it once.
    model.lm_head = Int8Linear.from_weight(model.transformer.wte.weight, None, pack=pack)
    model.transformer.wte = TiedEmbedding(model.lm_head)
    for module in model.modules():  # the rest (LayerNorms, positions) in bf16; Int8Linear keeps its own
        if not isinstance(module, Int8Linear):
            for name, p in module.named_parameters(recurse=False):
                setattr(module, name, nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False))
    return model


def _linears(model: GPT) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, Linear) for every Linear in the transformer blocks."""
    return [(parent, name, child) for parent in model.transformer.h.modules()
            for name, child in parent.named_children() if isinstance(child, nn.Linear)]


def _replace_linears(model: GPT, make: Any) -> None:
    """Replace each block's Linear by make(linear), dropping each original as soon as it is replaced
    (a list of them all would hold every original weight until the end: twice the model at the peak)."""
    linears = _linears(model)
    while linears:
        parent, name, linear = linears.pop()
        setattr(parent, name, make(linear))
        del linear
        allocator.release()  # the replaced weight's memory goes back to the OS


# -- oneDNN-packed fp32 / bf16 ----------------------------------------------------------------


def _has_mkldnn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """A Linear on CPU computed by oneDNN (the kernel inductor uses), fp32 or bf16.

    fp32 weights are used as they are, sharing their storage; bf16 weights are prepacked once
    into oneDNN's blocked layout (plain bf16 rows are slower). Equals F.linear up to the order
    of the additions.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().contiguous()  # a copy only for transposed views (HF checkpoints)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        if weight.dtype == torch.bfloat16:
            # The batch-size hint picks the layout; 1 suits decoding and works for any batch.
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


class KernelLinear(nn.Module):
    """An fp32 or bf16 Linear on CPU computed by gpt2lab's kernel (gemv.py) from a packed copy of
    its weight (in the weight's dtype): decoding streams it faster than oneDNN does. A row's
    result does not depend on the rows batched with it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", gemv.pack(weight.detach()), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv.linear(x.to(self.weight.dtype), self.weight, self.out_features, self.in_features, None, self.bias)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return gemv.rows(self.weight, idx, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# -- int8 ------------------------------------------------------------------------------------


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q (N, K) int8, scales (N,) float32) with weight ~= q * scales[:, None]."""
    weight = weight.detach()
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)  # rows contiguous, as the kernel needs
    scales = torch.empty(weight.size(0), dtype=torch.float32, device=weight.device)
    for i in range(0, weight.size(0), 512):  # in blocks of rows: float temporaries stay small
        w = weight[i:i + 512].float()
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # an all-zero row gets a harmless tiny scale
        q[i:i + 512] = torch.round(w / s[:, None]).clamp(-127, 127)
        scales[i:i + 512] = s
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (q * scales).T + bias, with q int8 (N, K) and one scale per output row.

    On CPUs with AVX-512, gpt2lab's own kernel (gemv.py): q packed for streaming, scales and bias
    float32, activations widened to float32. Elsewhere aten's _weight_int8pack_mm (CPU) or a
    dequantizing matmul, with scales, bias and activations in bfloat16.
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *,
                 pack: bool = True) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.packed = pack and q.device.type == "cpu" and gemv.kernels() is not None
        dtype = torch.float32 if self.packed else torch.bfloat16
        self.register_buffer("weight", gemv.pack(q) if self.packed else q, persistent=False)
        self.register_buffer("scales", scales.to(dtype), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.fused = hasattr(torch, "_weight_int8pack_mm")

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, pack: bool = True) -> Int8Linear:
        q, scales = quantize_rows(weight)
        return cls(q, scales, bias, pack=pack)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if self.packed:
            return gemv.linear(x, self.weight, self.out_features, self.in_features, self.scales, self.bias)
        if self.fused and x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)), self.weight, self.scales)
            y = y.view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The int8 rows idx of q, shaped idx.shape + (K,)."""
        return gemv.rows(self.weight, idx, self.out_features, self.in_features) if self.packed else self.weight[idx]

    def dequantized(self) -> torch.Tensor:
        """The weight these int8 values stand for, as float32 (N, K)."""
        q = gemv.unpack(self.weight, self.out_features, self.in_features) if self.packed else self.weight
        return q.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.packed}"


class TiedEmbedding(nn.Module):
    """Token embeddings read from the output head's rows (GPT-2 ties the two): an Int8Linear's,
    dequantized to bf16, or a KernelLinear's fp32 or bf16 rows, so the matrix is held once."""

    def __init__(self, head: Int8Linear | KernelLinear) -> None:
        super().__init__()
        self.head = [head]  # a list, so the head's buffers are not registered twice

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        if isinstance(head, KernelLinear):
            return head.rows(idx)
        return (head.rows(idx) * head.scales[idx].unsqueeze(-1)).to(torch.bfloat16)
