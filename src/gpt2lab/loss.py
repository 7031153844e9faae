"""Next-token cross-entropy through GPT-2's output head, without the (tokens, vocab) logits.

With GPT-2's 50,257 ids the head is most of a small model's work: at 6 layers x 384 its three
matmuls (logits, and the gradients of the hidden states and of the tied embedding) are two thirds
of the FLOPs, and the (B, T, V) logits with their fp32 log-softmax and its gradient are most of the
activation memory. `head_loss` takes the tokens a chunk at a time: logits, softmax and both
gradients are computed in the forward pass, so only (chunk, V) is ever live, and backward merely
scales the gradients it kept. The loss and the gradients equal F.cross_entropy's over the full
logits (tests/test_loss.py checks both, fp32 and under bf16 autocast).

The softmax of a chunk (log-sum-exp, the target's logit, probabilities cast to the matmul dtype) is
one pass over the logits through torch.compile, 4.5x faster than the eager kernels, for chunks of
COMPILE_FROM logits or more; smaller ones (small vocabularies) and machines without a compiler
run eagerly, exact too. Compiling costs a process about 85 MiB and, the first time on a machine,
20 s; later processes find it in Inductor's cache.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CHUNK = 1024  # tokens per chunk: (CHUNK, V) logits and probabilities live at once, 103 MB each in bf16
ROWS = 256  # rows per logits matmul: oneDNN's bf16 kernel runs 25% faster on 256 rows than on 1024
COMPILE_FROM = 1 << 22  # logits in a chunk
# The head's columns are padded with zero rows of the weight to a multiple of this, by device type.
# GPT-2's 50,257 is odd: a (tokens, 50257) operand has rows that are not 16-byte aligned, which keeps
# cuBLAS off its fastest kernels. The pad columns are sliced off before the softmax, so the loss and
# gradients are unchanged. On CPU oneDNN measured the same speed either way, so it is left unpadded.
ALIGN = {"cuda": 64}


# Devices where a compiled model's training loss goes through its full logits instead: there
# Inductor fuses the cross-entropy into one pass over them, and the (B, T, V) logits fit. On an H200,
# gpt2 at batch 64 x 1024 trained at 470k tokens/s that way against 422k through head_loss
# (benchmarks/gpu/mfu.py). Evaluation keeps head_loss: without gradients it is the smaller by far
# (at 16 x 1024, 0.31 GiB against 1.63 GiB), and one pass over the logits either way. On CPU it
# measured no faster (benchmarks/train/throughput.py's 6 x 384 in bf16: 1,435 tokens/s against
# 1,502 through head_loss), and the fused head keeps its memory small, so CPUs are not listed.
FULL_LOGITS_WHEN_COMPILED = {"cuda"}


def full_logits(x: torch.Tensor) -> bool:
    """Whether the loss of hidden states `x` should run through full logits (see above)."""
    return (x.device.type in FULL_LOGITS_WHEN_COMPILED and torch.compiler.is_compiling()
            and torch.is_grad_enabled())


def padded(n: int, device: torch.device) -> int:
    """`n` vocabulary columns rounded up to the head's alignment on `device`."""
    align = ALIGN.get(device.type, 1)
    return -(-n // align) * align


def _softmax(logits: torch.Tensor, targets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax in logits' dtype, summed loss in fp32) of a chunk's first `n` columns, both computed
    in fp32; the softmax keeps logits' width, zero in its pad columns."""
    x = logits[:, :n].float()
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, targets[:, None]).squeeze(1)).sum()
    p = torch.exp(x - lse[:, None]).to(logits.dtype)
    return (F.pad(p, (0, logits.shape[1] - n)) if logits.shape[1] > n else p), loss


def _lse_loss(logits: torch.Tensor, targets: torch.Tensor, n: int) -> torch.Tensor:
    """The summed loss of a chunk's first `n` columns alone (evaluation)."""
    x = logits[:, :n].float()
    return (torch.logsumexp(x, dim=-1) - x.gather(1, targets[:, None]).squeeze(1)).sum()


class _Compiled:
    """`fn` through torch.compile on CPU and CUDA, falling back to eager (once, with a warning) if
    the compiler is missing or fails, e.g. without a C++ compiler."""

    def __init__(self, fn) -> None:
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, *args: torch.Tensor):
        x = args[0]
        if (self.failed or x.numel() < COMPILE_FROM or x.device.type not in ("cpu", "cuda")
                or torch.compiler.is_compiling()):
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path is exact too
            log.warning("torch.compile failed (%s); the loss runs eagerly, slower", str(e).splitlines()[0][:200])
            self.failed = True
            return self.fn(*args)


softmax = _Compiled(_softmax)
lse_loss = _Compiled(_lse_loss)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


def _weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The head's weight in `dtype`, with zero rows up to its padded vocabulary."""
    rows = padded(w.shape[0], w.device)
    if rows == w.shape[0]:
        return w.to(dtype)
    out = torch.zeros(rows, w.shape[1], dtype=dtype, device=w.device)
    out[:w.shape[0]] = w
    return out


def _logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    for s in range(0, h.shape[0], ROWS):
        torch.mm(h[s:s + ROWS], w.t(), out=out[s:s + ROWS])
    return out


class _HeadLoss(torch.autograd.Function):
    """sum over rows of cross_entropy(h @ w.T, targets) / denominator, gradients made in forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, denominator: float):
        dtype = _compute_dtype(h)
        need_w = ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):
            V = w.shape[0]
            hc, wc = h.to(dtype), _weight(w, dtype)  # wc: (V or more, C)
            grad_h = torch.empty_like(h)
            # bf16's matmul runs faster into (C, V); fp32's into (V, C), where it accumulates in place.
            grad_w = None if not need_w else torch.zeros(
                wc.shape if dtype == torch.float32 else wc.shape[::-1], dtype=torch.float32, device=w.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.shape[0], CHUNK):
                hs, ts = hc[s:s + CHUNK], targets[s:s + CHUNK]
                p, loss = softmax(_logits(hs, wc), ts, V)
                total += loss
                p[torch.arange(len(ts), device=p.device), ts] -= 1  # d(loss)/d(logits), times the denominator
                grad_h[s:s + CHUNK] = p @ wc
                if grad_w is not None:
                    if dtype == torch.float32:
                        grad_w.addmm_(p.t(), hs)
                    else:
                        grad_w += hs.t() @ p
            grad_h /= denominator
            if grad_w is not None:
                grad_w = (grad_w if dtype == torch.float32 else grad_w.t())[:V].div_(denominator).to(w.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return total / denominator

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, None if grad_w is None else grad_w * grad, None, None


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy (nats) of the logits hidden @ weight.T against targets.

    hidden (B, T, C), weight (V, C), targets (B, T); mask (B, T), where given, is nonzero for the
    targets that count (fine-tuning masks the prompt), and the mean is over those. Under autocast
    the matmuls run in its dtype and the softmax in fp32, as F.cross_entropy would under autocast.
    """
    h, t = hidden.flatten(0, 1), targets.flatten()
    if mask is not None:
        keep = mask.flatten().bool()
        h, t = h[keep], t[keep]  # masked targets cost nothing
    denominator = max(1, t.numel())
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _HeadLoss.apply(h, weight, t, denominator)
    dtype = _compute_dtype(h)
    hc, wc = h.to(dtype), _weight(weight, dtype)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], CHUNK):
        total += lse_loss(_logits(hc[s:s + CHUNK], wc), t[s:s + CHUNK], weight.shape[0])
    return total / denominator


def reference_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same loss from full logits (B, T, V): what head_loss computes without them."""
    if mask is None:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    keep = mask.flatten().to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp_min(1.0)
