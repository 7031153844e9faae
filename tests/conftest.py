"""Shared fixtures: tiny seeded configs and Hugging Face models built on the spot (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: one intra-op thread per test process keeps parallel runs from oversubscribing.
torch.set_num_threads(int(os.environ.get("GPT2LAB_TEST_THREADS", "2")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Odd shapes on purpose: they catch transposes and head splits that square shapes hide.
ODD_CONFIGS = [
    dict(n_layer=3, n_head=3, n_embd=48, n_ctx=37, vocab_size=101),
    dict(n_layer=2, n_head=4, n_embd=32, n_ctx=64, vocab_size=257),
    dict(n_layer=1, n_head=1, n_embd=16, n_ctx=16, vocab_size=50),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def threads():
    """torch.set_num_threads for one test: the count the test found is restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep tests away from the user's cache, but share one cache across the session."""
    if "GPT2LAB_CACHE" not in os.environ:
        monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path_factory.getbasetemp().parent / "gpt2lab-test-cache"))


def hf_model(**cfg):
    """A random `transformers.GPT2LMHeadModel` with GPT-2's architecture and the given shape."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
        n_positions=cfg["n_ctx"], vocab_size=cfg["vocab_size"],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).eval()
    # Non-trivial LayerNorm and bias values, so a swapped or missed tensor cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model
