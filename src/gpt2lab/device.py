"""The one resolver from a device name (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`) to a torch.device."""

from __future__ import annotations

import functools
import os
import sysconfig
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .errors import DeviceError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` is this rank's GPU when there is one, else the CPU; anything else must exist here."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for but no CUDA GPU is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {name!r} asked for but MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast trains
    1.4-1.9x faster than fp32; elsewhere bf16 is emulated, and slower. Read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def cpu_compiler() -> str | None:
    """Why torch.compile cannot build CPU kernels here, or None if it can: Inductor compiles each
    kernel with a C++ compiler into a Python extension, which needs Python's headers."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # Inductor's own search (CXX, g++, clang++)
    except ImportError as e:
        return f"this torch has no Inductor C++ backend ({e})"
    try:
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - InvalidCxxCompiler, and whatever a newer torch raises instead
        return " ".join(str(e).split())[:160] or type(e).__name__
    include = sysconfig.get_path("include")
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return f"no Python.h in {include} (install Python's development headers, e.g. python3-dev)"
    return None


def compiled(fn: Callable[..., Any], device: torch.device, *, what: str, warn: bool = True,
             **options: Any) -> Callable[..., Any]:
    """torch.compile(fn, **options); on a CPU where Inductor cannot build kernels (cpu_compiler), `fn`
    itself, after a warning (unless not `warn`) that `what` runs eagerly, instead of a traceback at
    the first call."""
    if device.type == "cpu" and (why := cpu_compiler()) is not None:
        if warn:
            warnings.warn(f"gpt2lab: --compile cannot build CPU kernels here ({why}); {what} runs eagerly",
                          stacklevel=3)
        return fn
    return torch.compile(fn, **options)
