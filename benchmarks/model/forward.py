"""Forward throughput of gpt2 (124M) against transformers.GPT2LMHeadModel with the same weights.

    python benchmarks/model/forward.py [--batch 1] [--seq 1024] [--repeats 10] [--threads N]

Both models run in this process, interleaved, on the same input; the figure to read is the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import GPT2LMHeadModel

from gpt2lab import GPT, export_hf, load_model, preset


def time_it(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(GPT(preset(args.model)), tmp)
        ours = load_model(tmp)
        theirs = GPT2LMHeadModel.from_pretrained(tmp).eval()
    idx = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq))
    with torch.inference_mode():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-4, rtol=1e-4)
        times: dict[str, list[float]] = {"gpt2lab": [], "transformers": []}
        for _ in range(args.repeats):  # interleaved so drifts in machine load hit both alike
            times["gpt2lab"] += time_it(lambda: ours(idx), 1)
            times["transformers"] += time_it(lambda: theirs(idx), 1)
    tokens = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model} forward, batch {args.batch} x {args.seq} tokens, fp32, {args.threads} threads, "
          f"median of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:13s} {v * 1e3:8.1f} ms   {tokens / v:9.0f} tokens/s")
    print(f"  ratio gpt2lab / transformers throughput: {med['transformers'] / med['gpt2lab']:.2f}x")


if __name__ == "__main__":
    main()
