"""gpt2lab's malloc settings: freed tensors stay mapped for the next step, unless the user chose."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpt2lab import allocator
from gpt2lab.cli import main

# Ten "steps" that allocate and free 64 MiB and 32 MiB tensors: page faults after the first, and
# RSS once they are freed.
CHILD = r"""
import json, resource
from gpt2lab import allocator
tuned = allocator.tune()
import torch

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

x = torch.ones(16 << 20)
del x
before = faults()
for step in range(10):
    a, b = torch.ones(16 << 20), torch.ones(8 << 20)
    del a, b
rss = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS"))) * 1024
print(json.dumps({"tuned": tuned, "faults": faults() - before, "rss_after_free": rss}))
"""


def child(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GPT2LAB_MALLOC"}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, env=clean | env)
    return json.loads(out.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
def test_freed_tensors_stay_mapped_and_are_reused_without_page_faults():
    tuned, default = child(), child(GPT2LAB_MALLOC="default")
    assert tuned["tuned"] and not default["tuned"]
    # glibc's default unmaps each tensor on free and faults all its 96 MiB back in on every step
    assert default["faults"] >= 10 * 96 * 256
    assert tuned["faults"] < 0.6 * default["faults"]  # typically a quarter, at worst half
    assert tuned["rss_after_free"] > default["rss_after_free"] + (64 << 20)  # the price: it stays in RSS


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "131072"}, {"MALLOC_ARENA_MAX": "2"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, {"GPT2LAB_MALLOC": "default"}])
def test_a_users_own_malloc_settings_win(env):
    assert not child(**env)["tuned"]


def test_every_command_tunes_the_allocator_before_it_runs(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(allocator, "tune", lambda: calls.append("tune"))
    assert main(["estimate", "gpt2-nano", "--batch-size", "1", "--block-size", "8"]) == 0
    assert calls == ["tune"] and "gpt2-nano" in capsys.readouterr().out
