"""CPU training throughput: gpt2lab against transformers.GPT2LMHeadModel, each ratio from one run.

The model: 6 layers, 6 heads, 384 wide, GPT-2's 50,257 ids, batch 8 x 256, AdamW (betas 0.9,
0.95, weight decay on matrices), clipping at 1.0; both implementations start from the same weights
and train on the same random batches. One optimizer step is timed (median over the timed steps,
after two warm-up steps). Each configuration runs in a process of its own, because the allocator
setting is process-wide:

    transformers fp32, as users run it          the anchor, 1.00
    transformers fp32, gpt2lab's allocator      what the model code itself is worth
    transformers bf16 autocast                  the faster way to run transformers here
    gpt2lab fp32 / bf16 / bf16 + compile        as `gpt2lab train` runs them (allocator.tune(),
                                                the fused head loss; bf16 is the default on
                                                CPUs with native bf16)

Rounds run the configurations in turn, so that a noisy machine slows all alike; each round's
figures are printed, and the table takes each configuration's median round (transformers under
glibc's default allocator varies most from round to round: its page faults depend on the
kernel's state). Serialise it with other benchmarks:

    flock /tmp/gpt2lab-bench.lock .venv/bin/python benchmarks/train/throughput.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, n_ctx=256, vocab_size=50257)
CONFIGS = {  # name -> (implementation, precision, gpt2lab's allocator, torch.compile)
    "transformers fp32": ("transformers", "fp32", False, False),
    "transformers fp32, gpt2lab's allocator": ("transformers", "fp32", True, False),
    "transformers bf16": ("transformers", "bf16", False, False),
    "gpt2lab fp32": ("gpt2lab", "fp32", True, False),
    "gpt2lab bf16": ("gpt2lab", "bf16", True, False),
    "gpt2lab bf16 + compile": ("gpt2lab", "bf16", True, True),
}


def child(name: str, batch: int, block: int, steps: int, weights: str) -> dict:
    """One configuration's median step time, in this process."""
    impl, precision, tuned, compiled = CONFIGS[name]
    from gpt2lab import allocator

    if tuned and not allocator.tune():
        raise SystemExit("gpt2lab's allocator setting is unavailable here (not glibc, or MALLOC_* set)")
    import torch
    import torch.nn.functional as F

    from gpt2lab.optim import param_groups

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    if impl == "transformers":
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(weights).train()

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    else:
        from gpt2lab import load_model

        model = load_model(weights).train()

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(x, targets=y)
    forward = torch.compile(loss_of) if compiled else loss_of
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    times, losses = [], []
    for step in range(steps + 2):
        w = torch.randint(0, SHAPE["vocab_size"], (batch, block + 1), generator=torch.Generator().manual_seed(step))
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(w[:, :-1], w[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t)
    return {"config": name, "step_s": statistics.median(times[2:]), "first_losses": losses[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration and round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.block, args.steps, args.weights)))
        return

    import torch

    from gpt2lab import GPT, export_hf
    from gpt2lab.config import GPTConfig

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GPT2LAB_MALLOC"}
    rounds: dict[str, list[dict]] = {name: [] for name in args.configs}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        export_hf(GPT(GPTConfig(**SHAPE)), tmp)  # the same weights for both (an HF folder gpt2lab reads too)
        for _ in range(args.rounds):
            for name in args.configs:
                cmd = [sys.executable, __file__, "--child", name, "--weights", tmp, "--steps", str(args.steps),
                       "--batch", str(args.batch), "--block", str(args.block)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rounds[name].append(r)
                print(f"round {len(rounds[name])}: {name}: {args.batch * args.block / r['step_s']:.0f} tokens/s",
                      file=sys.stderr, flush=True)
    best = {name: sorted(rs, key=lambda r: r["step_s"])[(len(rs) - 1) // 2] for name, rs in rounds.items()}
    tokens = args.batch * args.block
    anchor = tokens / best[args.configs[0]]["step_s"]
    print(f"{'configuration':42} {'tokens/s':>9} {'ratio':>6}   first losses")
    for name, r in best.items():
        tok_s = tokens / r["step_s"]
        print(f"{name:42} {tok_s:9.0f} {tok_s / anchor:5.2f}x   {' '.join(f'{v:.4f}' for v in r['first_losses'])}")
    print(json.dumps({"shape": SHAPE, "batch": args.batch, "block": args.block, "steps": args.steps,
                      "rounds": args.rounds, "torch": torch.__version__,
                      "tokens_per_s": {k: round(tokens / r["step_s"], 1) for k, r in best.items()},
                      "per_round": {k: [round(tokens / r["step_s"], 1) for r in rs] for k, rs in rounds.items()}}))


if __name__ == "__main__":
    main()
