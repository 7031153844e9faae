"""Generation speed and quality: gpt2lab's Generator against transformers' generate, per speed mode.

    flock /tmp/gpt2lab-bench.lock .venv/bin/python benchmarks/generate/bench.py [--rounds 2] [--compile [MODE ...]]
    flock /tmp/gpt2lab-bench.lock .venv/bin/python benchmarks/generate/bench.py --model gpt2-xl \
        --weights /tmp/xl-random --batches 1 --rounds 1 --new-tokens 33 --no-quality \
        --out benchmarks/results/generate-xl.json

GPT-2 124M with random weights, 16-token prompts + 128 new tokens, greedy, batch 1 and 8. Every
configuration runs in its own subprocess (so its peak RSS is its own), and the rounds interleave
the configurations so that load from other processes hits them alike; each figure is the best
round. Reported: tokens/s and the ratio to transformers fp32 measured in the same run, time to
first token (prefill + 1 token), peak RSS, and the weight bytes each decode step reads times
steps/s, against the read bandwidth measured here (a large tensor sum).

Quality: random weights at GPT-2's init predict a nearly flat distribution (perplexity ~ vocab
size), where any rounding changes perplexity by ~0. So the weights are given structure: block
weights x2, position embeddings x4 and the final LayerNorm x8 make predictions context-dependent
with an entropy of ~3 nats (perplexity ~24, like trained GPT-2 on web text). The held-out text is
8 x 256 tokens sampled (temperature 1) from the fp32 model, the text it models best; each mode's
perplexity on it is compared with fp32's, with the KL divergence and greedy agreement. Caveat:
Gaussian random weights have no outlier channels, which trained GPT-2 has, so the int8 figure is a
lower bound on its real-model cost; `--trained CKPT --text FILE` measures a trained checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPT_TOKENS, NEW_TOKENS = 16, 128
MODES = ("fp32", "bf16", "int8")


# -- the weights -------------------------------------------------------------------------------


def write_weights(folder: Path, size: str = "gpt2", seed: int = 0) -> None:
    """GPT-2 in a preset's shape, random with GPT-2's init, given structure (see the module docstring), as HF's."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2lab.config import preset

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**preset(size).to_hf())).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")):
                p.mul_(2.0)
        hf.transformer.wpe.weight.mul_(4.0)
        hf.transformer.ln_f.weight.mul_(8.0)
    hf.save_pretrained(folder)


def memory_mib(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process, in MiB. Not getrusage's ru_maxrss: a child
    inherits its parent's high-water mark through fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def prompts(batch: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 50256, (batch, PROMPT_TOKENS), generator=g)


def best_time(fn, reps: int):
    """(the shortest of `reps` timed calls of fn, fn's result)."""
    best, result = math.inf, None
    for _ in range(reps):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


# -- one configuration, in a subprocess --------------------------------------------------------


def run_one(impl: str, mode: str, batch: int, folder: Path, reps: int, compile_: bool) -> dict:
    import torch

    base_rss = memory_mib("VmRSS")
    ids = prompts(batch)
    if impl == "hf":
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(folder).eval()
        weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                           if type(m).__name__ in ("Conv1D", "Linear"))

        def gen(n: int):
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                     pad_token_id=50256, eos_token_id=None)
            return out[:, PROMPT_TOKENS:].tolist()
    else:
        from gpt2lab.generate import Generator
        from gpt2lab.quantize import load

        model = load(folder, mode, pack=not compile_)  # what Generator.load does
        weight_bytes = decode_weight_bytes(model)
        generator = Generator(model, compile=compile_)
        rows = ids.tolist()

        def gen(n: int):
            done = generator.generate_ids(rows, greedy=True, max_new_tokens=n, stop_at_eot=False)
            return [c.token_ids for c in done]

    t = time.perf_counter()
    gen(8)  # warm-up (and, with --compile, the compilation)
    warmup = time.perf_counter() - t
    ttft, _ = best_time(lambda: gen(1), reps)
    total, tokens = best_time(lambda: gen(NEW_TOKENS), reps)
    # Each storage once (the tied head shares the embedding's); oneDNN's packed weights have none.
    tensors = [*model.parameters(), *model.buffers()]
    held = {id(t) if t.is_mkldnn else t.untyped_storage().data_ptr(): t for t in tensors}
    model_bytes = sum(t.numel() * t.element_size() for t in held.values())
    return {
        "impl": impl, "mode": mode, "batch": batch, "compile": compile_, "threads": torch.get_num_threads(),
        "tokens_per_s": batch * NEW_TOKENS / total, "seconds": total, "ttft_ms": ttft * 1e3,
        "decode_tokens_per_s": batch * (NEW_TOKENS - 1) / (total - ttft), "model_bytes": model_bytes,
        "warmup_s": warmup, "peak_rss_mib": memory_mib("VmHWM"), "rss_end_mib": memory_mib("VmRSS"),
        "rss_after_imports_mib": base_rss,
        "weight_bytes_per_step": weight_bytes, "tokens": tokens,
    }


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every matmul's weight (the tied head in full), biases,
    LayerNorms, int8 scales. Embedding lookups read one row per token and are left out."""
    import torch
    import torch.nn as nn

    from gpt2lab.quantize import Int8Linear, KernelLinear, PackedLinear

    total = 0
    for m in model.modules():
        if isinstance(m, PackedLinear | KernelLinear):  # packed weights may carry padding or blocking
            total += m.in_features * m.out_features * torch.empty((), dtype=m.weight.dtype).element_size()
        elif isinstance(m, Int8Linear):
            total += m.in_features * m.out_features + m.scales.numel() * m.scales.element_size()
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        else:
            continue
        if m.bias is not None:
            total += m.bias.numel() * m.bias.element_size()
    return total


def bandwidth(threads: int) -> dict:
    """Read bandwidth (sum of a 512 MiB tensor) and copy bandwidth (bytes read + written)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.rand(128 * 2**20)  # 512 MiB, far beyond the caches
    y = torch.empty_like(x)
    read, _ = best_time(lambda: x.sum(), 10)
    copy, _ = best_time(lambda: y.copy_(x), 10)
    return {"read_gb_s": x.nbytes / read / 1e9, "copy_gb_s": 2 * x.nbytes / copy / 1e9}


# -- quality -------------------------------------------------------------------------------------


def quality(folder: Path, trained: str | None, text: str | None) -> dict:
    """Perplexity of each mode on held-out text, relative to fp32; KL(fp32 || mode), argmax agreement."""
    import torch

    from gpt2lab.checkpoint import load_model, load_tokenizer
    from gpt2lab.generate import Generator
    from gpt2lab.quantize import prepare

    source = trained or folder  # folder is "-" with --quality-only
    ref = load_model(source)
    if text is not None:
        ids = load_tokenizer(source).encode(Path(text).read_text(encoding="utf-8"))
        n = min(256, ref.config.n_ctx)
        rows = [ids[i:i + n] for i in range(0, len(ids) - n + 1, n)][:32]
        held_out = torch.tensor(rows)
        what = f"{len(rows)} x {n} tokens of {text}"
    else:
        # The fp32 model's own samples: 8 x 256 tokens, each starting at <|endoftext|>.
        done = Generator(ref).generate_ids([[50256]] * 8, max_new_tokens=255, seed=0, stop_at_eot=False)
        held_out = torch.tensor([[50256, *c.token_ids] for c in done])
        what = "8 x 256 tokens sampled from the fp32 model"
    out = {"held_out": what, "modes": {}}
    with torch.inference_mode():
        ref_logp = ref(held_out).float().log_softmax(-1)[:, :-1]
    targets = held_out[:, 1:, None]
    for mode in MODES:
        model = prepare(load_model(source), mode)
        with torch.inference_mode():
            logp = model(held_out).float().log_softmax(-1)[:, :-1]
        nll = -logp.gather(-1, targets).mean().item()
        kl = max(0.0, (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item())  # not -0.0 for fp32 itself
        agree = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean().item()
        out["modes"][mode] = {"perplexity": math.exp(nll), "kl_nats": kl, "argmax_agreement": agree}
    fp32 = out["modes"]["fp32"]["perplexity"]
    for m in out["modes"].values():
        m["perplexity_change_pct"] = 100 * (m["perplexity"] / fp32 - 1)
    return out


# -- the driver ------------------------------------------------------------------------------------


def child(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    global NEW_TOKENS  # a child measures --new-tokens
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions inside each subprocess")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--model", default="gpt2", help="the shape: a preset (gpt2 ... gpt2-xl)")
    p.add_argument("--weights", help="keep the random HF folder here and reuse it (gpt2-xl's takes a minute)")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--no-quality", action="store_true", help="skip the quality measurement")
    p.add_argument("--compile", nargs="*", choices=MODES, default=None,
                   help="also time torch.compile at batch 1 in these modes (no mode given: fp32)")
    p.add_argument("--trained", help="a trained checkpoint for the quality measurement (with --text)")
    p.add_argument("--text", help="held-out text file for --trained")
    p.add_argument("--quality-only", action="store_true", help="only the quality measurement (with --trained/--text)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/generate.json"))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:  # inside a subprocess: one measurement, printed as JSON
        import torch

        torch.set_num_threads(args.threads)
        kind, *rest = args.child
        NEW_TOKENS = args.new_tokens
        if kind == "weights":  # in a subprocess, so that the driver stays small
            write_weights(Path(rest[0]), args.model)
            result = {"written": rest[0]}
        elif kind == "bandwidth":
            result = bandwidth(args.threads)
        elif kind == "quality":
            result = quality(Path(rest[0]), args.trained, args.text)
        else:
            impl, mode, batch, folder, compile_ = rest[0], rest[1], int(rest[2]), Path(rest[3]), rest[4] == "1"
            result = run_one(impl, mode, batch, folder, args.reps, compile_)
        print(json.dumps(result))
        return

    common = ["--threads", str(args.threads), "--reps", str(args.reps), "--new-tokens", str(args.new_tokens),
              "--model", args.model]
    trained = [*(["--trained", args.trained] if args.trained else []), *(["--text", args.text] if args.text else [])]
    if args.quality_only:
        if not args.trained:
            p.error("--quality-only needs --trained (and --text)")
        qual = child(["--child", "quality", "-", *common, *trained])
        print(render({"quality": qual}))
        return
    with tempfile.TemporaryDirectory(prefix="gpt2lab-bench-") as tmp:
        folder = Path(args.weights or Path(tmp) / f"{args.model}-random")
        if not (folder / "model.safetensors").is_file():
            if folder.exists() and any(folder.iterdir()):
                p.error(f"--weights {folder} holds files but no model.safetensors: give a new or empty folder")
            child(["--child", "weights", str(folder), *common])
        configs = [("hf", "fp32", b, 0) for b in args.batches]
        configs += [("ours", m, b, 0) for m in MODES for b in args.batches]
        if args.compile is not None:
            configs += [("ours", m, 1, 1) for m in (args.compile or ["fp32"])]
        best: dict[tuple, dict] = {}
        failed: dict[tuple, str] = {}
        bw = child(["--child", "bandwidth", *common])
        for r in range(args.rounds):
            for impl, mode, batch, comp in configs:
                key = (impl, mode, batch, comp)
                try:
                    res = child(["--child", "run", impl, mode, str(batch), str(folder), str(comp), *common])
                except RuntimeError as e:  # e.g. a mode that torch.compile cannot handle: report it, go on
                    failed[key] = str(e).splitlines()[-1]
                    print(f"round {r}: {key} failed: {failed[key]}", file=sys.stderr)
                    continue
                if key not in best or res["tokens_per_s"] > best[key]["tokens_per_s"]:
                    best[key] = {**res, "ttft_ms": min(res["ttft_ms"], best.get(key, res)["ttft_ms"])}
                print(f"round {r}: {impl:4} {mode} compile={comp} batch {batch}: {res['tokens_per_s']:.1f} tok/s",
                      file=sys.stderr)
            bw2 = child(["--child", "bandwidth", *common])
            bw = {k: max(bw[k], bw2[k]) for k in bw}
        qual = None if args.no_quality else child(["--child", "quality", str(folder), *common, *trained])

    rows = []
    for (impl, mode, batch, comp), res in best.items():
        hf = best[("hf", "fp32", batch, 0)]
        steps_per_s = res["tokens_per_s"] / batch
        achieved = res["weight_bytes_per_step"] * steps_per_s / 1e9
        same = res["tokens"] == hf["tokens"]
        agree = token_agreement(res["tokens"], hf["tokens"])
        eager = token_agreement(res["tokens"], best[("ours", mode, batch, 0)]["tokens"]) if comp else None
        rows.append({
            "impl": impl, "mode": mode + ("+compile" if comp else ""), "batch": batch,
            "tokens_per_s": round(res["tokens_per_s"], 1),
            "vs_hf_fp32": round(res["tokens_per_s"] / hf["tokens_per_s"], 2),
            "decode_tokens_per_s": round(res["decode_tokens_per_s"], 2),
            "decode_vs_hf_fp32": round(res["decode_tokens_per_s"] / hf["decode_tokens_per_s"], 2),
            "model_mb": round(res["model_bytes"] / 1e6),
            "peak_rss_vs_model": round(res["peak_rss_mib"] * 2**20 / res["model_bytes"], 2),
            "ttft_ms": round(res["ttft_ms"], 1), "peak_rss_mib": round(res["peak_rss_mib"]),
            "rss_end_mib": round(res["rss_end_mib"]), "rss_after_imports_mib": round(res["rss_after_imports_mib"]),
            "weights_mb_per_step": round(res["weight_bytes_per_step"] / 1e6),
            "weights_gb_s": round(achieved, 1), "of_read_bw": round(achieved / bw["read_gb_s"], 2),
            "greedy_tokens_equal_hf": same, "token_agreement_hf": round(agree, 3), "token_agreement_eager": eager,
            "warmup_s": round(res["warmup_s"], 1),
        })
    report = {"threads": args.threads, "bandwidth": bw, "runs": rows, "quality": qual,
              "failed": {" ".join(map(str, k)): v for k, v in failed.items() if k not in best}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))


def as_eager(row: dict) -> str:
    eager = row["token_agreement_eager"]
    return "" if eager is None else f" ({eager:.1%} as eager)"


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The fraction of positions where two batches of generated ids agree."""
    pairs = [(x, y) for r, s in zip(a, b, strict=True) for x, y in zip(r, s, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def render(report: dict) -> str:
    lines = []
    if "runs" in report:
        lines += speed_table(report)
        lines += [f"failed: {k}: {v}" for k, v in report["failed"].items()]
    q = report["quality"]
    if q is None:
        return "\n".join(lines)
    lines += ["", f"Quality on {q['held_out']}:", "",
              "| mode | perplexity | change vs fp32 | KL(fp32 || mode) nats | argmax agreement |",
              "|---|---|---|---|---|"]
    for mode, m in q["modes"].items():
        lines.append(f"| {mode} | {m['perplexity']:.3f} | {m['perplexity_change_pct']:+.2f}% | {m['kl_nats']:.5f} | "
                     f"{m['argmax_agreement']:.1%} |")
    return "\n".join(lines)


def speed_table(report: dict) -> list[str]:
    bw = report["bandwidth"]
    lines = [f"threads {report['threads']}; measured bandwidth: read {bw['read_gb_s']:.1f} GB/s, "
             f"copy {bw['copy_gb_s']:.1f} GB/s", "",
             "| impl | mode | batch | tok/s | vs HF fp32 | decode tok/s | vs HF fp32 | TTFT ms | peak RSS MiB "
             "| x model | RSS at end | weights MB/step | weights GB/s | of read BW | tokens as HF's |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['impl']} | {r['mode']} | {r['batch']} | {r['tokens_per_s']} | {r['vs_hf_fp32']}x | "
                     f"{r['decode_tokens_per_s']} | {r['decode_vs_hf_fp32']}x | "
                     f"{r['ttft_ms']} | {r['peak_rss_mib']} | {r['peak_rss_vs_model']}x | {r['rss_end_mib']} | "
                     f"{r['weights_mb_per_step']} | "
                     f"{r['weights_gb_s']} | "
                     f"{r['of_read_bw']:.0%} | {r['token_agreement_hf']:.1%}{as_eager(r)} |")
    return lines


if __name__ == "__main__":
    main()
