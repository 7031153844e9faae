"""glibc's malloc, set up for a process that allocates and frees the same large tensors every step.

By default glibc serves every allocation over its mmap threshold (128 KiB, rising to 32 MiB at
most) with a fresh mmap and returns it with munmap on free, and trims the heap's top whenever
128 KiB lie free there. A training step frees and reallocates its activations, gradients and head
chunks, tens to hundreds of MB each, so the kernel unmaps them and faults them back in, zeroed,
on the next step: on the 2-core machine this project is measured on, a third of the demo's CPU
time went to the kernel, and the same training step runs 1.35x faster once freed memory stays
mapped (benchmarks/train/throughput.py).

`tune()` keeps it mapped: no mmap below 2 GiB, no trimming below 2 GiB free, and the heap grown
1 GiB at a time (address space only: untouched pages cost nothing). The price is RSS: freed blocks
stay in the process for reuse, 10-25% above the live tensors at the peak. It is mallopt() through
ctypes rather than a caching allocator (jemalloc, tcmalloc) because those must be preloaded
before Python starts, which a pip-installed command cannot do for its user; mallopt applies to
every allocation after the call, torch's included. gpt2lab's commands call it at start-up.

Nothing changes where the user chose already (MALLOC_*_ variables or GLIBC_TUNABLES set), where
GPT2LAB_MALLOC=default, or on a libc other than glibc.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MOST = 2**31 - 1  # mallopt takes an int
SETTINGS = {M_MMAP_THRESHOLD: MOST, M_TRIM_THRESHOLD: MOST, M_TOP_PAD: 1 << 30}

_tuned = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, loaded once (platform.libc_ver() reads the Python binary: not for every call)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def user_chose() -> bool:
    """Whether the environment already sets glibc's malloc, or asks gpt2lab to leave it alone."""
    return (os.environ.get("GPT2LAB_MALLOC") == "default" or "GLIBC_TUNABLES" in os.environ
            or any(k.startswith("MALLOC_") for k in os.environ))


def tune() -> bool:
    """Apply SETTINGS to glibc's malloc, once; whether they are now in effect."""
    global _tuned
    if not _tuned and not user_chose() and (libc := _glibc()) is not None:
        _tuned = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS.items())
    return _tuned


def release() -> None:
    """Return the heap's free pages to the OS now (glibc's malloc_trim), e.g. after loading weights."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)
