"""The trials behind the demo's settings: which model and vocabulary reach the lowest held-out
bits per byte in 8 minutes of training on 2 CPU cores.

Two measurements, combined:
  1. speed: training tokens/s of each (model, vocabulary) on 2 pinned CPU cores, fp32, through
     fit() itself (several core pairs measure in parallel);
  2. quality: each candidate trained on a GPU in fp32 for exactly the tokens those 8 minutes buy
     it on the CPU (the cosine schedule ends there), several learning rates each. Loss against
     tokens does not depend on the hardware, so this replays the CPU runs in a fraction of the
     time, many at once.

Data folders: DATA_ROOT/{gpt2,bpe1024,bpe2048,...} written by `gpt2lab prepare shakespeare`
(with the vocabularies from gpt2lab.demo.learned_vocabulary).

    python benchmarks/train/demo_sweep.py --data-root trials/data --out /tmp/sweep --report sweep.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import time
from pathlib import Path

ARCHS = {  # name -> (n_layer, n_head, n_embd)
    "gpt2-micro": (4, 4, 128),
    "6x192": (6, 6, 192),
    "6x256": (6, 8, 256),
    "gpt2-mini": (6, 6, 384),
}
VOCABS = ["bpe1024", "bpe2048", "bpe4096", "bpe8192", "gpt2"]
BATCH, BLOCK = 16, 256


def _setup(cores: list[int] | None, threads: int) -> None:
    if cores:
        os.sched_setaffinity(0, cores)
    import torch

    torch.set_num_threads(threads)


def _config_file(arch: str, vocab_size: int, folder: Path) -> str:
    n_layer, n_head, n_embd = ARCHS[arch]
    path = folder / f"{arch}-{vocab_size}.json"
    path.write_text(json.dumps(dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_ctx=BLOCK,
                                    vocab_size=vocab_size)))
    return str(path)


def _physical_cores() -> list[int]:
    """One logical CPU per physical core: two hyperthreads of one core would halve a pair's speed."""
    seen, cores = set(), []
    for cpu in sorted(os.sched_getaffinity(0)):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = ((topo / "physical_package_id").read_text(), (topo / "core_id").read_text())
        except OSError:
            key = (str(cpu), "")
        if key not in seen:
            seen.add(key)
            cores.append(cpu)
    return cores


def _train(arch: str, vocab: str, data_root: Path, out: Path, *, device: str, steps: int, lr: float,
           eval_every: int, log_every: int = 10) -> dict:
    from gpt2lab import data as datasets
    from gpt2lab.train import TrainConfig, pretrain

    data_dir = data_root / vocab
    vocab_size = datasets.DataFolder.open(data_dir).vocab_size
    run = out / "runs" / f"{arch}-{vocab}-lr{lr:g}-{steps}-{device.split(':')[0]}"
    cfg = TrainConfig(model=_config_file(arch, vocab_size, out), batch_size=BATCH, block_size=BLOCK,
                      max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=min(50, steps // 10),
                      eval_interval=eval_every, eval_batches=8, log_interval=max(1, min(log_every, steps // 3)),
                      ckpt_interval=10**9, keep_last=1, device=device, precision="fp32", peak_tflops=1.0)
    result = pretrain(data_dir, run, cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"arch": arch, "vocab": vocab, "lr": lr, "steps": steps, "val_bpb": result.val_bpb,
            "curve": [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r],
            "tokens_per_s": [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]}


def _speed_worker(cores: list[int], jobs: mp.Queue, results: mp.Queue, data_root: Path, out: Path,
                  deadline: float) -> None:
    _setup(cores, len(cores))
    while time.time() < deadline:
        try:
            arch, vocab = jobs.get_nowait()
        except Exception:
            return
        r = _train(arch, vocab, data_root, out, device="cpu", steps=16, lr=1e-3, eval_every=0, log_every=4)
        results.put({"arch": arch, "vocab": vocab, "tokens_per_s": max(r["tokens_per_s"][2:])})


def _quality_worker(cores: list[int], jobs: mp.Queue, results: mp.Queue, data_root: Path, out: Path,
                    device: str, deadline: float) -> None:
    _setup(cores, 1)
    while time.time() < deadline:
        try:
            arch, vocab, steps, lr = jobs.get_nowait()
        except Exception:
            return
        results.put(_train(arch, vocab, data_root, out, device=device, steps=steps, lr=lr,
                           eval_every=max(1, steps // 10)))


def _run_pool(target, n: int, cores_of, jobs: list, args: tuple, deadline: float) -> list:
    ctx = mp.get_context("spawn")
    q_jobs, q_results = ctx.Queue(), ctx.Queue()
    for j in jobs:
        q_jobs.put(j)
    procs = [ctx.Process(target=target, args=(cores_of(i), q_jobs, q_results, *args, deadline)) for i in range(n)]
    for p in procs:
        p.start()
    results = []
    while any(p.is_alive() for p in procs) or not q_results.empty():
        try:
            results.append(q_results.get(timeout=1))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}), flush=True)
        except Exception:
            pass
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="working folder for the runs")
    ap.add_argument("--report", type=Path, required=True, help="the JSON file to write")
    ap.add_argument("--minutes", type=float, default=8.0, help="the demo's training time budget")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    ap.add_argument("--speed-seconds", type=float, default=150)
    ap.add_argument("--quality-seconds", type=float, default=240)
    ap.add_argument("--gpu-workers", type=int, default=8)
    ap.add_argument("--quality-device", default="cuda", help="where the quality runs train (cuda; cpu to try it)")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--vocabs", nargs="+", default=VOCABS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ncpu = len(os.sched_getaffinity(0))
    candidates = [(a, v) for a in args.archs for v in args.vocabs if not (v == "gpt2" and a in ("6x256", "gpt2-mini"))]

    t0 = time.time()
    cores = _physical_cores()
    pairs = max(1, len(cores) // 2 - 1)  # leave one pair for this process and the system
    speed = _run_pool(_speed_worker, pairs, lambda i: cores[2 + 2 * i: 4 + 2 * i] or cores[:2], candidates,
                      (args.data_root, args.out), t0 + args.speed_seconds)
    budget = {(s["arch"], s["vocab"]): s["tokens_per_s"] for s in speed}
    jobs = []
    for (arch, vocab), tok_s in budget.items():
        steps = max(1, int(args.minutes * 60 * 0.95 * tok_s / (BATCH * BLOCK)))  # 5%: evaluation, checkpoints
        jobs += [(arch, vocab, steps, lr) for lr in args.lrs]
    jobs.sort(key=lambda j: -j[2])  # the longest first, so that the workers finish together
    t1 = time.time()
    quality = _run_pool(_quality_worker, args.gpu_workers, lambda i: [i % ncpu], jobs,
                        (args.data_root, args.out, args.quality_device), t1 + args.quality_seconds)
    report = {"cpu_pairs_in_parallel": pairs, "physical_cores": cores, "speed": speed, "quality": quality,
              "seconds": {"speed": t1 - t0, "quality": time.time() - t1}}
    args.report.write_text(json.dumps(report, indent=1))
    best = sorted((q for q in quality if q["val_bpb"] is not None and math.isfinite(q["val_bpb"])),
                  key=lambda q: q["val_bpb"])
    for q in best[:10]:
        print(f"{q['val_bpb']:.4f} bits/byte  {q['arch']:10s} {q['vocab']:8s} lr {q['lr']:g}  {q['steps']} steps")


if __name__ == "__main__":
    main()
