"""Training throughput and MFU on CPU: gpt2lab against transformers.GPT2LMHeadModel, same run.

For each model (the demo's gpt2-micro with its 4096-id vocabulary, and gpt2 124M) both
implementations start from the same weights and train on the same batches with the same
optimizer (AdamW, betas (0.9, 0.95), weight decay on 2-D weights, clipping at 1.0) and the same
loss, alternating step by step so that a noisy machine slows both alike. Reported: tokens/s of
each (median over the timed steps), their ratio, and MFU against a peak measured on this CPU in
this run (the best of several 1024^3 fp32 matmuls). Then gpt2lab's whole fit() loop
(logging and its own timing included) runs the same model on its own.

    flock /tmp/gpt2lab-bench.lock .venv/bin/python benchmarks/train/throughput.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2lab import GPT, export_hf, preset
from gpt2lab.config import TrainConfig
from gpt2lab.metrics import flops_per_token, peak_flops
from gpt2lab.train import fit, param_groups

CASES = {  # name -> (preset, vocab, batch, block, timed steps)
    "demo (gpt2-micro, 4096 ids)": ("gpt2-micro", 4096, 16, 256, 12),
    "gpt2 (124M)": ("gpt2", 50257, 2, 512, 3),
}


class Random:
    """Batches of random tokens with data.Loader's interface."""

    def __init__(self, vocab: int, batch: int, block: int) -> None:
        self.vocab, self.batch, self.block = vocab, batch, block

    def get(self, step: int, index: int = 0):
        g = torch.Generator().manual_seed(step * 1000 + index)
        w = torch.randint(0, self.vocab, (self.batch, self.block + 1), generator=g)
        return w[:, :-1], w[:, 1:]


def step_fn(model: torch.nn.Module, hf: bool):
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        logits = model(x).logits if hf else model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def compare(name: str, preset_name: str, vocab: int, batch: int, block: int, steps: int, peak: float) -> dict:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(preset(preset_name, vocab_size=vocab))
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp)
        theirs = GPT2LMHeadModel.from_pretrained(tmp).train()
    data = Random(vocab, batch, block)
    runners = {"gpt2lab": step_fn(ours.train(), hf=False), "transformers": step_fn(theirs, hf=True)}
    times: dict[str, list[float]] = {k: [] for k in runners}
    losses: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(steps + 2):  # the first two are warm-up
        x, y = data.get(i)
        for k, run in (runners.items() if i % 2 == 0 else reversed(runners.items())):
            t = time.perf_counter()
            losses[k].append(run(x, y))
            if i >= 2:
                times[k].append(time.perf_counter() - t)
    tokens = batch * block
    fpt = flops_per_token(ours.config, block)
    out = {"case": name, "batch": batch, "block": block, "timed_steps": steps}
    for k in runners:
        tok_s = tokens / statistics.median(times[k])
        out[k] = {"tokens_per_s": round(tok_s, 1), "mfu": round(tok_s * fpt / peak, 4)}
    ratio = out["gpt2lab"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    out["ratio_gpt2lab_over_transformers"] = round(ratio, 3)
    out["max_loss_difference"] = max(abs(a - b) for a, b in zip(losses["gpt2lab"], losses["transformers"], strict=True))
    # gpt2lab's whole loop on its own: the same model, through fit().
    torch.manual_seed(0)
    model = GPT(preset(preset_name, vocab_size=vocab))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(batch_size=batch, block_size=block, max_steps=steps + 2, log_interval=1, warmup_steps=1,
                          eval_interval=0, ckpt_interval=10**9, device="cpu", peak_tflops=peak / 1e12)
        fit(model, cfg, data, run_dir=tmp)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    fit_tok_s = statistics.median(r["tokens_per_s"] for r in rows[2:])
    out["fit_loop"] = {"tokens_per_s": round(fit_tok_s, 1), "mfu": round(fit_tok_s * fpt / peak, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=0, help="timed steps per case (0: each case's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak, how = peak_flops(torch.device("cpu"), torch.float32)
    print(json.dumps({"threads": args.threads, "peak_gflops": round(peak / 1e9, 1), "peak": how,
                      "torch": torch.__version__}))
    for name in args.cases:
        preset_name, vocab, batch, block, steps = CASES[name]
        print(json.dumps(compare(name, preset_name, vocab, batch, block, args.steps or steps, peak)), flush=True)


if __name__ == "__main__":
    main()
