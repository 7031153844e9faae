"""Scored tokens/s of `gpt2lab eval --task perplexity` against Hugging Face's documented perplexity loop.

    python benchmarks/evaluate/perplexity.py [--model gpt2] [--tokens 4096] [--stride 512] [--batch-size 8]
                                             [--repeats 3] [--threads N] [--text FILE]

One random gpt2 (124M) is saved as a Hugging Face folder; gpt2lab loads it with load_model and
transformers with from_pretrained, so both score the same weights. The text (default: the start of
Shakespeare's works from the data catalog) is tokenized with GPT-2's tokenizer and cut to --tokens.
Both runs are interleaved in this process, and both must give the same negative log-likelihood;
the figure to read is the ratio of scored tokens per second.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2lab import evaluate as ev
from gpt2lab.checkpoint import load_model
from gpt2lab.config import PRESETS
from gpt2lab.data import corpus_files
from gpt2lab.tokenizer import Tokenizer


def hf_recipe(model: GPT2LMHeadModel, ids: list[int], stride: int) -> tuple[float, int]:
    """The loop of https://huggingface.co/docs/transformers/perplexity, with each window's loss
    weighted by the number of labels it averaged over (so the total is exact)."""
    encodings = torch.tensor([ids])
    max_length, seq_len = model.config.n_positions, encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        n_valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * n_valid
        n_tokens += n_valid
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2", choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--text", help="a UTF-8 text file (default: Shakespeare from the data catalog)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tok = Tokenizer.gpt2()
    files = [args.text] if args.text else corpus_files("shakespeare")
    text = "".join(open(f, encoding="utf-8").read() for f in files[:3])
    ids = tok.encode(text)[:args.tokens]
    text = tok.decode(ids)
    assert tok.encode(text) == ids, "cut the text at a token boundary that re-encodes identically"

    cfg = PRESETS[args.model]
    hf_config = GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.n_ctx,
                           vocab_size=cfg.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        GPT2LMHeadModel(hf_config).save_pretrained(tmp)
        ours = load_model(tmp)
        theirs = GPT2LMHeadModel.from_pretrained(tmp).eval()

    times: dict[str, list[float]] = {"gpt2lab": [], "hf-recipe": []}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        t0 = time.perf_counter()
        result = ev.perplexity(ours, tok, text, stride=args.stride, batch_size=args.batch_size)
        times["gpt2lab"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        nll, n_scored = hf_recipe(theirs, ids, args.stride)
        times["hf-recipe"].append(time.perf_counter() - t0)
    assert result["tokens_scored"] == n_scored
    ours_nll = result["metrics"]["nats_per_token"] * n_scored
    rel = abs(ours_nll - nll) / nll
    assert rel < 1e-4, f"the two disagree: {ours_nll} vs {nll} nats"

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model} (random weights) sliding-window perplexity on {len(ids)} tokens, n_ctx {cfg.n_ctx}, "
          f"stride {args.stride}, {result['windows']} windows, {n_scored} scored tokens; fp32, {args.threads} "
          f"threads, median of {args.repeats}; total NLL agrees to {rel:.1e}")
    for k, v in med.items():
        extra = f" (batch {args.batch_size})" if k == "gpt2lab" else ""
        print(f"  {k:10s} {v:8.2f} s   {n_scored / v:8.0f} scored tokens/s{extra}")
    print(f"  ratio gpt2lab / hf-recipe: {med['hf-recipe'] / med['gpt2lab']:.2f}x")


if __name__ == "__main__":
    main()
