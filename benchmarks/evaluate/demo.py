"""The demo model (`make demo`) on held-out Shakespeare and on BIG-bench multiple-choice tasks.

    python benchmarks/evaluate/demo.py [--demo runs/demo] [--tasks general_knowledge logical_deduction/three_objects]

Takes the newest run in the demo folder, writes the held-out split of the demo's corpus (the
documents `prepare` set aside, decoded from the GPT-2-token copy in DEMO/data/gpt2) to
DEMO/held_out.txt, and runs, printing each one-line summary and writing DEMO/eval-*.json:
    gpt2lab eval RUN --task perplexity --data DEMO/held_out.txt
    gpt2lab eval RUN --task multiple-choice --data bigbench:TASK      (for each --tasks)
The first BIG-bench task fetches the bigbench sdist (358 MB download, once).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gpt2lab import data as datasets
from gpt2lab.checkpoint import latest_checkpoint
from gpt2lab.commands.evaluate import evaluate


def newest_run(demo: Path) -> Path:
    runs = [r for r in sorted(demo.glob("run-*")) if latest_checkpoint(r) is not None]
    if not runs:
        raise SystemExit(f"{demo} holds no run with a checkpoint: run `make demo` first")
    return runs[-1]


def write_held_out(data_dir: Path, path: Path) -> Path:
    """The validation split's text: byte-level BPE decodes exactly; document boundaries become line breaks."""
    data = datasets.DataFolder.open(data_dir)
    tok, shards = data.tokenizer, data.shards("val")
    ids = shards.read([0], len(shards))[0]
    docs = [tok.decode_bytes(part[part != tok.eot_id]) for part in np.split(ids, np.flatnonzero(ids == tok.eot_id))]
    path.write_bytes(b"\n".join(d for d in docs if d))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"))
    ap.add_argument("--tasks", nargs="+", default=["general_knowledge", "logical_deduction/three_objects"])
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    run = newest_run(args.demo)
    held_out = write_held_out(args.demo / "data" / "gpt2", args.demo / "held_out.txt")
    print(f"{run} ({latest_checkpoint(run).name}); held-out text: {held_out} ({held_out.stat().st_size:,} bytes)")
    print(evaluate(str(run), task="perplexity", data=str(held_out), batch_size=args.batch_size,
                   out=args.demo / "eval-perplexity.json"))
    for task in args.tasks:
        print(evaluate(str(run), task="multiple-choice", data=f"bigbench:{task}", batch_size=args.batch_size,
                       out=args.demo / f"eval-{task.replace('/', '-')}.json"))


if __name__ == "__main__":
    main()
