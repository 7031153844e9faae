"""The fused head loss against F.cross_entropy over full logits: values and gradients, fp32 and
bf16 autocast, masks, chunk edges, a frozen head, evaluation, and the eager fallback."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import loss as head
from gpt2lab.config import GPTConfig
from gpt2lab.loss import head_loss, reference_loss
from gpt2lab.model import GPT


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 tokens and matmuls of 16 rows, so that 150 tokens cross both edges unevenly."""
    monkeypatch.setattr(head, "CHUNK", 64)
    monkeypatch.setattr(head, "ROWS", 16)


def grads(fn, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    h, w = h.detach().requires_grad_(True), w.detach().requires_grad_(w.requires_grad)
    out = fn(h, w)
    (out * 3).backward()  # an upstream gradient other than 1 must scale both
    return out.detach(), h.grad, w.grad


@pytest.mark.parametrize("align", [1, 64], ids=["unpadded", "padded"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_loss_and_gradients_equal_cross_entropy_over_full_logits(small_chunks, monkeypatch, bf16, masked, align):
    monkeypatch.setattr(head, "ALIGN", {"cpu": align})  # padded: the head's 300 columns become 320, as on a GPU
    torch.manual_seed(0)
    h, w = torch.randn(2, 75, 32), torch.randn(300, 32) * 0.5
    w.requires_grad_(True)
    t = torch.randint(300, (2, 75))
    mask = (torch.rand(2, 75) > 0.4).long() if masked else None
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with amp:
        ours = grads(lambda h, w: head_loss(h, w, t, mask), h, w)
    with amp:
        ref = grads(lambda h, w: reference_loss(h @ w.t(), t, mask), h, w)
    # The loss is exact in both: the softmax runs in fp32 over the same (bf16-rounded) logits.
    torch.testing.assert_close(ours[0], ref[0].float(), atol=2e-6, rtol=0)
    # Gradients: fp32 to rounding; bf16 to its precision (the reference rounds its logits'
    # gradient after the mean, this rounds the probabilities before it).
    tol = dict(atol=1e-2 * ref[1].abs().max().item(), rtol=2e-2) if bf16 else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], **tol)
    tol = dict(atol=1e-2 * ref[2].abs().max().item(), rtol=2e-2) if bf16 else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[2], ref[2], **tol)
    assert ours[1].dtype == ours[2].dtype == torch.float32
    if masked:
        assert ours[1][mask == 0].abs().max() == 0  # masked positions get no gradient


@pytest.mark.parametrize("align", [1, 64], ids=["unpadded", "padded"])
def test_a_frozen_head_gets_no_gradient_and_evaluation_needs_none(small_chunks, monkeypatch, align):
    monkeypatch.setattr(head, "ALIGN", {"cpu": align})
    torch.manual_seed(0)
    h, w, t = torch.randn(1, 150, 16), torch.randn(50, 16), torch.randint(50, (1, 150))
    loss, grad_h, grad_w = grads(lambda h, w: head_loss(h, w, t), h, w)  # w.requires_grad is False
    assert grad_w is None and grad_h is not None
    ref = F.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten())
    with torch.no_grad():
        assert torch.allclose(head_loss(h, w, t), ref, atol=1e-6)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)


def test_a_mask_with_nothing_kept_gives_zero_not_nan():
    h, w, t = torch.randn(1, 4, 8, requires_grad=True), torch.randn(10, 8), torch.randint(10, (1, 4))
    loss = head_loss(h, w, t, torch.zeros(1, 4))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0


def test_the_models_loss_is_its_logits_cross_entropy_with_the_same_parameter_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=16, vocab_size=97))
    x, y = torch.randint(97, (3, 16)), torch.randint(97, (3, 16))
    fused = model(x, targets=y)
    fused.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    ref.backward()
    torch.testing.assert_close(fused, ref, atol=1e-6, rtol=0)
    for n, p in model.named_parameters():  # the tied embedding gets both the head's and the input's
        torch.testing.assert_close(ours[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_without_a_compiler_the_loss_runs_eagerly_and_says_so_once(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nlong details")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(head, "COMPILE_FROM", 0)
    softmax = head._Compiled(head._softmax)
    monkeypatch.setattr(head, "softmax", softmax)
    h, w, t = torch.randn(1, 6, 8, requires_grad=True), torch.randn(10, 8), torch.randint(10, (1, 6))
    with caplog.at_level(logging.WARNING, logger="gpt2lab.loss"):
        a = head_loss(h, w, t)
        b = head_loss(h, w, t)
    assert softmax.failed and torch.equal(a, b)
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile failed (no C++ compiler found); the loss runs eagerly, slower"]
    torch.testing.assert_close(a, F.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten()), atol=1e-6, rtol=0)


def test_the_compiled_softmax_is_the_eager_one(monkeypatch):
    torch.manual_seed(0)
    logits, t = (torch.randn(300, 5000) * 4).bfloat16(), torch.randint(5000, (300,))
    eager = head._softmax(logits, t, 5000)
    monkeypatch.setattr(head, "COMPILE_FROM", 0)
    compiled = head._Compiled(head._softmax)(logits, t, 5000)
    assert compiled[0].dtype == torch.bfloat16
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-3, rtol=1e-6)


def test_pad_columns_of_the_compiled_softmax_are_zero_and_ignored(monkeypatch):
    torch.manual_seed(0)
    logits, t = torch.randn(300, 5056) * 4, torch.randint(5000, (300,))
    logits[:, 5000:] = 50.0  # the pad: would dominate the softmax were it counted
    monkeypatch.setattr(head, "COMPILE_FROM", 0)
    p, loss = head._Compiled(head._softmax)(logits, t, 5000)
    ref = F.cross_entropy(logits[:, :5000], t, reduction="sum")
    assert p.shape == (300, 5056) and p[:, 5000:].abs().max() == 0
    torch.testing.assert_close(p[:, :5000], F.softmax(logits[:, :5000], dim=-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-6)


def test_a_compiled_model_on_a_gpu_takes_its_loss_through_full_logits(monkeypatch):
    """Compiled on a device of FULL_LOGITS_WHEN_COMPILED (a GPU; the CPU stands in for it here) the
    loss runs through the full logits, with the loss and gradients of the eager chunked head."""
    import gpt2lab.model as model_module

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_ctx=16, vocab_size=97))
    x, y = torch.randint(97, (2, 16)), torch.randint(97, (2, 16))
    eager = model(x, targets=y)
    eager.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = []
    monkeypatch.setattr(head, "FULL_LOGITS_WHEN_COMPILED", {"cpu"})
    monkeypatch.setattr(model_module, "head_loss", lambda *a: chunked.append(a) or head_loss(*a))
    run = torch.compile(model)
    compiled = run(x, targets=y)
    compiled.backward()
    assert chunked == []  # traced without the chunked head
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)
    model(x, targets=y)  # eager: the chunked head again
    assert len(chunked) == 1
    with torch.no_grad():  # evaluation, compiled: the chunked head, which holds no logits
        torch.testing.assert_close(run(x, targets=y), eager.detach(), atol=1e-5, rtol=0)
    assert len(chunked) == 2
