"""gpt2lab.estimate against reality: its parameter counts against the model's, its activations against
what autograd saves, and its peak against the peak RSS of real training steps on this CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

from gpt2lab import lora
from gpt2lab.cli import main
from gpt2lab.config import GPTConfig, preset
from gpt2lab.errors import ConfigError
from gpt2lab.estimate import CPU_CODE, CPU_PRIVATE, Setup, estimate, parse_bytes
from gpt2lab.model import GPT
from gpt2lab.train import lm_loss

# A child process trains with gpt2lab's fit() and prints its peak RSS (VmHWM) and file pages after step 2: by then
# AdamW's state exists, and a backward pass has run with it. It exits there, before the last step's
# checkpoint and plot, which are not training's memory.
CHILD = r"""
import json, os, re, sys, tempfile
import torch
from gpt2lab import lora
from gpt2lab.config import GPTConfig, TrainConfig
from gpt2lab.model import GPT
from gpt2lab.train import fit

def vm(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

case = json.loads(sys.argv[1])
cfg = GPTConfig(**case["config"])
B, T = case["batch"], case["block"]

class Batches:
    def get(self, step, index=0):
        x = torch.randint(cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(step))
        return x[:, :-1], x[:, 1:]

torch.manual_seed(0)
model = GPT(cfg)
if case["method"] == "lora":
    lora.apply_lora(model, lora.LoRAConfig())
    if case["precision"] == "bf16":  # as finetune does: a bf16 LoRA run holds its frozen Linears in bf16
        for name, p in model.named_parameters():
            if lora.frozen_bf16(name):
                p.data = p.data.to(torch.bfloat16)

def on_step(step, metrics):
    if step == 2:
        print(json.dumps({"peak": vm("VmHWM"), "file": vm("RssFile") + vm("RssShmem")}), flush=True)
        os._exit(0)

with tempfile.TemporaryDirectory() as tmp:
    fit(model, TrainConfig(batch_size=B, block_size=T, max_steps=3, warmup_steps=1, log_interval=1000,
                           eval_interval=0, ckpt_interval=1000, precision=case["precision"],
                           gradient_checkpointing=case["ckpt"], device="cpu"),
        Batches(), run_dir=tmp + "/run", on_step=on_step)
"""

# glibc raises its mmap threshold after large frees (up to 32 MiB), and then keeps freed activations in
# its heap: RSS stays above what is live by however the heap fragmented (up to 40% with gradient
# checkpointing, whose forward frees a block's activations as it goes). The estimate is of live
# memory, so the children pin the threshold, as the guide tells users to (docs/guide/estimate.md).
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def peak_rss(config: GPTConfig, *, batch: int, block: int, method: str = "full", precision: str = "fp32",
             ckpt: bool = False) -> int:
    case = {"config": config.to_dict(), "batch": batch, "block": block, "method": method, "precision": precision,
            "ckpt": ckpt}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)], capture_output=True, text=True,
                          timeout=600, env=os.environ | ALLOCATOR | {"GPT2LAB_TEST_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    # The private part of the peak: the libraries' pages in RSS vary with the page cache (CPU_CODE).
    return rss["peak"] - rss["file"]


GPT2 = 50257
# Block activations dominate this one (a small vocabulary, 8 layers, long sequences); in the presets,
# GPT-2's 50257-wide logits do for the small ones and the weights and AdamW's state for gpt2 at batch 1.
DEEP = GPTConfig(n_layer=8, n_head=4, n_embd=256, n_ctx=512, vocab_size=512)
CASES = [
    pytest.param(preset("gpt2-nano", vocab_size=GPT2), 4, 64, "full", "fp32", False, id="nano-4x64"),
    pytest.param(preset("gpt2-micro", vocab_size=GPT2), 8, 128, "full", "bf16", False, id="micro-8x128-bf16"),
    pytest.param(preset("gpt2-mini", vocab_size=GPT2), 4, 128, "full", "fp32", True, id="mini-4x128-ckpt"),
    pytest.param(preset("gpt2-mini", vocab_size=GPT2), 4, 128, "lora", "bf16", False, id="mini-4x128-lora-bf16"),
    pytest.param(DEEP, 8, 512, "full", "fp32", False, id="deep-8x512"),
    pytest.param(DEEP, 8, 512, "full", "bf16", True, id="deep-8x512-bf16-ckpt"),
    pytest.param(DEEP, 8, 512, "lora", "fp32", False, id="deep-8x512-lora"),
    pytest.param(preset("gpt2", vocab_size=GPT2), 1, 64, "full", "fp32", False, id="gpt2-1x64",
                 marks=pytest.mark.slow),
    pytest.param(preset("gpt2", vocab_size=GPT2), 2, 256, "full", "fp32", False, id="gpt2-2x256",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("config, batch, block, method, precision, ckpt", CASES)
def test_the_peak_is_within_15_percent_of_measured_rss(config, batch, block, method, precision, ckpt):
    est = estimate(config, Setup(batch_size=batch, block_size=block, method=method, precision=precision,
                                 gradient_checkpointing=ckpt))
    measured = peak_rss(config, batch=batch, block=block, method=method, precision=precision, ckpt=ckpt)
    private = est.peak - CPU_CODE
    assert abs(private - measured) / measured <= 0.15, (private / 2**20, measured / 2**20)


def test_the_fixed_overhead_is_a_training_process_without_a_model():
    """CPU_PRIVATE is measured, not tuned: fit() on a 1-layer, 8-wide model is nearly all overhead."""
    tiny = GPTConfig(n_layer=1, n_head=1, n_embd=8, n_ctx=16, vocab_size=64)
    measured = peak_rss(tiny, batch=1, block=8)
    assert abs(CPU_PRIVATE - measured) / measured <= 0.15, measured / 2**20


def test_parameter_counts_are_the_models():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=16, vocab_size=100)
    model = GPT(cfg)
    est = estimate(cfg, Setup(batch_size=1, block_size=16))
    assert est.parameters == est.trainable == sum(p.numel() for p in model.parameters())
    for targets in [("c_attn",), ("c_proj",), ("c_attn", "c_proj", "c_fc"), ("mlp.c_proj",)]:
        model = GPT(cfg)
        lora.apply_lora(model, lora.LoRAConfig(rank=4, targets=targets))
        est = estimate(cfg, Setup(batch_size=1, block_size=16, method="lora", lora=lora.LoRAConfig(rank=4,
                                                                                                    targets=targets)))
        assert est.trainable == lora.trainable_parameters(model), targets
        assert est.parameters == sum(p.numel() for p in model.parameters())
        assert est.weights == 4 * est.parameters and est.optimizer == 8 * est.trainable


def saved_bytes(cfg: GPTConfig, *, batch: int, block: int, method: str, precision: str, ckpt: bool) -> int:
    """What autograd keeps for backward after a training forward pass (parameters not counted)."""
    model = GPT(cfg).train()
    if method == "lora":
        lora.apply_lora(model, lora.LoRAConfig())
        if precision == "bf16":
            for name, p in model.named_parameters():
                if lora.frozen_bf16(name):
                    p.data = p.data.to(torch.bfloat16)
    model.gradient_checkpointing = ckpt
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()  # q, k and v are views of one tensor: count it once
        return t

    x = torch.randint(cfg.vocab_size, (batch, block))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        lm_loss(model, (x, x))
    return sum(seen.values())


@pytest.mark.parametrize("method, precision, ckpt", [
    ("full", "fp32", False), ("full", "fp32", True), ("full", "bf16", False), ("full", "bf16", True),
    ("lora", "fp32", False), ("lora", "bf16", False), ("lora", "bf16", True),
])
def test_activations_are_what_autograd_saves(method, precision, ckpt):
    cfg = GPTConfig(n_layer=3, n_head=4, n_embd=64, n_ctx=64, vocab_size=300)
    est = estimate(cfg, Setup(batch_size=3, block_size=48, method=method, precision=precision,
                              gradient_checkpointing=ckpt))
    counted = saved_bytes(cfg, batch=3, block=48, method=method, precision=precision, ckpt=ckpt)
    assert abs(est.activations.saved - counted) / counted <= 0.03, (est.activations.saved, counted)


def test_sharding_divides_the_states_and_the_time_follows_the_peak():
    cfg = preset("gpt2-xl", vocab_size=GPT2)
    one = estimate(cfg, Setup(batch_size=8, block_size=1024, device="cuda", precision="bf16", devices=8))
    sharded = estimate(cfg, Setup(batch_size=8, block_size=1024, device="cuda", precision="bf16", devices=8,
                                  fsdp=True))
    assert sharded.optimizer * 8 == one.optimizer and sharded.peak < one.peak
    assert one.gradients == 2 * 4 * cfg.num_params()  # DDP's buckets
    assert one.step_seconds(989e12, 0.5, 8) == pytest.approx(one.flops_per_token * 8 * 1024 / (989e12 * 0.5 * 8))
    lora_run = estimate(cfg, Setup(batch_size=1, block_size=64, method="lora"))
    assert lora_run.flops_per_token < one.flops_per_token  # no gradients for frozen weights


@pytest.mark.parametrize("setup", [
    dict(batch_size=0, block_size=8), dict(batch_size=3, block_size=8, devices=2), dict(batch_size=2, block_size=0),
    dict(batch_size=2, block_size=8, method="lora", devices=2), dict(batch_size=2, block_size=8, fsdp=True),
    dict(batch_size=4, block_size=8, micro_batch=3),
])
def test_bad_setups_are_config_errors(setup):
    with pytest.raises(ConfigError):
        estimate(preset("gpt2-nano"), Setup(**setup))


def test_memory_sizes():
    assert parse_bytes("24GiB") == 24 << 30 and parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("512 MiB") == 512 << 20
    for bad in ("lots", "-1GB", "0", "12XB"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)


def test_the_command_prints_a_table_or_json(capsys):
    assert main(["estimate", "gpt2", "--batch-size", "4", "--block-size", "256", "--device-memory", "1GiB"]) == 0
    table = capsys.readouterr().out
    assert "124,439,808" in table and "does NOT fit in 1.0 GiB" in table and "with gradient checkpointing" in table
    assert main(["estimate", "gpt2-medium", "--device", "H100", "--devices", "2", "--fsdp", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["setup"]["precision"] == "bf16" and report["fits"] is None
    assert report["peak_flops"] == 989e12 and report["step_seconds"] > 0


def test_an_unknown_model_names_the_presets(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["estimate", "gpt2-huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2lab: error: 'gpt2-huge' is neither a preset (gpt2, ") and "\n" not in err
