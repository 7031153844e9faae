"""Fine-tuning on CPU: peak RSS, tokens/s and trainable parameters, full against LoRA, with and
without activation checkpointing, for gpt2 (124M) and gpt2-medium (355M), beside `gpt2lab estimate`'s peak.

    flock /tmp/gpt2lab-bench.lock .venv/bin/python benchmarks/finetune/memory_speed.py \
        [--models gpt2 gpt2-medium] [--batch 1] [--seq 256] [--steps 6] [--threads 2] [--precision fp32]
    # the 1.5B model with LoRA, and full fine-tuning of gpt2-large, on a 24 GiB machine:
    ... memory_speed.py --models gpt2-xl --configs lora:ckpt --precision bf16 --seq 512 --steps 4
    ... memory_speed.py --models gpt2-large --configs full:ckpt --seq 512 --steps 4

Random-init checkpoints (the real weights are not needed: cost depends on shapes only) are
written once under --dir. Each configuration then runs in a fresh subprocess, so its peak RSS
is its own: gpt2lab's fine-tuning path end to end (load_model from the checkpoint folder,
load_for_finetuning, fit() with synthetic token batches). Step times are taken between the
first step and the last (the first warms up, the last also writes a checkpoint); tokens/s is
that of the fastest of them, the least disturbed by other work on a shared machine (the median
is in the JSON). Peak RSS is the process's high-water mark before the last step. Ratios are
against full fine-tuning without checkpointing for the same model, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from gpt2lab.config import preset
from gpt2lab.estimate import Setup, estimate

MAKE = """
import torch, gpt2lab
torch.manual_seed(0)
gpt2lab.save_checkpoint(gpt2lab.GPT(gpt2lab.preset({model!r})), {path!r})
"""

ONE = """
import json, resource, statistics, tempfile, time, torch
from gpt2lab.finetune import FinetuneConfig, load_for_finetuning
from gpt2lab.lora import trainable_parameters
from gpt2lab.train import Strategy, fit

torch.set_num_threads({threads})
B, T, STEPS = {batch}, {seq}, {steps}


class Tokens:
    # Random ids: the cost of a step does not depend on which tokens they are.
    def get(self, step, index=0):
        g = torch.Generator().manual_seed(step * 1000 + index)
        x = torch.randint(0, 50257, (B, T + 1), generator=g)
        return x[:, :-1], x[:, 1:]


cfg = FinetuneConfig.for_method({method!r}, gradient_checkpointing={ckpt}, batch_size=B, micro_batch=B,
                                precision={precision!r},
                                block_size=T, max_steps=STEPS, warmup_steps=1, eval_interval=0, log_interval=1,
                                ckpt_interval=10**6, keep_last=1, keep_best=False, patience=0, device="cpu",
                                peak_tflops=1.0, model={path!r})
model = load_for_finetuning({path!r}, cfg, None)
marks = {{}}


def on_step(step, metrics):
    marks[step] = (time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


# The model files of the final checkpoint are not what is measured: skip writing them.
with tempfile.TemporaryDirectory() as run:
    fit(model, cfg, Tokens(), run_dir=run, strategy=Strategy(save=lambda m, f, t: None), on_step=on_step)
times = [marks[s + 1][0] - marks[s][0] for s in range(1, STEPS - 1)]
print(json.dumps({{"tokens_per_s": B * T / min(times), "median_tokens_per_s": B * T / statistics.median(times),
                  "peak_rss": marks[STEPS - 1][1],
                  "trainable": trainable_parameters(model), "parameters": model.num_params(),
                  "final_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""

CONFIGS = [("full", False), ("full", True), ("lora", False), ("lora", True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "gpt2-medium"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/gpt2lab-bench-finetune")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: autocast, and LoRA holds its frozen Linears in bf16")
    ap.add_argument("--configs", nargs="+", default=[f"{m}:{'ckpt' if c else 'plain'}" for m, c in CONFIGS],
                    help="method:ckpt|plain pairs (default: all four)")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be at least 3 (the first warms up, the last saves)")
    pairs = [x.partition(":") for x in args.configs]
    if any(m not in ("full", "lora") or c not in ("ckpt", "plain") for m, _, c in pairs):
        ap.error(f"--configs takes full|lora:ckpt|plain pairs, got {' '.join(args.configs)}")
    configs = [(m, c == "ckpt") for m, _, c in pairs]
    print(f"batch {args.batch} x {args.seq} tokens, {args.steps} steps (timed: {args.steps - 2}, fastest shown), "
          f"{args.threads} threads, {args.precision}, AdamW; LoRA rank 8 on c_attn, c_proj, c_fc")
    rows = []
    for model in args.models:
        path = str(Path(args.dir) / model)
        if not (Path(path) / "model.safetensors").is_file():
            subprocess.run([sys.executable, "-c", MAKE.format(model=model, path=path)], check=True)
        base = None
        print(f"\n{model}")
        print(f"  {'method':6s} {'act. ckpt':9s} {'trainable':>14s} {'peak RSS':>10s} {'tokens/s':>9s}"
              f" {'RSS ratio':>9s} {'speed ratio':>11s} {'estimate':>9s}")
        for method, ckpt in configs:
            code = ONE.format(method=method, ckpt=ckpt, path=path, batch=args.batch, seq=args.seq,
                              steps=args.steps, threads=args.threads, precision=args.precision)
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1]) | {"model": model, "method": method, "ckpt": ckpt}
            r["estimate"] = estimate(preset(model), Setup(batch_size=args.batch, block_size=args.seq, method=method,
                                                          precision=args.precision, gradient_checkpointing=ckpt)).peak
            base = base or r
            rows.append(r)
            print(f"  {method:6s} {'on' if ckpt else 'off':9s} {r['trainable']:>14,d} "
                  f"{r['peak_rss'] / 2**30:>8.2f}Gi {r['tokens_per_s']:>9.0f} "
                  f"{r['peak_rss'] / base['peak_rss']:>9.2f} {r['tokens_per_s'] / base['tokens_per_s']:>11.2f} "
                  f"{r['estimate'] / 2**30:>7.2f}Gi")
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
