"""Peak RSS while loading a random checkpoint (default gpt2-xl), in our format and in HF's.

    python benchmarks/checkpoint/load_rss.py [--model gpt2-xl] [--dir /tmp/gpt2lab-rss]

Writes both checkpoints once (reused on later runs), then loads each in a fresh subprocess and
reports its peak resident memory against the size of the weights on disk. transformers'
`from_pretrained` on the HF folder is measured the same way for reference.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

MAKE = """
import torch, gpt2lab
torch.manual_seed(0)
model = gpt2lab.GPT(gpt2lab.preset({model!r}))
gpt2lab.save_checkpoint(model, {ours!r})
gpt2lab.export_hf(model, {hf!r})
"""

LOAD = {
    "gpt2lab load_model (ours)": "import gpt2lab; m = gpt2lab.load_model({ours!r}); m(torch.tensor([[1, 2, 3]]))",
    "gpt2lab load_model (HF folder)": "import gpt2lab; m = gpt2lab.load_model({hf!r}); m(torch.tensor([[1, 2, 3]]))",
    "transformers from_pretrained": "import transformers; "
    "m = transformers.GPT2LMHeadModel.from_pretrained({hf!r}); m(torch.tensor([[1, 2, 3]]))",
}

MEASURE = """
import resource, torch
with torch.inference_mode():
    {stmt}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-xl")
    ap.add_argument("--dir", default="/tmp/gpt2lab-rss")
    args = ap.parse_args()
    root = Path(args.dir) / args.model
    paths = {"ours": str(root / "ours"), "hf": str(root / "hf")}
    if not (root / "hf" / "model.safetensors").exists():
        subprocess.run([sys.executable, "-c", MAKE.format(model=args.model, **paths)], check=True)
    disk = (root / "ours" / "model.safetensors").stat().st_size
    print(f"{args.model}: weights on disk {disk / 2**30:.2f} GiB (model.safetensors)")
    for name, stmt in LOAD.items():
        code = MEASURE.format(stmt=stmt.format(**paths))
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        peak = int(out.stdout.strip().splitlines()[-1])
        print(f"  {name:32s} peak RSS {peak / 2**30:6.2f} GiB = {peak / disk:.2f}x the weights")


if __name__ == "__main__":
    main()
