"""GPU training MFU of gpt2 (124M, exact architecture): what the head, batch size, attention kernel
and compile do to tokens/s, and `gpt2lab train` end to end, in one run with the device's measured
matmul ceiling beside the data sheet's.

    python benchmarks/gpu/mfu.py [--data FOLDER] [--steps 20] [--deadline 420] [--out results.jsonl]

Every configuration is a model step as fit() takes it: bf16 autocast, fused AdamW, gradient
clipping, batch x 1024 tokens, timed over --steps steps after three warm-up steps
(which include compiling). Heads:
  model         model(x, targets=y), as fit() trains: head_loss eagerly, full logits compiled (loss.py)
  chunked       gpt2lab's head loss (loss.head_loss) compiled too: chunked logits, softmax and
                gradients, its columns padded to a multiple of `align` (loss.ALIGN; 1 = unpadded)
  logits        full (B, T, 50257) logits and F.cross_entropy, inside the compiled graph
  padded        as logits over a 50,304-wide head, sliced to 50,257 columns before the loss
                (nanoGPT's padding; not GPT-2's shapes, measured to see what it would be worth)
Then, given --data (a folder from `gpt2lab prepare` with GPT-2's tokenizer), `gpt2lab train
--compile` itself, whose metrics.jsonl gives tokens/s and MFU per log window (on a machine with no
network, GPT2LAB_CACHE must hold the tokenizer's package, as ~/.cache/gpt2lab does after a
prepare). Items start only while --deadline seconds have not passed, so a lease's time is not
overrun; --items picks some.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2lab import GPT, loss, preset
from gpt2lab.metrics import flops_per_token, peak_flops
from gpt2lab.optim import param_groups

SEQ = 1024


def matmul_ceiling() -> float:
    """bf16 FLOP/s of an 8192^3 matmul on random data, mean of 10 after 3 warm-ups."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3)


def step_speed(*, batch: int, head: str, compiled: bool, align: int = 64, chunk: int = 1024,
               attention: str = "flash", steps: int) -> float:
    """Tokens/s of one configuration (see the module's docstring)."""
    torch._dynamo.reset()
    loss.ALIGN, loss.CHUNK = {"cuda": align}, chunk
    loss.FULL_LOGITS_WHEN_COMPILED = set() if head == "chunked" else {"cuda"}
    torch.backends.cuda.enable_flash_sdp(attention == "flash")
    torch.backends.cuda.enable_cudnn_sdp(attention == "cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    cfg = preset("gpt2")
    vocab = cfg.vocab_size
    if head == "padded":
        cfg = dataclasses.replace(cfg, vocab_size=50304)
    torch.manual_seed(0)
    model = GPT(cfg).cuda().train()

    run = torch.compile(model) if compiled and head in ("model", "chunked") else model

    def fused(x, y):
        return run(x, targets=y)

    def logits(x, y):
        out = model(x)[..., :vocab]
        return F.cross_entropy(out.flatten(0, 1).float(), y.flatten())

    fn = fused if head in ("model", "chunked") else torch.compile(logits) if compiled else logits
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), fused=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    data = torch.randint(0, vocab, (batch, SEQ + 1), device="cuda")
    x, y = data[:, :-1], data[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(x, y)
        out.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * SEQ * steps / (time.perf_counter() - t)


def train_end_to_end(data: str, batch: int, steps: int) -> dict:
    """`gpt2lab train --compile` on a prepared folder; the last log window's tokens/s and MFU."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gpt2lab", "train", "--data", data, "--out", f"{tmp}/run", "--model", "gpt2",
               "--batch-size", str(batch), "--block-size", str(SEQ), "--device", "cuda", "--compile",
               "--max-steps", str(steps), "--warmup-steps", "5", "--log-interval", str(steps // 3),
               "--eval-interval", "0", "--eval-batches", "2", "--no-keep-best"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return {"error": proc.stderr[-2000:]}
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "tokens_per_s" in r]
    return {"windows": [(r["step"], round(r["tokens_per_s"]), round(r["mfu"], 4)) for r in windows],
            "tokens_per_s": windows[-1]["tokens_per_s"], "mfu_sheet": windows[-1]["mfu"]}


ITEMS: dict[str, dict | int] = {
    "eager-b16-unpadded": dict(batch=16, head="model", compiled=False, align=1),
    "eager-b16": dict(batch=16, head="model", compiled=False),
    "chunked-b16-unpadded": dict(batch=16, head="chunked", compiled=True, align=1),
    "chunked-b16": dict(batch=16, head="chunked", compiled=True),
    "chunked-b32": dict(batch=32, head="chunked", compiled=True),
    "chunked-b64": dict(batch=64, head="chunked", compiled=True),
    "chunked-b64-chunk8192": dict(batch=64, head="chunked", compiled=True, chunk=8192),
    "chunked-b64-cudnn": dict(batch=64, head="chunked", compiled=True, attention="cudnn"),
    "logits-b64": dict(batch=64, head="logits", compiled=True),
    "padded-b64": dict(batch=64, head="padded", compiled=True),
    "compiled-b16": dict(batch=16, head="model", compiled=True),
    "compiled-b64": dict(batch=64, head="model", compiled=True),
    "compiled-b64-cudnn": dict(batch=64, head="model", compiled=True, attention="cudnn"),
    "compiled-b128": dict(batch=128, head="model", compiled=True),
    "train-b16": 16,  # gpt2lab train --compile --batch-size 16
    "train-b64": 64,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a prepared folder (GPT-2's tokenizer) for `gpt2lab train` end to end")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=420.0, help="start no item after this many seconds")
    ap.add_argument("--out", type=Path, default=Path("mfu.jsonl"))
    ap.add_argument("--items", nargs="+", choices=list(ITEMS), default=list(ITEMS), help="what to measure, in order")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    sheet, _ = peak_flops(torch.device("cuda"), torch.bfloat16)
    ceiling = matmul_ceiling()
    fpt = flops_per_token(preset("gpt2"), SEQ)
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sheet_tflops": sheet / 1e12,
            "measured_matmul_tflops": round(ceiling / 1e12, 1), "flops_per_token": fpt}
    print(json.dumps(head), flush=True)
    args.out.write_text(json.dumps(head) + "\n")
    for name in args.items:
        item = ITEMS[name]
        if time.perf_counter() - t0 > args.deadline:
            print(f"deadline: skipping {name}", flush=True)
            continue
        t = time.perf_counter()
        if isinstance(item, int):  # `gpt2lab train` at this batch size
            if not args.data:
                continue
            row = {"item": name} | train_end_to_end(args.data, item, 60)
        else:
            try:
                tps = step_speed(**item, steps=args.steps)
                gc.collect()
                torch.cuda.empty_cache()
                row = {"item": name} | item | {"tokens_per_s": round(tps), "mfu_sheet": round(tps * fpt / sheet, 4),
                                               "mfu_measured": round(tps * fpt / ceiling, 4)}
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' figures
                row = {"item": name} | item | {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        row["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
