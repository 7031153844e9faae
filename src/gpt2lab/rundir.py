"""A training run folder: its one writer, its checkpoints, their training state, and recovery
from what crashes leave.

    RUN/.gpt2lab.lock                 held (flock) by the one process writing the run
    RUN/checkpoints/step-NNNNNNNN/    complete checkpoints only: written under a temporary name
                                      and renamed in; deleted by renaming them away first
    RUN/best.json                     the best checkpoint, when the run keeps one
    RUN/metrics.jsonl ...             the loop's logs (metrics.py)

A checkpoint holds the model files (whatever the caller writes) and train_state.pt, written here:
the loop's progress counters, the run's config, the optimizer state and every RNG state, as
tensors and plain containers only (read back with weights_only=True), so that a resumed run on
CPU is bit-identical to one that was never stopped.

Opening a run takes the lock, cleans what killed processes left (temporary and half-deleted
checkpoint folders, incomplete `step-*` folders from older versions), repairs a torn last line of
metrics.jsonl, and, to resume, picks the newest checkpoint whose training state reads back,
falling back to an older one with a warning when the newest is corrupt.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from . import distributed, files, lora
from .checkpoint import WEIGHTS
from .errors import TrainingError

STATE_FILE = "train_state.pt"
METRICS = "metrics.jsonl"
BEST = "best.json"
_STEP = re.compile(r"^step-(\d{8})$")
# Config fields that a resumed run must share with the run it continues: they change what is computed.
RESUME_FIXED = ("model", "batch_size", "block_size", "seed", "dropout", "optimizer")
# What a run that predates a RESUME_FIXED field ran with.
RESUME_DEFAULTS = {"optimizer": "adamw"}
# A checkpoint's model files: a full model, or a LoRA adapter (lora.py's names).
_WEIGHTS = (WEIGHTS, lora.ADAPTER_WEIGHTS)


def _warn(message: str) -> None:
    print(f"gpt2lab: warning: {message}", file=sys.stderr)


# What a run folder holds: gpt2lab's names only (see RunDir._check_path).
_RUN_NAMES = re.compile(r"^(checkpoints|metrics(-\d{8}-\d{6})?\.jsonl|provenance\.jsonl|loss\.png|best\.json|"
                        r"tensorboard|" + "|".join(map(re.escape, files.RUN_SUBFOLDERS)) + r"|"
                        + re.escape(files.LOCK_FILE) + r"|\..+\.(tmp|old)-\d+.*)$")


def _run_name(name: str) -> bool:
    return _RUN_NAMES.match(name) is not None


def step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step-"))


def open_run(path: str | Path, *, resume: bool) -> RunDir:
    """Open a run folder on every rank: rank 0 locks and cleans it first, then the others read it."""
    world = distributed.world()
    run = RunDir.open(path, resume=resume) if world.is_main else None
    distributed.barrier()
    return run if run is not None else RunDir.open(path, resume=resume, writer=False)


class RunDir:
    """One training run's folder. `open` it, write checkpoints with `save`, `close` it at the end."""

    def __init__(self, path: str | Path) -> None:
        self.path = files.absolute(path)
        self.checkpoints = self.path / "checkpoints"
        self.resume_from: Path | None = None  # set by open(resume=True)
        self.state: TrainState | None = None  # that checkpoint's train_state.pt
        self._lock: files.FolderLock | None = None
        self._created = False  # the folder did not exist before open(): remove it if nothing is written

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, resume: bool, writer: bool = True) -> RunDir:
        """Open a run for a fresh start or a resume. The writer (rank 0) locks and cleans the folder;
        other ranks only read. Raises TrainingError, with one line, when that cannot be done."""
        run = cls(path)
        run._check_path()
        created = not run.path.exists()
        if writer:
            run._lock = files.FolderLock(run.path, what="--out").acquire()
            run._created = created
        try:
            if resume:
                run._pick_resume_checkpoint(writer)
            elif (ckpt := run.latest()) is not None:
                raise TrainingError(f"{run.path} already holds a run ({ckpt.name}); pass --resume to continue it "
                                    "or choose another --out")
            if writer:
                run._clean()
                run._prepare_metrics()
        except BaseException:
            run.close()
            raise
        return run

    def _check_path(self) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise TrainingError(f"--out {p} is a file; give a folder for the run (new, or one to --resume)")
        if any(q.exists() and not q.is_dir() for q in p.parents):
            raise TrainingError(f"--out {p} lies under a file; give a folder path")
        if (inside := files.enclosing_folder(p)) is not None:
            raise TrainingError(f"--out {p} lies inside the {inside[1]} {inside[0]}; give a folder outside it")
        if p.is_dir() and any(p.iterdir()):
            foreign = sorted(q.name for q in p.iterdir() if not _run_name(q.name))
            if foreign or not files.is_run_folder(p):
                names = foreign or sorted(q.name for q in p.iterdir())
                raise TrainingError(f"--out {p} holds files that are not a gpt2lab run ({', '.join(names[:3])}"
                                    f"{', ...' if len(names) > 3 else ''}); give a new or empty folder")

    def _clean(self) -> None:
        """Remove what killed runs left in checkpoints/. Under the lock, no other process writes
        there, so every temporary name is a leftover, whatever PID it carries. A step folder with
        no weights left is a half-deleted checkpoint (older versions deleted in place); one with
        weights but no training state may be the user's doing and is only reported."""
        if not self.checkpoints.is_dir():
            return
        files.clean_leftovers(self.checkpoints)
        for entry in sorted(self.checkpoints.iterdir()):
            if entry.name.startswith(".step-") and ".tmp-" in entry.name:
                shutil.rmtree(entry, ignore_errors=True)
                _warn(f"removed {entry}, a checkpoint that a killed run left half-written")
            elif _STEP.match(entry.name) and entry.is_dir() and not self.complete(entry):
                if any((entry / w).is_file() for w in _WEIGHTS):
                    _warn(f"{entry} has weights but no {STATE_FILE}: it is not resumable and is left as it is")
                else:
                    files.remove_dir(entry)
                    _warn(f"removed {entry}, an incomplete checkpoint that a killed run left behind")

    @staticmethod
    def complete(folder: Path) -> bool:
        """Whether a step folder holds a whole checkpoint: training state, config and weights."""
        return ((folder / STATE_FILE).is_file() and any((folder / w).is_file() for w in _WEIGHTS)
                and ((folder / "config.json").is_file() or (folder / lora.ADAPTER_CONFIG).is_file()))

    def steps(self) -> list[Path]:
        """The complete checkpoint folders, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if _STEP.match(p.name) and self.complete(p))

    def latest(self) -> Path | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def _pick_resume_checkpoint(self, writer: bool) -> None:
        steps = self.steps()
        if not steps:
            raise TrainingError(f"--resume: {self.path} has no complete checkpoint; drop --resume to start a new run")
        problems = []
        for ckpt in reversed(steps):
            try:
                self.state = _read_state(ckpt)
            except ValueError as e:
                problems.append((ckpt, str(e)))
                continue
            self.resume_from = ckpt
            break
        else:
            raise TrainingError(f"--resume: no checkpoint of {self.path} reads back ({problems[0][1]}; "
                                f"{len(problems)} checked); start a new run in another --out")
        for bad, why in problems:
            if writer:  # out of the way, never deleted: it no longer counts, nor is pruned for
                aside = bad.with_name(f"corrupt-{bad.name}")
                bad.rename(aside)
                why += f"; moved to {aside.name}"
            _warn(why)
        if problems:
            _warn(f"resuming from {self.resume_from.name}, the newest checkpoint that reads back")

    def _prepare_metrics(self) -> None:
        """Make metrics.jsonl agree with where the run starts: a torn last line is cut, lines past
        the resumed step are dropped (they will be logged again), and a fresh start sets aside the
        log of an earlier attempt that never saved."""
        metrics = self.path / METRICS
        if not metrics.is_file():
            return
        if self.resume_from is None:
            from datetime import datetime

            stamp = datetime.fromtimestamp(metrics.stat().st_mtime)
            metrics.rename(self.path / f"metrics-{stamp:%Y%m%d-%H%M%S}.jsonl")
            return
        step = step_of(self.resume_from)
        rows = files.read_jsonl(metrics, TrainingError, repair=True)
        kept = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step]
        if len(kept) != len(rows):
            files.atomic_write(metrics, "".join(json.dumps(r) + "\n" for r in kept))

    # -- writing ------------------------------------------------------------------------------

    def save(self, step: int, write: Callable[[Path], None], *, progress: Mapping[str, Any],
             config: Mapping[str, Any], optimizer: dict[str, Any], world_size: int,
             needed: int | None = None) -> Path:
        """Write checkpoints/step-NNNNNNNN atomically: `write` puts the model files into a temporary
        folder, and train_state.pt goes beside them with `progress` (the loop's counters), `config`
        (the run's fields), the optimizer state and every RNG state as it is now."""
        state = {
            "format": "gpt2lab-train", "version": 1,
            "progress": dict(progress),
            "data": {"step": step, "seed": config["seed"]},  # the loader's position: batches are a function of both
            "world_size": world_size,
            "config": dict(config),
            "optimizer": optimizer,
            "rng": _rng_state(),
        }
        path = self.checkpoints / f"step-{step:08d}"
        with files.atomic_dir(path, needed=needed) as tmp:
            write(tmp)
            torch.save(state, tmp / STATE_FILE)
        return path

    def mark_best(self, step: int, val_loss: float) -> None:
        files.write_json(self.path / BEST, {"step": step, "checkpoint": f"checkpoints/step-{step:08d}",
                                            "val_loss": val_loss})

    def prune(self, keep_last: int, keep_step: int = -1) -> None:
        """Keep the newest `keep_last` checkpoints (and step `keep_step`); each older one is renamed
        out of sight before it is deleted, so a kill mid-delete never leaves a step-* folder behind."""
        for old in self.steps()[:-keep_last]:
            if step_of(old) != keep_step:
                files.remove_dir(old)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
            if self._created and [p.name for p in self.path.iterdir()] == [files.LOCK_FILE]:
                (self.path / files.LOCK_FILE).unlink()  # a run that wrote nothing leaves no folder
                self.path.rmdir()


def _read_state(ckpt: Path) -> TrainState:
    """A checkpoint's training state, once it and the weights' header read back; else ValueError
    saying which file a crash or a disk damaged."""
    state = ckpt / STATE_FILE
    try:
        loaded = torch.load(state, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError or UnpicklingError for a damaged file
        raise ValueError(f"{state} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if not isinstance(loaded, dict) or not {"progress", "optimizer", "rng", "config"} <= set(loaded):
        raise ValueError(f"{state} is not a gpt2lab training state")
    progress = loaded["progress"]
    if not (isinstance(progress, dict) and isinstance(progress.get("step"), int) and progress["step"] >= 0
            and isinstance(loaded["config"], dict)):
        raise ValueError(f"{state} holds an invalid training state (step or config)")
    for name in _WEIGHTS:
        if (ckpt / name).is_file():
            try:
                with safe_open(str(ckpt / name), framework="pt") as f:
                    f.keys()
            except Exception as e:  # safetensors checks the header against the file's length
                raise ValueError(f"{ckpt / name} is unreadable ({' '.join(str(e).split())[:120]})") from None
    return TrainState(checkpoint=ckpt, progress=progress, config=loaded["config"], optimizer=loaded["optimizer"],
                      rng=loaded["rng"])


@dataclass(frozen=True, kw_only=True)
class TrainState:
    """A checkpoint's train_state.pt, as a resumed run needs it."""

    checkpoint: Path  # the step folder it was read from
    progress: dict[str, Any]  # the loop's counters, "step" among them
    config: dict[str, Any]  # the run's config fields
    optimizer: dict[str, Any]  # the optimizer's full (unsharded) state dict
    rng: dict[str, Any]  # every RNG state, as _rng_state() took it

    def check_resumable(self, config: Mapping[str, Any]) -> None:
        """Refuse to resume with a config whose RESUME_FIXED fields differ from the checkpoint's run."""
        for name in RESUME_FIXED:
            if (had := self.config.get(name, RESUME_DEFAULTS.get(name))) != config[name]:
                raise TrainingError(
                    f"{self.checkpoint} was trained with {name}={had!r} but this run asks for "
                    f"{config[name]!r}; resume with the same value or start a new --out folder"
                )

    def restore_rng(self) -> None:
        """Put every RNG back where it was when the checkpoint was written."""
        version, mt, gauss = self.rng["python"]
        random.setstate((version, tuple(mt), gauss))
        kind, keys, pos, has_gauss, gauss_np = self.rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
        torch.set_rng_state(self.rng["torch"])
        if "cuda" in self.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.rng["cuda"])


def _rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's and (once initialised) CUDA's RNG states, as tensors and plain lists."""
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


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's RNGs (torch's seeds every CUDA device too), for a fresh start."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
