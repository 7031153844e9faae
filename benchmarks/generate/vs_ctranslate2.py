"""Greedy decoding against CTranslate2, the CPU inference engine users pick for GPT-2.

    flock /tmp/gpt2lab-bench.lock .venv/bin/python benchmarks/generate/vs_ctranslate2.py [--rounds 2]

GPT-2 124M, random weights given structure as in bench.py (so that greedy decoding is not a flat
guess), 12-token prompts, 128 new tokens, batch 1 and 8. The same HF folder goes to gpt2lab's
Generator in each mode (what `gpt2lab generate --mode M` runs) and, converted by CTranslate2's own
`ct2-transformers-converter` (float32, and --quantization int8), to ctranslate2.Generator with
2 intra-op threads. Decode speed is (new tokens - 1) / (t(129 tokens) - t(1 token)), best of
--reps in each subprocess and of the interleaved rounds. Reported: each ratio gpt2lab / CTranslate2
and whether greedy tokens match gpt2lab fp32's (int8 changes some; bench.py reports its perplexity).

Needs `pip install -e '.[bench]'` (ctranslate2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import best_time, write_weights  # noqa: E402  (the same structured random weights)

PROMPT_TOKENS, NEW_TOKENS = 12, 128
MODES = {"fp32": "float32", "int8": "int8"}  # gpt2lab mode -> CTranslate2 compute type


def prompts(batch: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 50256, (batch, PROMPT_TOKENS), generator=g).tolist()


def run_one(impl: str, mode: str, batch: int, folder: Path, reps: int, threads: int) -> dict:
    rows = prompts(batch)
    if impl == "ct2":
        import ctranslate2

        model = ctranslate2.Generator(str(folder / f"ct2-{MODES[mode]}"), device="cpu", compute_type=MODES[mode],
                                      intra_threads=threads, inter_threads=1)
        vocab = json.loads((folder / "vocab.json").read_text())
        names = {i: t for t, i in vocab.items()}
        starts = [[names[i] for i in row] for row in rows]

        def gen(n: int) -> list[list[int]]:
            out = model.generate_batch(starts, max_length=n, min_length=n, sampling_topk=1, beam_size=1,
                                       include_prompt_in_result=False, end_token=[])
            return [r.sequences_ids[0] for r in out]
    else:
        import torch

        from gpt2lab.generate import Generator

        torch.set_num_threads(threads)
        generator = Generator.load(str(folder), mode=mode)

        def gen(n: int) -> list[list[int]]:
            done = generator.generate_ids(rows, greedy=True, max_new_tokens=n, stop_at_eot=False)
            return [c.token_ids for c in done]

    gen(8)  # warm-up
    first, _ = best_time(lambda: gen(1), reps)
    total, tokens = best_time(lambda: gen(NEW_TOKENS + 1), reps)
    return {"decode_tok_s": batch * NEW_TOKENS / (total - first), "first_s": first, "tokens": tokens}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of positions where two batches of greedy tokens agree."""
    return sum(x == y for r, s in zip(a, b, strict=True) for x, y in zip(r, s, strict=True)) / sum(map(len, b))


def child(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def convert(folder: Path) -> None:
    """The HF folder with GPT-2's tokenizer files, and CTranslate2's conversions of it."""
    from gpt2lab.tokenizer import Tokenizer

    write_weights(folder)
    Tokenizer.gpt2().save_hf(folder)  # the converter takes its vocabulary from the tokenizer
    converter = Path(sys.executable).parent / "ct2-transformers-converter"
    for quantization in MODES.values():
        subprocess.run([str(converter), "--model", str(folder), "--output_dir", str(folder / f"ct2-{quantization}"),
                        "--quantization", quantization, "--force"], check=True, capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        impl, mode, batch, folder = args.child
        print(json.dumps(run_one(impl, mode, int(batch), Path(folder), args.reps, args.threads)))
        return

    best: dict[tuple[str, str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpt2lab-ct2-") as tmp:
        t = time.perf_counter()
        convert(Path(tmp))
        print(f"weights written and converted in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        for r in range(args.rounds):
            for mode in MODES:
                for batch in args.batches:
                    for impl in ("gpt2lab", "ct2"):
                        res = child(["--child", impl, mode, str(batch), tmp, "--reps", str(args.reps),
                                     "--threads", str(args.threads)])
                        key = (impl, mode, batch)
                        if key not in best or res["decode_tok_s"] > best[key]["decode_tok_s"]:
                            best[key] = res
                        print(f"round {r}: {impl} {mode} batch {batch}: {res['decode_tok_s']:.1f} tok/s",
                              file=sys.stderr)
    reference = {b: best[("gpt2lab", "fp32", b)]["tokens"] for b in args.batches}
    print("| mode | batch | gpt2lab decode tok/s | CTranslate2 decode tok/s | ratio | greedy = gpt2lab fp32 "
          "(gpt2lab, CTranslate2) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for mode in MODES:
        for batch in args.batches:
            ours, theirs = best[("gpt2lab", mode, batch)], best[("ct2", mode, batch)]
            same = [agreement(r["tokens"], reference[batch]) for r in (ours, theirs)]
            ratio = ours["decode_tok_s"] / theirs["decode_tok_s"]
            rows.append({"mode": mode, "batch": batch, "gpt2lab": round(ours["decode_tok_s"], 1),
                         "ct2": round(theirs["decode_tok_s"], 1), "ratio": round(ratio, 3), "agreement": same})
            print(f"| {mode} | {batch} | {ours['decode_tok_s']:.1f} | {theirs['decode_tok_s']:.1f} | {ratio:.2f}x | "
                  f"{same[0]:.1%}, {same[1]:.1%} |")
    print(json.dumps({"threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
