"""Decoding's matrix products as a small C++ kernel (csrc/gemv.cpp), compiled on first use.

Decoding one token reads every weight once, so on a CPU it runs at the speed weights stream from
memory. PyTorch's int8 weight-only kernel (aten's _weight_int8pack_mm) streams gpt2-xl's weights
at about 17 GB/s on two cores and dequantizes again for every row of a batch; oneDNN's and
fbgemm's int8 kernels are faster but quantize the activations per tensor, so a row's result
would depend on the rows batched with it. The kernel here reads a layout made for streaming
(pack) at about 30 GB/s and computes each row alone, in one order, so batching changes nothing.

It needs an x86 CPU with AVX-512 and a C++ compiler (the one torch.compile uses). It is built
once per machine and PyTorch version into gpt2lab's cache ($XDG_CACHE_HOME/gpt2lab/kernels);
where it cannot be built, or with GPT2LAB_KERNELS=0, callers use PyTorch's kernels instead.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("csrc") / "gemv.cpp"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-fopenmp"]
ROWS, BYTES = 4, 64  # the packed layout: groups of 4 weight rows, interleaved 64 bytes at a time


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2lab" / "kernels"


@functools.cache
def kernels() -> Any:
    """The compiled extension (pack, linear), or None where it cannot run here."""
    if os.environ.get("GPT2LAB_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return None
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([torch.__version__, *FLAGS]).encode()).hexdigest()[:12]
    build = cache_dir() / f"gemv-{tag}"
    try:
        from torch.utils.cpp_extension import load

        if not any(build.glob("*.so")):
            print("gpt2lab: compiling the decoding kernels (once per machine, about 30 s)", file=sys.stderr)
        build.mkdir(parents=True, exist_ok=True)
        with _ninja_on_path():
            return load(name=f"gpt2lab_gemv_{tag}", sources=[str(SOURCE)], extra_cflags=FLAGS,
                        extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as e:  # no compiler or ninja, a read-only cache: PyTorch's kernels still work
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"gpt2lab: the decoding kernels could not be built ({reason}); "
                      "using PyTorch's, which decode more slowly", stacklevel=2)
        return None


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """PyTorch builds with the `ninja` on PATH: our dependency's, also when the virtual environment
    is not activated (.venv/bin/gpt2lab), for the duration of the build."""
    path = os.environ.get("PATH", "")
    try:
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
    except ImportError:  # a system ninja may still be there
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = path


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) in the layout linear() streams: (ceil(N/4), Kp/E, 4, E), E = 64 bytes of it."""
    return kernels().pack(weight.contiguous())


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The (n, k) weight a packed one holds (a copy)."""
    groups, chunks, rows, e = packed.shape
    return packed.permute(0, 2, 1, 3).reshape(groups * rows, chunks * e)[:n, :k].contiguous()


def rows(packed: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """Rows idx of a packed weight, shaped idx.shape + (k,)."""
    picked = packed[idx // ROWS, :, idx % ROWS]  # (..., chunks, E)
    return picked.flatten(-2)[..., :k]


def linear(x: torch.Tensor, packed: torch.Tensor, n: int, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W.T, times scale (n,) and plus bias (n,) (both float32), in x's dtype."""
    y = kernels().linear(x.reshape(-1, x.size(-1)), packed, n, scale, bias)
    return y.view(*x.shape[:-1], n)
