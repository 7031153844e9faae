"""Training: one `fit()` loop for pretraining and fine-tuning, its checkpoints, logs and plot.

    fit(model, config, batches)      the loop: accumulation, AdamW, warmup + cosine, clipping,
                                     evaluation, checkpoints, resume, Ctrl-C, NaN stop, metrics
    train(data=..., out=..., config) `gpt2lab train`: a prepared token folder -> a run folder

What differs between pretraining and fine-tuning is a `Strategy` (the loss, how the model is
saved and loaded) and the batches fit() is given; the parameters that train are those with
`requires_grad`. A run folder holds

    provenance.jsonl     one line per start: git sha, resolved config, versions, device
    metrics.jsonl        one line per logged step: losses, lr, grad norm, tokens/s, MFU, time
    loss.png             the loss curves, redrawn at the end of every run
    best.json            the step with the lowest validation loss (with `keep_best`)
    checkpoints/step-NNNNNNNN/   model files (checkpoint.py's format) + train_state.pt

train_state.pt holds only tensors and plain containers (loaded with weights_only=True): the
optimizer state, the step (which is also the schedule and the data position: batches are a
function of the step), elapsed time, the early-stopping record and every RNG state, so that a
resumed run on CPU is bit-identical to one that was never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as datasets
from . import distributed, files
from .checkpoint import load_config, load_model, read_config_json, weights_bytes, write_model_files
from .config import PRESETS, GPTConfig, preset
from .device import resolve_device
from .errors import ConfigError, Stopped, TrainingError
from .model import GPT
from .rundir import METRICS, STATE_FILE, RunDir

# (inputs, targets) or (inputs, targets, loss mask); all (B, T). The mask is 1 where a target counts.
Batch = tuple[torch.Tensor, ...]


class Batches(Protocol):
    """Where training batches come from (data.Loader is one).

    get(step, index) must depend on nothing but its arguments (and the loader's seed): `index`
    is the global micro-batch index, rank * grad_accum + micro_step, so any world size reads the
    same global batch at a step, and a resumed run reads what the uninterrupted run would have.
    """

    def get(self, step: int, index: int = 0) -> Batch: ...


class EvalBatches(Protocol):
    def eval_batches(self, n: int) -> Iterable[Batch]: ...


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that shapes a training run. Every field is also a `gpt2lab train` option."""

    model: str = "gpt2-mini"
    """Model preset (gpt2, gpt2-medium, ..., gpt2-mini) or a config.json; the vocabulary comes from the data."""
    dropout: float = 0.0
    """Dropout probability while training (presets only)."""
    batch_size: int = 32
    """Sequences per optimizer step, over all processes."""
    micro_batch: int = 0
    """Sequences per forward pass in each process (0: batch_size / processes); the rest is accumulation."""
    block_size: int = 0
    """Tokens per training sequence (0: the model's context length)."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint) after this much wall-clock time; 0 for no limit."""
    lr: float = 6e-4
    """Peak learning rate, reached after warmup."""
    min_lr: float = 6e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr."""
    decay_steps: int = 0
    """Step at which the cosine reaches min_lr (0: max_steps; with max_minutes, the end of the time budget)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to 2-D weights only (not biases or LayerNorm parameters)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    seed: int = 0
    """Seed of the model init, the data order and dropout."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU; bf16: bf16 autocast on any device."""
    compile: bool = False
    """Compile the model with torch.compile."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (a GPU when there is one; torchrun ranks take their local GPU)."""
    fsdp: bool = False
    """Under torchrun, shard parameters, gradients and optimizer state with FSDP2 instead of DDP."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    eval_interval: int = 100
    """Evaluate on the validation split every N steps, at the start and at the end (0: only at the end)."""
    eval_batches: int = 20
    """Validation batches per evaluation."""
    log_interval: int = 10
    """Write a metrics line every N steps."""
    ckpt_interval: int = 500
    """Save a checkpoint every N steps (and always at the end)."""
    keep_last: int = 3
    """Checkpoints to keep (the best one, with keep_best, is kept besides)."""
    keep_best: bool = False
    """Save a checkpoint whenever the validation loss improves, keep it, and name it in best.json."""
    patience: int = 0
    """Stop after this many evaluations without a better validation loss (0: never)."""
    tensorboard: bool = False
    """Also write TensorBoard logs to RUN_DIR/tensorboard (needs the tensorboard package)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device for MFU (0: a data-sheet table for GPUs, a measured matmul on CPU)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # nan and inf pass every comparison below unnoticed
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        if not self.eps > 0:
            raise ConfigError(f"eps must be positive, got {self.eps}")
        positive = ("batch_size", "max_steps", "log_interval", "ckpt_interval", "keep_last", "eval_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("micro_batch", "block_size", "warmup_steps", "decay_steps", "eval_interval", "patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or positive, got {getattr(self, name)}")
        for name in ("max_minutes", "weight_decay", "grad_clip", "peak_tflops", "min_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"AdamW betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.patience and not self.eval_interval:
            raise ConfigError("patience needs periodic evaluation: set eval_interval too")
        if self.micro_batch and self.batch_size % self.micro_batch:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch ({self.micro_batch})")

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(micro_batch, gradient accumulation steps) for `world_size` processes."""
        micro = self.micro_batch or self.batch_size // world_size
        if micro == 0 or self.batch_size % (micro * world_size):
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch ({micro or '?'}) "
                f"x processes ({world_size}); change --batch-size or --micro-batch"
            )
        return micro, self.batch_size // (micro * world_size)


# -- the pieces of a step ----------------------------------------------------------------------


def lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy in nats; with a loss mask, over the positions it keeps only.

    logits (B, T, V) come from the inputs batch[0]; batch[1] holds the targets (B, T) and an
    optional batch[2] (B, T) is 1 where a target counts (fine-tuning masks the prompt tokens).
    """
    targets = batch[1]
    if len(batch) < 3:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    mask = batch[2].flatten().to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def learning_rate(step: int, *, lr: float, min_lr: float, warmup: int, horizon: int,
                  spent: float | None = None) -> float:
    """Linear warmup to `lr` over `warmup` steps, then a cosine down to `min_lr`.

    The cosine follows the steps and reaches min_lr at step `horizon`; or, under a time budget,
    follows `spent`, the share of the budget used so far (0 to 1), so that it ends when the time
    does, however fast or unevenly the steps go.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    done = spent if spent is not None else (step - warmup) / max(1, horizon - warmup)
    if done >= 1:
        return min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * done)) * (lr - min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and embeddings, none on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no parameters with requires_grad=True: nothing would train")
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


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


# -- strategy hooks ----------------------------------------------------------------------------


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load a checkpoint folder's weights into `model` (the default Strategy.load)."""
    model.load_state_dict(load_model(folder).state_dict())


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """What pretraining and fine-tuning do differently inside the same fit() loop.

    loss:        (logits, batch) -> scalar loss; lm_loss honours a loss mask in batch[2]
    save:        (model, folder, tokenizer) writes the model into a checkpoint folder
                 (LoRA writes its adapter and a reference to the base here)
    load:        (model, folder) restores what `save` wrote, for --resume
    extra_files: file name -> text, written into every checkpoint (e.g. a prompt template)
    """

    loss: Callable[[torch.Tensor, Batch], torch.Tensor] = lm_loss
    save: Callable[[nn.Module, Path, Any], None] = write_model_files
    load: Callable[[nn.Module, Path], None] = load_weights
    extra_files: Mapping[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class FitResult:
    """How a fit() call ended."""

    step: int
    stop_reason: Literal["max_steps", "max_minutes", "interrupted", "early_stopping"]
    checkpoint: Path | None
    train_loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    elapsed_s: float = 0.0
    signal: int | None = None  # the signal that stopped an interrupted run (SIGINT, SIGTERM)


# -- run state ---------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Progress:
    """The loop's counters that a checkpoint must carry besides the model and optimizer."""

    step: int = 0
    tokens: int = 0  # training tokens seen, over all ranks
    elapsed: float = 0.0  # wall-clock seconds of training so far, over all resumes
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0  # evaluations in a row without a better validation loss


def _rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Fields that a resumed run must share with the run it continues: they change what is computed.
_RESUME_FIXED = ("model", "batch_size", "block_size", "seed", "dropout")


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, ckpt: Path) -> None:
    for name in _RESUME_FIXED:
        if saved.get(name) != getattr(cfg, name):
            raise TrainingError(
                f"{ckpt} was trained with {name}={saved.get(name)!r} but this run asks for "
                f"{getattr(cfg, name)!r}; resume with the same value or start a new --out folder"
            )


# -- logging -----------------------------------------------------------------------------------


class _RunLog:
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


def provenance(cfg: TrainConfig, model: GPT, device: torch.device, world_size: int) -> dict[str, Any]:
    """Who ran what, where: git state, resolved configs, library versions and the device."""
    import gpt2lab

    src = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "git": {"sha": git("rev-parse", "HEAD"), "dirty": bool(dirty) if dirty is not None else None},
        "train_config": dataclasses.asdict(cfg),
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
    }


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


# -- signals -----------------------------------------------------------------------------------


class _StopRequest:
    """The first Ctrl-C (or SIGTERM) asks the loop to save and stop after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: the user does not want to wait
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
              "(press Ctrl-C again to quit without saving)", file=sys.stderr)

    @contextmanager
    def installed(self) -> Iterator[_StopRequest]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only; a worker thread trains uninterruptibly
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


# -- the loop ----------------------------------------------------------------------------------


def fit(
    model: GPT,
    config: TrainConfig,
    batches: Batches,
    *,
    run_dir: str | Path | RunDir,
    val: EvalBatches | None = None,
    tokenizer: Any = None,
    strategy: Strategy | None = None,
    resume: bool = False,
    bytes_per_token: float | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train `model` in place for config.max_steps optimizer steps; save checkpoints into run_dir.

    batches:         training batches, batches.get(step, index) (see Batches)
    val:             validation batches, val.eval_batches(n), or None for no evaluation
    tokenizer:       saved into every checkpoint (anything with .save(folder))
    strategy:        the loss and save/load hooks (default: plain language modelling)
    run_dir:         the run folder, or a RunDir already opened for this run (the caller closes it)
    resume:          continue from run_dir's newest checkpoint (model, optimizer, step, RNG)
    bytes_per_token: validation bytes per token, to report validation loss in bits per byte
    on_step:         called after every optimizer step on every rank, with (step, metrics)
    """
    if isinstance(run_dir, RunDir):
        return _fit(model, config, batches, run_dir, val=val, tokenizer=tokenizer, strategy=strategy,
                    bytes_per_token=bytes_per_token, on_step=on_step)
    run = open_run(run_dir, resume=resume)
    try:
        return _fit(model, config, batches, run, val=val, tokenizer=tokenizer, strategy=strategy,
                    bytes_per_token=bytes_per_token, on_step=on_step)
    finally:
        run.close()


def open_run(path: str | Path, *, resume: bool) -> RunDir:
    """Open a run folder on every rank: rank 0 locks and cleans it first, then the others read it."""
    world = distributed.world()
    run = RunDir.open(path, resume=resume) if world.is_main else None
    distributed.barrier()
    return run if run is not None else RunDir.open(path, resume=resume, writer=False)


def _fit(model: GPT, config: TrainConfig, batches: Batches, run: RunDir, *, val: EvalBatches | None,
         tokenizer: Any, strategy: Strategy | None, bytes_per_token: float | None,
         on_step: Callable[[int, dict[str, float]], None] | None) -> FitResult:
    cfg, strategy = config, strategy or Strategy()
    world = distributed.world()
    device = resolve_device(cfg.device)
    _, accum = cfg.accumulation(world.size)
    run_dir = run.path
    progress = _Progress()
    ckpt = run.resume_from
    model.to(device).train()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    saved: dict[str, Any] | None = None
    if ckpt is not None:
        saved = run.state
        _check_resumable(saved["config"], cfg, ckpt)
        known = {f.name for f in dataclasses.fields(_Progress)}
        progress = _Progress(**{k: v for k, v in saved["progress"].items() if k in known})
        # Weights go into the plain model before any wrapper, so every rank starts identical.
        strategy.load(model, ckpt)
    wrapped = distributed.wrap(model, fsdp=cfg.fsdp, device=device)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    if saved is not None:
        distributed.load_optimizer_state(model, optimizer, saved["optimizer"])
        _set_rng_state(saved["rng"])
    else:
        # Dropout differs per rank (as it would per micro-batch in one process); the data does not.
        _seed_everything(cfg.seed + world.rank)

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    peak, peak_source = (cfg.peak_tflops * 1e12, "--peak-tflops") if cfg.peak_tflops else peak_flops(
        device, torch.bfloat16 if bf16 else torch.float32)
    if world.is_main:
        record = provenance(cfg, model, device, world.size) | {
            "event": "resume" if ckpt else "start", "step": progress.step, "checkpoint": str(ckpt) if ckpt else None,
            "precision": "bf16 autocast" if bf16 else "fp32", "grad_accum": accum,
            "peak_flops_per_device": peak, "peak_flops_source": peak_source,
            "flops_per_token_formula": "6N + 12*L*H*Q*T (PaLM appendix B; N excludes the position table)",
        }
        files.append_line(run_dir / "provenance.jsonl", json.dumps(record, default=str))

    runlog = _RunLog(run_dir, enabled=world.is_main, tensorboard=cfg.tensorboard,
                     start=progress.step, total=cfg.max_steps)
    if ckpt is not None:
        runlog.info(f"resuming {run_dir} from {ckpt.name}")

    stop = _StopRequest()
    n_eval = cfg.eval_batches
    if val is not None and (most := getattr(val, "max_eval_batches", None)) is not None and n_eval > most:
        runlog.info(f"--eval-batches {n_eval}: the validation split holds {most} batch(es) of distinct windows; "
                    f"evaluating on {most}")
        n_eval = most

    def evaluate() -> tuple[float, float | None] | None:
        """(loss, bits per byte), or None when a stop request cut the evaluation short."""
        loss = _evaluate(wrapped, val, n_eval, strategy.loss, device, amp, stop)
        distributed.reshard(model)
        if loss is None:
            return None
        return loss, (loss / math.log(2) / bytes_per_token if bytes_per_token else None)

    def save(step: int) -> Path | None:
        path = _save_checkpoint(run, step, model, optimizer, strategy, tokenizer, cfg, progress)
        if path is not None:
            runlog.info(f"saved {path}")
        return path

    result = FitResult(step=progress.step, stop_reason="max_steps", checkpoint=ckpt)
    start = time.perf_counter() - progress.elapsed
    budget = cfg.max_minutes * 60 if cfg.max_minutes and not cfg.decay_steps else 0.0  # a cosine over time
    window = _Window()
    try:
        with stop.installed():
            halted = False  # agreed by all ranks: a stop request came during the first evaluation
            if ckpt is None and val is not None and cfg.eval_interval:
                if (first := evaluate()) is None:
                    halted, result.stop_reason = True, "interrupted"
                else:
                    result.val_loss, result.val_bpb = first
                    runlog.row({"step": 0, "elapsed_s": 0.0, "val_loss": result.val_loss}
                               | ({"val_bpb": result.val_bpb} if result.val_bpb is not None else {}))
            window.restart()
            while progress.step < cfg.max_steps and not halted:
                step = progress.step
                spent = min(1.0, progress.elapsed / budget) if budget else None
                lr = learning_rate(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps,
                                   horizon=cfg.decay_steps or cfg.max_steps, spent=spent)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, tokens, seq_len = _accumulate_gradients(
                    wrapped, batches, step, rank=world.rank, accum=accum, device=device, amp=amp,
                    loss_fn=strategy.loss)
                norm = nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or math.inf)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                now = time.perf_counter() - start
                time_up = cfg.max_minutes > 0 and now >= cfg.max_minutes * 60
                # One all-reduce a step: the global loss, whether any rank must stop, and the time, which
                # ranks must agree on when it sets the learning rate.
                flags = torch.tensor([float(stop.requested), float(time_up), now], device=device)
                shared = distributed.all_reduce_sum(torch.cat([loss_sum.float().reshape(1), flags]))
                train_loss, grad_norm = shared[0].item() / world.size, norm.item()
                if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
                    last = run.latest()
                    raise TrainingError(
                        f"training diverged at step {step + 1}: loss {train_loss}, gradient norm {grad_norm}; "
                        f"nothing was saved after {last or 'the start'}. Lower --lr or raise --warmup-steps, "
                        "then --resume"
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step = step = step + 1
                progress.tokens += tokens * world.size
                progress.elapsed = shared[3].item() / world.size
                window.add(train_loss, tokens * world.size)
                runlog.bar.update(1)
                stopping = None
                if shared[1].item() > 0:
                    stopping = "interrupted"
                elif shared[2].item() > 0:
                    stopping = "max_minutes"

                row: dict[str, Any] = {}
                last_step = step >= cfg.max_steps or stopping is not None
                if step % cfg.log_interval == 0 or last_step:
                    seconds = window.seconds()
                    tok_s = window.tokens / seconds if seconds > 0 else float("nan")
                    row = {"step": step, "elapsed_s": round(progress.elapsed, 3), "lr": lr,
                           "train_loss": window.mean_loss(), "grad_norm": grad_norm, "tokens_per_s": tok_s,
                           "mfu": tok_s * flops_per_token(model.config, seq_len) / (peak * world.size),
                           "tokens": progress.tokens}
                    window.restart()
                    if budget and progress.elapsed > 0:  # the bar counts towards where the time will run out
                        runlog.bar.total = max(step, round(step * budget / progress.elapsed))
                improved = False
                if val is not None and ((cfg.eval_interval and step % cfg.eval_interval == 0) or last_step):
                    evaluated = evaluate()
                    if evaluated is None:  # stopped mid-evaluation: save and stop, logging no partial loss
                        stopping, last_step = "interrupted", True
                    else:
                        result.val_loss, result.val_bpb = evaluated
                        row = row or {"step": step, "elapsed_s": round(progress.elapsed, 3)}
                        row["val_loss"] = result.val_loss
                        if result.val_bpb is not None:
                            row["val_bpb"] = result.val_bpb
                        improved = result.val_loss < progress.best_val
                        if improved:
                            progress.best_val, progress.best_step, progress.bad_evals = result.val_loss, step, 0
                        else:
                            progress.bad_evals += 1
                        if cfg.patience and progress.bad_evals >= cfg.patience and stopping is None:
                            stopping = "early_stopping"
                            last_step = True
                    window.restart()  # evaluation time is not training throughput
                if row:
                    runlog.row(row)
                result.train_loss = train_loss
                if step % cfg.ckpt_interval == 0 or last_step or (cfg.keep_best and improved):
                    result.checkpoint = save(step)
                    window.restart()
                if on_step is not None:
                    on_step(step, {"train_loss": train_loss, "lr": lr, "grad_norm": grad_norm})
                if stopping is not None:
                    result.stop_reason = stopping
                    break
    finally:
        runlog.close()
    result.step, result.elapsed_s = progress.step, progress.elapsed
    if result.stop_reason == "interrupted":
        result.signal = stop.signum or signal.SIGINT  # a rank that got no signal of its own stopped with rank 0
    if progress.best_step >= 0:
        result.best_step, result.best_val_loss = progress.best_step, progress.best_val
    if world.is_main and (run_dir / METRICS).is_file():
        plot_metrics(run_dir)
    return result


def _accumulate_gradients(model: nn.Module, batches: Batches, step: int, *, rank: int, accum: int,
                          device: torch.device, amp: Any, loss_fn: Callable[..., torch.Tensor],
                          ) -> tuple[torch.Tensor, int, int]:
    """Forward and backward over this rank's micro-batches of `step`, syncing gradients on the last.

    Returns the mean loss over the micro-batches (a tensor: no device sync), the tokens seen and the
    sequence length. Each micro-batch's loss is divided by `accum` so the summed gradients are a mean.
    """
    loss_sum = torch.zeros((), device=device)
    tokens = seq_len = 0
    for micro in range(accum):
        batch = tuple(t.to(device, non_blocking=True) for t in batches.get(step, rank * accum + micro))
        with distributed.grad_sync(model, micro == accum - 1):
            with amp:
                loss = loss_fn(model(batch[0]), batch) / accum
            loss.backward()
        loss_sum += loss.detach()
        tokens, seq_len = tokens + batch[0].numel(), batch[0].shape[1]
    return loss_sum, tokens, seq_len


class _Window:
    """Losses, tokens and time since the last metrics line, for averages and throughput."""

    def restart(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


@torch.no_grad()
def _evaluate(model: nn.Module, val: EvalBatches, n: int, loss_fn: Callable[..., torch.Tensor],
              device: torch.device, amp: Any, stop: _StopRequest | None = None) -> float | None:
    """Mean loss over the fixed validation batches; ranks share them out and average.
    None when a stop request (on any rank) arrives before the evaluation ends."""
    world = distributed.world()
    n = -(-n // world.size) * world.size  # every rank runs as many forwards (FSDP needs lockstep)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device)
    try:
        for i, batch in enumerate(val.eval_batches(n)):
            # Once a round of world.size batches (a rank forwards one of them): the check's all-reduce
            # must not fall between the collectives of two ranks' FSDP forwards.
            if stop is not None and i % world.size == 0 and _any_rank(stop.requested, device):
                return None
            if i % world.size == world.rank:
                batch = tuple(t.to(device) for t in batch)
                with amp:
                    total[0] += loss_fn(model(batch[0]), batch).float()
                total[1] += 1
    finally:
        model.train(was_training)
    total = distributed.all_reduce_sum(total)
    if total[1].item() == 0:
        raise TrainingError("the validation set yielded no batches; prepare more data or pass no validation")
    return (total[0] / total[1]).item()


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on any rank (one small all-reduce when distributed)."""
    if not distributed.world().distributed:
        return flag
    return distributed.all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


def _save_checkpoint(run: RunDir, step: int, model: GPT, optimizer: torch.optim.Optimizer,
                     strategy: Strategy, tokenizer: Any, cfg: TrainConfig, progress: _Progress) -> Path | None:
    """Write checkpoints/step-NNNNNNNN atomically (rank 0), then prune to the last K (and the best)."""
    world = distributed.world()
    # Collectives first: under FSDP every rank helps gather the full state for rank 0.
    optim_state = distributed.optimizer_state(model, optimizer)
    to_save: nn.Module = model
    if distributed.is_sharded(model):
        full = distributed.full_model_state(model)
        if world.is_main:
            with torch.device("meta"):
                to_save = GPT(model.config)
            to_save.load_state_dict(full, assign=True)
            to_save.tie_weights()
    path = None
    if world.is_main:
        path = _write_checkpoint(run, step, to_save, optim_state, strategy, tokenizer, cfg, progress)
    distributed.barrier()  # no rank goes on (to a resume, say) before the checkpoint is complete
    return path


def _write_checkpoint(run: RunDir, step: int, model: nn.Module, optim_state: dict[str, Any], strategy: Strategy,
                      tokenizer: Any, cfg: TrainConfig, progress: _Progress) -> Path:
    """The checkpoint folder itself: model files (through the strategy), extra files, train_state.pt."""
    state = {
        "format": "gpt2lab-train", "version": 1,
        "progress": dataclasses.asdict(progress),
        "data": {"step": step, "seed": cfg.seed},  # the loader's position: batches are a function of both
        "world_size": distributed.world().size,
        "config": dataclasses.asdict(cfg),
        "optimizer": optim_state,
        "rng": _rng_state(),
    }

    def write(tmp: Path) -> None:
        strategy.save(model, tmp, tokenizer)
        for name, text in strategy.extra_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        torch.save(state, tmp / STATE_FILE)

    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    path = run.save(step, write, needed=weights_bytes(model) + 2 * trainable)  # + AdamW's two moments
    if cfg.keep_best and progress.best_step == step:
        run.mark_best(step, progress.best_val)
    run.prune(cfg.keep_last, progress.best_step if cfg.keep_best else -1)
    return path


# -- `gpt2lab train` ---------------------------------------------------------------------------


def model_config(spec: str, *, vocab_size: int, dropout: float = 0.0) -> GPTConfig:
    """The architecture `--model` names: a preset (given the data's vocabulary) or a config.json.

    A config.json may be a bare dict of GPTConfig fields, a gpt2lab or an HF config.json, or a
    checkpoint folder; only its shape is used (the weights start from GPT-2's init).
    """
    if spec in PRESETS:
        return preset(spec, vocab_size=vocab_size, dropout=dropout)
    path = Path(spec)
    if not path.exists():
        raise TrainingError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing config.json")
    if path.is_dir():
        cfg = load_config(path)
    else:
        meta = read_config_json(path)
        try:
            if meta.get("format") == "gpt2lab":
                cfg = GPTConfig.from_dict(meta["model"])
            elif "model_type" in meta:
                cfg = GPTConfig.from_hf(meta)
            else:
                cfg = GPTConfig.from_dict(meta)
        except (KeyError, TypeError, ValueError) as e:
            raise TrainingError(f"{path}: not a usable model config ({e})") from e
    if cfg.vocab_size < vocab_size:
        raise TrainingError(f"{spec} has vocab_size {cfg.vocab_size} but the data's tokenizer has {vocab_size} ids; "
                            "raise vocab_size in the config")
    return dataclasses.replace(cfg, dropout=dropout)


def train(*, data: str, out: str, config: TrainConfig | None = None, resume: bool = False) -> str | None:
    """Train a GPT-2 from scratch on a prepared data folder (under torchrun: DDP, or FSDP2 with --fsdp).

    data:   a folder written by `gpt2lab prepare SOURCE --out DATA_DIR`
    out:    the run folder: checkpoints/, metrics.jsonl, loss.png, provenance.jsonl
    resume: continue the run in --out from its newest checkpoint
    """
    result = pretrain(data, out, config or TrainConfig(), resume=resume)
    report = summary(result, out) if int(os.environ.get("RANK", "0")) == 0 else ""  # rank 0 reports
    raise_if_stopped(result, report)
    return report or None


def raise_if_stopped(result: FitResult, report: str) -> None:
    """Raise Stopped for a run that a signal stopped (it saved first): the CLI exits 128 + signal."""
    if result.signal is not None:
        where = f"saved {result.checkpoint}; continue with --resume" if result.checkpoint else "nothing to save yet"
        raise Stopped(f"stopped by {signal.Signals(result.signal).name} at step {result.step} ({where})",
                      report=report, signum=result.signal)


def pretrain(data: str | Path, out: str | Path, cfg: TrainConfig, *, resume: bool = False) -> FitResult:
    """`train` as a function returning the FitResult: joins torchrun's process group, builds
    the model and the loaders from the data folder, and runs fit()."""
    joined = not distributed.world().distributed  # a group we join here is ours to leave
    world = distributed.init_from_env(resolve_device(cfg.device).type)
    try:
        run = open_run(out, resume=resume)  # first: a busy, wrong or finished --out fails before any work
        try:
            tokenizer = datasets.load_tokenizer(data)
            manifest = datasets.read_manifest(data)
            if run.resume_from is not None:
                model_cfg = load_config(run.resume_from)  # the run's own architecture; fit() checks the rest
            else:
                model_cfg = model_config(cfg.model, vocab_size=tokenizer.vocab_size, dropout=cfg.dropout)
            block = cfg.block_size or model_cfg.n_ctx
            if block > model_cfg.n_ctx:
                raise TrainingError(f"block_size {block} exceeds the model's context of {model_cfg.n_ctx}")
            micro, _ = cfg.accumulation(world.size)
            loaders = {split: datasets.Loader(data, split, batch_size=micro, block_size=block, seed=cfg.seed)
                       for split in ("train", "val")}
            torch.manual_seed(cfg.seed)
            model = GPT(model_cfg)
            return fit(model, cfg, loaders["train"], val=loaders["val"], run_dir=run, tokenizer=tokenizer,
                       bytes_per_token=val_bytes_per_token(manifest))
        finally:
            run.close()
    finally:
        if joined:
            distributed.shutdown()


def val_bytes_per_token(manifest: dict[str, Any]) -> float | None:
    """UTF-8 bytes per token of the validation split, from a data manifest (None if it does not say)."""
    return manifest.get("splits", {}).get("val", {}).get("bytes_per_token")


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
