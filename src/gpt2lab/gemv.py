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
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import files
from .errors import GenerationError

SOURCE = Path(__file__).with_name("csrc") / "gemv.cpp"
# -ffp-contract=off: y * scale + bias must round the same way in every code path (a fused
# multiply-add in one and not another would make a row's result depend on its batch).
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-fopenmp", "-ffp-contract=off"]
ROWS, BYTES = 4, 64  # the packed layout: groups of 4 weight rows, interleaved 64 bytes at a time


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2lab" / "kernels"


_building = threading.Lock()


def kernels() -> Any:
    """The compiled extension (pack, linear), or None where it cannot run here."""
    with _building:  # functools.cache alone would let two threads build at once
        return _kernels()


@functools.cache
def _kernels() -> Any:
    if os.environ.get("GPT2LAB_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return None
    try:
        source = SOURCE.read_bytes()
        tag = hashlib.sha256(source + " ".join([torch.__version__, *FLAGS]).encode()).hexdigest()[:12]
        name, build = f"gpt2lab_gemv_{tag}", cache_dir() / f"gemv-{tag}"
        library = build / f"{name}.so"
        if not library.exists():
            module = _build(name, build)
            if module is not None:
                return module
        spec = importlib.util.spec_from_file_location(name, library)  # a built one: no lock, no compiler
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as e:  # no compiler or ninja, no cache folder: PyTorch's kernels still work
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"gpt2lab: the decoding kernels could not be built ({reason}); "
                      "using PyTorch's, which decode more slowly", stacklevel=3)
        return None


def _build(name: str, build: Path) -> Any:
    """Compile into a folder of this process's own that becomes `build` once complete, so a build
    that is killed leaves nothing another process waits on (files.atomic_dir removes it later).
    Returns the module, or None if another process finished the same build first."""
    from torch.utils.cpp_extension import load

    print("gpt2lab: compiling the decoding kernels (once per machine, about 30 s)", file=sys.stderr)
    module = None
    try:
        with files.atomic_dir(build) as tmp, _ninja_on_path():
            module = load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                          build_directory=str(tmp), verbose=False)
    except files.DestinationError:  # built meanwhile by another process: ours is loaded all the same
        pass
    return module


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


def rows(packed: torch.Tensor, idx: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Rows idx of a packed weight (n, k), shaped idx.shape + (k,); an id outside [0, n) raises
    IndexError, as nn.Embedding does."""
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError("index out of range in self")
    picked = packed[idx // ROWS, :, idx % ROWS]  # (..., chunks, E)
    return picked.flatten(-2)[..., :k]


def linear(x: torch.Tensor, packed: torch.Tensor, n: int, k: int, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., k) @ W.T for a packed W (n, k), times scale (n,) and plus bias (n,) (both float32),
    in x's dtype."""
    if x.size(-1) != k:
        raise RuntimeError(f"x has {x.size(-1)} features where the weight takes {k}")
    kernel = _kernels()  # built already if a model holds packed weights: no lock on this hot path
    if kernel is None:
        raise GenerationError("this model was prepared with gpt2lab's decoding kernel, which cannot run here: "
                              "load it again from its checkpoint (quantize.load)")
    y = kernel.linear(x.reshape(-1, k), packed, n, scale, bias)
    return y.view(*x.shape[:-1], n)
