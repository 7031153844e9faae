"""The recipes in recipes/, run as written on CPU processes (gloo) with small shapes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2lab import load_model
from gpt2lab.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpt2_xl_fsdp_recipe_trains_with_fsdp2_bf16_and_checkpointing(tmp_path, capsys):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(300))
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    assert main(["prepare", str(tmp_path / "input.txt"), "--out", str(tmp_path / "data"), "--no-progress"]) == 0
    env = os.environ | {"NPROC": "2", "MODEL": "gpt2-nano", "BATCH": "4", "MICRO": "1", "BLOCK": "32",
                        "STEPS": "4", "WARMUP": "1", "PYTHON": sys.executable}
    run = tmp_path / "run"
    proc = subprocess.run([str(ROOT / "recipes/gpt2-xl-fsdp.sh"), str(tmp_path / "data"), str(run),
                           "--device", "cpu", "--eval-interval", "2", "--eval-batches", "1", "--ckpt-interval", "2",
                           "--peak-tflops", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = json.loads((run / "provenance.jsonl").read_text().splitlines()[0])
    assert start["device"]["world_size"] == 2
    config = start["train_config"]
    assert (config["fsdp"], config["precision"], config["gradient_checkpointing"]) == (True, "bf16", True)
    assert (config["batch_size"], config["micro_batch"], config["block_size"]) == (4, 1, 32)
    assert config["min_lr"] == pytest.approx(config["lr"] / 10)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert rows[-1]["step"] == 4 and losses and all(math.isfinite(x) for x in losses)
    load_model(run)  # the FSDP2 run's checkpoint is an ordinary one

    # Run again: the recipe resumes the run (which has nothing left to do) instead of refusing its folder.
    again = subprocess.run([str(ROOT / "recipes/gpt2-xl-fsdp.sh"), str(tmp_path / "data"), str(run), "--device",
                            "cpu", "--peak-tflops", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "stopped at step 4" in again.stdout, again.stderr[-3000:]
    events = [json.loads(line)["event"] for line in (run / "provenance.jsonl").read_text().splitlines()]
    assert events == ["start", "resume"]


def test_the_recipe_says_what_to_set_without_a_gpu(tmp_path):
    env = os.environ | {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    env.pop("NPROC", None)
    proc = subprocess.run([str(ROOT / "recipes/gpt2-xl-fsdp.sh"), str(tmp_path), str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("set NPROC to the number of processes")
