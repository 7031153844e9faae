"""GPU checks: HF parity on the device, flash attention, bf16 + torch.compile training throughput and MFU.

    python benchmarks/gpu/check.py [--model gpt2] [--batch 16] [--seq 1024] [--steps 20]

Trains gpt2lab's GPT (its fused head loss, as fit() does, and full logits + F.cross_entropy) and
transformers' GPT2LMHeadModel (same weights, same fused AdamW, bf16 autocast) in one run, eager and
compiled, and prints tokens/s, MFU and the ratio. Needs CUDA. For MFU at other batch sizes, run it
again with --batch 8, 32.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPT2LMHeadModel

from gpt2lab import GPT, export_hf, load_model, preset
from gpt2lab.generate import GenerationConfig, Generator

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def flops_per_token(cfg, seq: int) -> float:
    # PaLM appendix B: 6N for the matmuls plus 12 * L * H * Q * T for attention, N without wpe.
    n = cfg.num_params() - cfg.n_ctx * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq


def train_speed(model, loss_of, batch: int, seq: int, steps: int, vocab: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), fused=True)
    x = torch.randint(0, vocab, (batch, seq + 1), device="cuda")
    inp, tgt = x[:, :-1], x[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of(model, inp, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * seq * steps / (time.perf_counter() - t0)


def generation_speed(ours, theirs, vocab: int, batch: int, new: int = 128) -> None:
    """Greedy decode, 16-token prompts + `new` tokens, bf16 weights: our Generator vs HF generate."""
    ours, theirs = ours.to(torch.bfloat16).eval(), theirs.to(torch.bfloat16).eval()
    prompts = torch.randint(0, vocab, (batch, 16), device="cuda")
    gen = Generator(ours)
    cfg = GenerationConfig(max_new_tokens=new, greedy=True, stop_at_eot=False)

    def run_ours():
        return gen.generate_ids(prompts.tolist(), cfg)

    def run_theirs():
        return theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)

    speeds = {}
    for name, fn in (("gpt2lab", run_ours), ("transformers", run_theirs)):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        speeds[name] = 3 * batch * new / (time.perf_counter() - t0)
        print(f"generate bf16 batch {batch}: {name:12s} {speeds[name]:8.0f} new tokens/s", flush=True)
    print(f"generate ratio gpt2lab/transformers batch {batch}: {speeds['gpt2lab'] / speeds['transformers']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    cfg = preset(args.model)

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(GPT(cfg), tmp)
        ours = load_model(tmp, device="cuda")
        theirs = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").cuda().eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False
        err = (ours(idx) - theirs(idx).logits).abs().max().item()
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"fp32 logits vs transformers on cuda: max abs diff {err:.2e}")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot run this call
                flash = ours(idx).float()
            with sdpa_kernel([SDPBackend.MATH]):
                math = ours(idx).float()
        print(f"flash attention runs our forward (bf16); max abs diff vs math kernel {(flash - math).abs().max():.2e}")

    peak = peak_flops()
    fpt = flops_per_token(cfg, args.seq)
    ours.train()
    theirs.train()
    results = {}
    for compiled in (False, True):
        for name, model, loss_of in (
            ("gpt2lab", ours, lambda m, x, y: m(x, targets=y)),  # the fused head loss, as fit() trains
            ("gpt2lab logits", ours, lambda m, x, y: F.cross_entropy(m(x).flatten(0, 1).float(), y.flatten())),
            ("transformers", theirs, lambda m, x, y: F.cross_entropy(m(x).logits.flatten(0, 1).float(), y.flatten())),
        ):
            run = torch.compile(model) if compiled else model
            tps = train_speed(run, loss_of, args.batch, args.seq, args.steps, cfg.vocab_size)
            key = f"{name}{' +compile' if compiled else ''}"
            results[key] = tps
            print(f"train {args.model} bf16 B={args.batch} T={args.seq} {key:22s} {tps:10.0f} tok/s  "
                  f"MFU {tps * fpt / peak:6.1%}", flush=True)
    for suffix in ("", " +compile"):
        ratio = results["gpt2lab" + suffix] / results["transformers" + suffix]
        print(f"ratio gpt2lab/transformers{suffix}: {ratio:.2f}x")
    for batch in (1, 8):
        generation_speed(ours, theirs, cfg.vocab_size, batch)


if __name__ == "__main__":
    main()
