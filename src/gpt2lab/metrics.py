"""What a training run reports about itself: its metrics, its provenance, its plot, and its MFU.

    RunLog               rank 0's progress bar, metrics.jsonl lines and optional TensorBoard scalars
    Window               losses, tokens and time since the last metrics line (averages, tokens/s)
    write_provenance()   a line of provenance.jsonl: who ran what, where (git, configs, versions, device)
    plot_metrics()       loss.png, drawn from metrics.jsonl
    flops_per_token(), peak_flops()   the two halves of model FLOPs utilisation

The training loop (train.py) hands these plain values; nothing here knows the loop.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import files
from .config import GPTConfig
from .errors import Stopped, TrainingError
from .model import GPT
from .rundir import METRICS

if TYPE_CHECKING:  # the loop imports this module, not the other way round
    from .train import FitResult

# -- MFU ---------------------------------------------------------------------------------------


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12·L·H·Q·T for attention (PaLM, appendix B).

    N counts every weight that multiplies an activation, so the tied output head is in it and
    the position table (a lookup) is not. Attention is counted as if not causal, as in PaLM.
    """
    n = cfg.num_params() - cfg.n_ctx * cfg.n_embd
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, FLOP/s: (bf16, fp32).
# More specific names first: "H100 PCIe" must match before "H100".
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),  # SXM
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "A10G": (70e12, 31.2e12),
    "4090": (165e12, 82.6e12),
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s of one device for MFU, and where the figure comes from.

    GPUs: the data-sheet dense peak for `dtype`. CPUs have no reliable data sheet for a share of
    a virtual machine, so the peak is measured: the best of a few 1024^3 matmuls with this
    process's threads. MFU on CPU is therefore relative to what the CPU's own GEMM achieves.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in GPU_PEAKS.items():
            if key in name:
                return (bf16 if dtype == torch.bfloat16 else fp32), f"data sheet ({key})"
        return float("nan"), f"unknown GPU {name!r}: pass --peak-tflops"
    if device.type == "cpu":
        return _measured_cpu_peak(dtype, torch.get_num_threads()), "measured 1024^3 matmul"
    return float("nan"), f"no peak known for {device.type}: pass --peak-tflops"


_CPU_PEAKS: dict[tuple[torch.dtype, int], float] = {}


def _measured_cpu_peak(dtype: torch.dtype, threads: int) -> float:
    if (dtype, threads) not in _CPU_PEAKS:
        n = 1024
        # Constant operands: drawing random ones would move the global RNG, and with it dropout.
        a, b = torch.full((n, n), 0.5, dtype=dtype), torch.full((n, n), 0.25, dtype=dtype)
        a @ b  # warm up the kernels and caches
        best = math.inf
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        _CPU_PEAKS[dtype, threads] = 2 * n**3 / best
    return _CPU_PEAKS[dtype, threads]


# -- the metrics log ---------------------------------------------------------------------------


class RunLog:
    """Rank 0's outputs: the progress bar, metrics.jsonl, optional TensorBoard; no-ops elsewhere."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, start: int, total: int) -> None:
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.path = run_dir / METRICS
        self.bar = tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise TrainingError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard (or drop the flag)"
                ) from e
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start)

    def row(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        files.append_line(self.path, json.dumps(row))
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, row["step"])
        shown = {k: row[k] for k in ("train_loss", "val_loss", "val_bpb") if k in row}
        if shown:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)

    def info(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


class Window:
    """Losses, tokens and time since the last metrics line, for averages and throughput."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens

    def tokens_per_s(self) -> float:
        seconds = time.perf_counter() - self.t0
        return self.tokens / seconds if seconds > 0 else float("nan")

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


# -- provenance and the plot -------------------------------------------------------------------


def write_provenance(run_dir: Path, config: Mapping[str, Any], model: GPT, device: torch.device, world_size: int,
                     **details: Any) -> None:
    """Append to RUN_DIR/provenance.jsonl who ran what, where: the time, git state, the run's config
    (its fields), the model's, library versions and the device, then the caller's `details`."""
    import gpt2lab

    src = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    dirty = git("status", "--porcelain", "--untracked-files=no")
    record = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "git": {"sha": git("rev-parse", "HEAD"), "dirty": bool(dirty) if dirty is not None else None},
        "train_config": dict(config),
        "model_config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "gpt2lab": gpt2lab.__version__},
        "device": {"type": device.type,
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                   or platform.machine(),
                   "world_size": world_size, "threads": torch.get_num_threads(),
                   "cpus": len(os.sched_getaffinity(0))},
        "flops_per_token_formula": "6N + 12*L*H*Q*T (PaLM appendix B; N excludes the position table)",
    }
    files.append_line(run_dir / "provenance.jsonl", json.dumps(record | details, default=str))


def plot_metrics(run_dir: str | Path) -> Path:
    """Draw RUN_DIR/loss.png from metrics.jsonl: losses against steps, held-out quality against time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    rows = [r for r in files.read_jsonl(run_dir / METRICS, TrainingError) if isinstance(r, dict)]

    def series(key: str, x: str = "step") -> tuple[list[float], list[float]]:
        pts = [(r[x], r[key]) for r in rows if key in r and x in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(*series("train_loss"), label="train", lw=1)
    ax1.plot(*series("val_loss"), "o-", label="validation", ms=3)
    ax1.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    key = "val_bpb" if any("val_bpb" in r for r in rows) else "val_loss"
    t, v = series(key, "elapsed_s")
    ax2.plot([s / 60 for s in t], v, "o-", ms=3, color="C1")
    ax2.set(xlabel="wall-clock (minutes)", title="Held-out quality against time",
            ylabel="validation bits per byte" if key == "val_bpb" else "validation loss (nats/token)")
    ax2.grid(alpha=0.3)
    return files.atomic_write(run_dir / "loss.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def raise_if_stopped(result: FitResult, report: str) -> None:
    """Raise Stopped for a run that a signal stopped (it saved first): the CLI exits 128 + signal."""
    if result.signal is not None:
        where = f"saved {result.checkpoint}; continue with --resume" if result.checkpoint else "nothing to save yet"
        raise Stopped(f"stopped by {signal.Signals(result.signal).name} at step {result.step} ({where})",
                      report=report, signum=result.signal)


def summary(result: FitResult, run_dir: str | Path) -> str:
    """A few lines saying how a run ended and where its outputs are."""
    lines = [f"stopped at step {result.step} ({result.stop_reason.replace('_', ' ')}) "
             f"after {result.elapsed_s / 60:.1f} min"]
    if result.val_loss is not None:
        bpb = f" = {result.val_bpb:.4f} bits/byte" if result.val_bpb is not None else ""
        lines.append(f"validation loss {result.val_loss:.4f} nats/token{bpb}")
    if result.best_step is not None:
        lines.append(f"best validation loss {result.best_val_loss:.4f} at step {result.best_step}")
    if result.checkpoint is not None:
        lines.append(f"checkpoint: {result.checkpoint}")
    lines.append(f"metrics: {Path(run_dir) / METRICS}; plot: {Path(run_dir) / 'loss.png'}")
    return "\n".join(lines)
