"""The fine-tuning demo: the Shakespeare model of `make demo` learns the King James Bible, fully and with LoRA.

    .venv/bin/python benchmarks/finetune/kjv_demo.py [--base RUN_DIR] [--minutes 3] [--out runs/kjv]

Prepares the `kjv` catalog corpus with the base model's own tokenizer (once), fine-tunes the
base for a bounded time with each method through `gpt2lab finetune`'s Python API, and prints the
held-out loss on the Bible's validation chapters before and after, then samples from the base,
the fully fine-tuned model and the LoRA one, from the same prompts and seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gpt2lab import data as datasets
from gpt2lab.checkpoint import load_model, load_tokenizer
from gpt2lab.finetune import FinetuneConfig, best_checkpoint, finetune
from gpt2lab.generate import Generator

PROMPTS = ("And the LORD said unto", "KING.\nMy lords,", "In the beginning")
# block_size 0: the base's own context (256 for gpt2-micro, 128 for gpt2-nano).
SETTINGS = dict(block_size=0, batch_size=16, warmup_steps=20, eval_interval=25, eval_batches=8, log_interval=5,
                ckpt_interval=100, patience=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="the Shakespeare run (default: the newest runs/demo/run-*)")
    ap.add_argument("--minutes", type=float, default=3.0, help="training time per method")
    ap.add_argument("--out", default="runs/kjv")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr-full", type=float, default=3e-4)
    ap.add_argument("--lr-lora", type=float, default=3e-3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = sorted(Path("runs/demo").glob("run-*"))
    base = Path(args.base) if args.base else (runs[-1] if runs else None)
    if base is None:
        raise SystemExit("no Shakespeare model: run `make demo` first, or pass --base RUN_DIR")
    out = Path(args.out)
    data = datasets.prepare("kjv", out=out / "data", tokenizer=load_tokenizer(base))["out"]
    reports = {}
    for method in ("full", "lora"):
        lr = args.lr_full if method == "full" else args.lr_lora
        cfg = FinetuneConfig.for_method(method, lr=lr, max_minutes=args.minutes, max_steps=10_000, **SETTINGS)
        print(f"\n=== {method} fine-tuning of {base} on the King James Bible ({args.minutes:g} min) ===")
        reports[method] = finetune(str(base), data=data, out=str(out / method), config=cfg)
        print(reports[method])
    print("\n=== samples (temperature 0.8, top-k 40, seed 0) ===")
    models = (("Shakespeare (base)", base), ("full fine-tuning", best_checkpoint(out / "full")),
              ("LoRA", best_checkpoint(out / "lora")))
    for name, path in models:
        generator = Generator(load_model(path), load_tokenizer(path))
        completions = generator.generate(list(PROMPTS), max_new_tokens=48, temperature=0.8, top_k=40, seed=0)
        print(f"\n--- {name} ---")
        for prompt, c in zip(PROMPTS, completions, strict=True):
            print(prompt + c.text + "\n")


if __name__ == "__main__":
    main()
