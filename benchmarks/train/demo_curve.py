"""The demo's held-out bits per byte against wall-clock time, from a run's metrics.jsonl.

    .venv/bin/python benchmarks/train/demo_curve.py runs/demo/run-YYYYmmdd-HHMMSS

Prints a markdown table (the run's loss.png draws the same curve, right panel).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run folder (or runs/demo: its newest run-*)")
    run = ap.parse_args().run
    if not (run / "metrics.jsonl").is_file():
        run = sorted(run.glob("run-*"))[-1]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tokens = {r["step"]: r["tokens"] for r in rows if "tokens" in r}
    print(f"{run}\n\n| minutes | step | tokens | held-out bits/byte |\n|---|---|---|---|")
    for r in rows:
        if "val_bpb" in r:
            print(f"| {r['elapsed_s'] / 60:.2f} | {r['step']} | {tokens.get(r['step'], 0):,} | {r['val_bpb']:.3f} |")


if __name__ == "__main__":
    main()
