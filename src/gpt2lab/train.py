"""Training: one `fit()` loop for pretraining and fine-tuning, and `pretrain` on a data folder.

    fit(model, config, batches)      the loop: accumulation, the optimizer (optim.py), warmup +
                                     cosine, clipping, evaluation, checkpoints, resume, Ctrl-C,
                                     NaN stop, metrics
    pretrain(data, out, config)      a prepared token folder -> a run folder (`gpt2lab train`,
                                     whose command is gpt2lab.commands.train)

Pretraining and fine-tuning differ in their batches and a `Strategy` (the loss, how the model is
saved and loaded); the parameters that train are those with `requires_grad`. The loop owns none
of its files: config.TrainConfig shapes a run; rundir.RunDir keeps the run folder, checkpoints
and their training state (batches are a function of the step, so a resumed run on CPU is
bit-identical to one never stopped); metrics.py writes provenance.jsonl, metrics.jsonl, loss.png.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn as nn

from . import data as datasets
from . import distributed
from .checkpoint import load_config, load_model, read_config_json, weights_bytes, write_model_files
from .config import PRESETS, GPTConfig, TrainConfig, preset  # TrainConfig: also gpt2lab.train.TrainConfig
from .device import compiled, resolve_device
from .errors import TrainingError
from .metrics import RunLog, Window, flops_per_token, peak_flops, plot_metrics, write_provenance
from .model import GPT
from .optim import build_optimizer
from .rundir import METRICS, RunDir, open_run, seed_everything

# (inputs, targets) or (inputs, targets, loss mask); all (B, T). The mask is 1 where a target counts.
Batch = tuple[torch.Tensor, ...]
StopReason = Literal["max_steps", "max_minutes", "interrupted", "early_stopping"]


class Batches(Protocol):
    """Where training batches come from (data.Loader is one).

    get(step, index) must depend on nothing but its arguments (and the loader's seed): `index`
    is the global micro-batch index, rank * grad_accum + micro_step, so any world size reads the
    same global batch at a step, and a resumed run reads what the uninterrupted run would have.
    """

    def get(self, step: int, index: int = 0) -> Batch: ...


class EvalBatches(Protocol):
    def eval_batches(self, n: int) -> Iterable[Batch]: ...


# -- the pieces of a step ----------------------------------------------------------------------


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy in nats of `model` on a batch, through its fused head (loss.py).

    batch[0] holds the inputs (B, T), batch[1] the targets (B, T) and an optional batch[2] (B, T) is
    1 where a target counts (fine-tuning masks the prompt tokens); the mean is over those.
    """
    return model(batch[0], targets=batch[1], loss_mask=batch[2] if len(batch) > 2 else None)


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
                loss = loss_fn(model, batch) / accum
            loss.backward()
        loss_sum += loss.detach()
        tokens, seq_len = tokens + batch[0].numel(), batch[0].shape[1]
    return loss_sum, tokens, seq_len


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
                    total[0] += loss_fn(model, batch).float()
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


def _unsharded(model: GPT, is_main: bool) -> nn.Module:
    """The model to save: itself, or under FSDP its full weights (a collective: every rank calls
    this) in a plain GPT on rank 0."""
    if not distributed.is_sharded(model):
        return model
    full = distributed.full_model_state(model)
    if not is_main:
        return model
    with torch.device("meta"):
        plain = GPT(model.config)
    plain.load_state_dict(full, assign=True)
    plain.tie_weights()
    return plain


# -- strategy hooks and results ----------------------------------------------------------------


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load a checkpoint folder's weights into `model` (the default Strategy.load)."""
    model.load_state_dict(load_model(folder).state_dict())


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """What pretraining and fine-tuning do differently inside the same fit() loop.

    loss:        (model, batch) -> scalar loss; lm_loss honours a loss mask in batch[2]
    save:        (model, folder, tokenizer) writes the model into a checkpoint folder
                 (LoRA writes its adapter and a reference to the base here)
    load:        (model, folder) restores what `save` wrote, for --resume
    extra_files: file name -> text, written into every checkpoint (e.g. fine-tuning's finetune.json)
    """

    loss: Callable[[nn.Module, Batch], torch.Tensor] = lm_loss
    save: Callable[[nn.Module, Path, Any], None] = write_model_files
    load: Callable[[nn.Module, Path], None] = load_weights
    extra_files: Mapping[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class FitResult:
    """How a fit() call ended."""

    step: int
    stop_reason: StopReason
    checkpoint: Path | None
    train_loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    elapsed_s: float = 0.0
    signal: int | None = None  # the signal that stopped an interrupted run (SIGINT, SIGTERM)


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


def fit(model: GPT, config: TrainConfig, batches: Batches, *, run_dir: str | Path | RunDir,
        val: EvalBatches | None = None, tokenizer: Any = None, strategy: Strategy | None = None,
        resume: bool = False, bytes_per_token: float | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None) -> FitResult:
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
    run = run_dir if isinstance(run_dir, RunDir) else open_run(run_dir, resume=resume)
    try:
        trainer = _Trainer(model, config, batches, run, val=val, tokenizer=tokenizer,
                           strategy=strategy or Strategy(), bytes_per_token=bytes_per_token, on_step=on_step)
        result = FitResult(step=trainer.progress.step, stop_reason="max_steps", checkpoint=run.resume_from)
        try:
            with trainer.stop.installed():
                trainer.train(result)
        finally:
            trainer.log.close()
        return trainer.finish(result)
    finally:
        if run is not run_dir:
            run.close()


@dataclass(kw_only=True)
class _Progress:
    """The loop's counters that a checkpoint must carry besides the model and optimizer."""

    step: int = 0
    tokens: int = 0  # training tokens seen, over all ranks
    elapsed: float = 0.0  # wall-clock seconds of training so far, over all resumes
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0  # evaluations in a row without a better validation loss


@dataclass(kw_only=True)
class _Step:
    """What one optimizer step leaves for the loop to log and decide on."""

    step: int  # steps done, this one included
    lr: float
    train_loss: float  # the mean over micro-batches and ranks
    grad_norm: float
    seq_len: int
    stopping: StopReason | None  # set when the run stops after this step
    last: bool  # the run's last step: log, evaluate and save whatever the intervals say


class _Trainer:
    """One fit() call: the model (plain and wrapped), its optimizer, the counters, clocks and logs."""

    def __init__(self, model: GPT, cfg: TrainConfig, batches: Batches, run: RunDir, *, val: EvalBatches | None,
                 tokenizer: Any, strategy: Strategy, bytes_per_token: float | None,
                 on_step: Callable[[int, dict[str, float]], None] | None) -> None:
        self.model, self.cfg, self.batches, self.run, self.val = model, cfg, batches, run, val
        self.tokenizer, self.strategy, self.on_step = tokenizer, strategy, on_step
        self.bytes_per_token = bytes_per_token
        self.world, self.device = distributed.world(), resolve_device(cfg.device)
        _, self.accum = cfg.accumulation(self.world.size)
        self.progress = _Progress()
        model.to(self.device).train()
        model.gradient_checkpointing = cfg.gradient_checkpointing
        state = run.state
        if state is not None:
            state.check_resumable(dataclasses.asdict(cfg))
            known = {f.name for f in dataclasses.fields(_Progress)}
            self.progress = _Progress(**{k: v for k, v in state.progress.items() if k in known})
            # Weights go into the plain model before any wrapper, so every rank starts identical.
            strategy.load(model, state.checkpoint)
        bf16 = cfg.bf16(self.device.type, model.config.n_embd)
        wrapped = distributed.wrap(model, fsdp=cfg.fsdp, device=self.device, bf16=bf16)
        self.wrapped = (compiled(wrapped, self.device, what="training", warn=self.world.is_main)
                        if cfg.compile else wrapped)
        self.optimizer = build_optimizer(model, cfg, self.device)
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        if state is not None:
            distributed.load_optimizer_state(model, self.optimizer, state.optimizer)
            state.restore_rng()
        else:
            # Dropout differs per rank (as it would per micro-batch in one process); the data does not.
            seed_everything(cfg.seed + self.world.rank)
        self.amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.peak, peak_source = (cfg.peak_tflops * 1e12, "--peak-tflops") if cfg.peak_tflops else peak_flops(
            self.device, torch.bfloat16 if bf16 else torch.float32)
        if self.world.is_main:
            write_provenance(run.path, dataclasses.asdict(cfg), model, self.device, self.world.size,
                             event="resume" if state else "start", step=self.progress.step,
                             checkpoint=str(state.checkpoint) if state else None,
                             precision="bf16 autocast" if bf16 else "fp32", grad_accum=self.accum,
                             peak_flops_per_device=self.peak, peak_flops_source=peak_source)
        self.log = RunLog(run.path, enabled=self.world.is_main, tensorboard=cfg.tensorboard,
                          start=self.progress.step, total=cfg.max_steps)
        if state is not None:
            self.log.info(f"resuming {run.path} from {state.checkpoint.name}")
        if self.wrapped is not wrapped:
            self.log.info("compiling the model (torch.compile): the first steps wait for it, up to a minute "
                          "the first time on a machine")
        self.stop = _StopRequest()
        self.n_eval = cfg.eval_batches
        if val is not None and (most := getattr(val, "max_eval_batches", None)) is not None and self.n_eval > most:
            self.log.info(f"--eval-batches {self.n_eval}: the validation split holds {most} batch(es) of distinct "
                          f"windows; evaluating on {most}")
            self.n_eval = most
        self.budget = cfg.max_minutes * 60 if cfg.max_minutes and not cfg.decay_steps else 0.0  # a cosine over time
        self.window = Window()
        self.start = 0.0  # perf_counter() when the run would have started, had it never stopped

    def train(self, result: FitResult) -> None:
        """Step until max_steps or a stop; log, evaluate and save when the intervals say."""
        cfg = self.cfg
        self.start = time.perf_counter() - self.progress.elapsed
        if self.run.resume_from is None and self.val is not None and cfg.eval_interval:
            if not self._first_evaluation(result):
                result.stop_reason = "interrupted"
                return
        self.window.restart()
        while self.progress.step < cfg.max_steps:
            s = self.step()
            row = self._metrics_row(s) if s.step % cfg.log_interval == 0 or s.last else {}
            improved = False
            if self.val is not None and ((cfg.eval_interval and s.step % cfg.eval_interval == 0) or s.last):
                improved = self._evaluate_after(s, row, result)
            if row:
                self.log.row(row)
            result.train_loss = s.train_loss
            if s.step % cfg.ckpt_interval == 0 or s.last or (cfg.keep_best and improved):
                result.checkpoint = self.save(s.step)
            if self.on_step is not None:
                self.on_step(s.step, {"train_loss": s.train_loss, "lr": s.lr, "grad_norm": s.grad_norm})
            if s.stopping is not None:
                result.stop_reason = s.stopping
                return

    def step(self) -> _Step:
        """One optimizer step: the scheduled lr, every rank's micro-batches, clipping, the update."""
        cfg, p, world = self.cfg, self.progress, self.world
        spent = min(1.0, p.elapsed / self.budget) if self.budget else None
        lr = learning_rate(p.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps,
                           horizon=cfg.decay_steps or cfg.max_steps, spent=spent)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum, tokens, seq_len = _accumulate_gradients(
            self.wrapped, self.batches, p.step, rank=world.rank, accum=self.accum, device=self.device, amp=self.amp,
            loss_fn=self.strategy.loss)
        norm = nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        now = time.perf_counter() - self.start
        time_up = cfg.max_minutes > 0 and now >= cfg.max_minutes * 60
        # One all-reduce a step: the global loss, whether any rank must stop, and the time, which
        # ranks must agree on when it sets the learning rate.
        flags = torch.tensor([float(self.stop.requested), float(time_up), now], device=self.device)
        shared = distributed.all_reduce_sum(torch.cat([loss_sum.float().reshape(1), flags]))
        train_loss, grad_norm = shared[0].item() / world.size, norm.item()
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            raise TrainingError(
                f"training diverged at step {p.step + 1}: loss {train_loss}, gradient norm {grad_norm}; "
                f"nothing was saved after {self.run.latest() or 'the start'}. Lower --lr or raise --warmup-steps, "
                "then --resume"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        p.step += 1
        p.tokens += tokens * world.size
        p.elapsed = shared[3].item() / world.size
        self.window.add(train_loss, tokens * world.size)
        self.log.bar.update(1)
        stopping: StopReason | None = None
        if shared[1].item() > 0:
            stopping = "interrupted"
        elif shared[2].item() > 0:
            stopping = "max_minutes"
        return _Step(step=p.step, lr=lr, train_loss=train_loss, grad_norm=grad_norm, seq_len=seq_len,
                     stopping=stopping, last=p.step >= cfg.max_steps or stopping is not None)

    def _metrics_row(self, s: _Step) -> dict[str, Any]:
        """Step s's metrics line: averages, throughput and MFU over the steps since the last line."""
        p, tok_s = self.progress, self.window.tokens_per_s()
        row = {"step": s.step, "elapsed_s": round(p.elapsed, 3), "lr": s.lr, "train_loss": self.window.mean_loss(),
               "grad_norm": s.grad_norm, "tokens_per_s": tok_s,
               "mfu": tok_s * flops_per_token(self.model.config, s.seq_len) / (self.peak * self.world.size),
               "tokens": p.tokens}
        self.window.restart()
        if self.budget and p.elapsed > 0:  # the bar counts towards where the time will run out
            self.log.bar.total = max(s.step, round(s.step * self.budget / p.elapsed))
        return row

    def evaluate(self) -> tuple[float, float | None] | None:
        """(validation loss, bits per byte), or None when a stop request cut the evaluation short."""
        loss = _evaluate(self.wrapped, self.val, self.n_eval, self.strategy.loss, self.device, self.amp, self.stop)
        distributed.reshard(self.model)
        if loss is None:
            return None
        return loss, (loss / math.log(2) / self.bytes_per_token if self.bytes_per_token else None)

    def _first_evaluation(self, result: FitResult) -> bool:
        """The untrained model's validation loss, logged at step 0; False if a stop request cut it short."""
        first = self.evaluate()
        if first is None:
            return False
        result.val_loss, result.val_bpb = first
        self.log.row({"step": 0, "elapsed_s": 0.0, "val_loss": result.val_loss}
                     | ({"val_bpb": result.val_bpb} if result.val_bpb is not None else {}))
        return True

    def _evaluate_after(self, s: _Step, row: dict[str, Any], result: FitResult) -> bool:
        """Evaluate after step s: the losses go into its metrics row, the record into the counters.
        Whether the validation loss improved. A stop request during the evaluation, or running out
        of patience, makes s the last step."""
        p, evaluated, improved = self.progress, self.evaluate(), False
        if evaluated is None:  # stopped mid-evaluation: save and stop, logging no partial loss
            s.stopping, s.last = "interrupted", True
        else:
            result.val_loss, result.val_bpb = evaluated
            if not row:
                row.update(step=s.step, elapsed_s=round(p.elapsed, 3))
            row["val_loss"] = result.val_loss
            if result.val_bpb is not None:
                row["val_bpb"] = result.val_bpb
            improved = result.val_loss < p.best_val
            if improved:
                p.best_val, p.best_step, p.bad_evals = result.val_loss, s.step, 0
            else:
                p.bad_evals += 1
            if self.cfg.patience and p.bad_evals >= self.cfg.patience and s.stopping is None:
                s.stopping, s.last = "early_stopping", True
        self.window.restart()  # evaluation time is not training throughput
        return improved

    def save(self, step: int) -> Path | None:
        """Write checkpoints/step-NNNNNNNN (rank 0), then prune to the last K (and the best)."""
        # Collectives first: under FSDP every rank helps gather the full state for rank 0.
        optim_state = distributed.optimizer_state(self.model, self.optimizer)
        model = _unsharded(self.model, self.world.is_main)
        path = self._write(step, model, optim_state) if self.world.is_main else None
        distributed.barrier()  # no rank goes on (to a resume, say) before the checkpoint is complete
        if path is not None:
            self.log.info(f"saved {path}")
        self.window.restart()
        return path

    def _write(self, step: int, model: nn.Module, optim_state: dict[str, Any]) -> Path:
        cfg, p, strategy = self.cfg, self.progress, self.strategy

        def write_model(tmp: Path) -> None:
            strategy.save(model, tmp, self.tokenizer)
            for name, text in strategy.extra_files.items():
                (tmp / name).write_text(text, encoding="utf-8")

        trainable = sum(t.numel() * t.element_size() for t in model.parameters() if t.requires_grad)
        path = self.run.save(step, write_model, progress=dataclasses.asdict(p), config=dataclasses.asdict(cfg),
                             optimizer=optim_state, world_size=self.world.size,
                             needed=weights_bytes(model) + 2 * trainable)  # + AdamW's two moments
        if cfg.keep_best and p.best_step == step:
            self.run.mark_best(step, p.best_val)
        self.run.prune(cfg.keep_last, p.best_step if cfg.keep_best else -1)
        return path

    def finish(self, result: FitResult) -> FitResult:
        """Complete `result` from the counters and redraw loss.png."""
        p = self.progress
        result.step, result.elapsed_s = p.step, p.elapsed
        if result.stop_reason == "interrupted":
            # A rank that got no signal of its own stopped with rank 0.
            result.signal = self.stop.signum or signal.SIGINT
        if p.best_step >= 0:
            result.best_step, result.best_val_loss = p.best_step, p.best_val
        if self.world.is_main and (self.run.path / METRICS).is_file():
            plot_metrics(self.run.path)
        return result


# -- pretraining from a data folder --------------------------------------------------------


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


def pretrain(data: str | Path, out: str | Path, cfg: TrainConfig, *, resume: bool = False) -> FitResult:
    """`train` as a function returning the FitResult: joins torchrun's process group, builds
    the model and the loaders from the data folder, and runs fit()."""
    joined = not distributed.world().distributed  # a group we join here is ours to leave
    world = distributed.init_from_env(resolve_device(cfg.device).type)
    try:
        run = open_run(out, resume=resume)  # first: a busy, wrong or finished --out fails before any work
        try:
            folder = datasets.DataFolder.open(data)
            tokenizer = folder.tokenizer
            if run.resume_from is not None:
                model_cfg = load_config(run.resume_from)  # the run's own architecture; fit() checks the rest
            else:
                model_cfg = model_config(cfg.model, vocab_size=tokenizer.vocab_size, dropout=cfg.dropout)
            block = cfg.block_size or model_cfg.n_ctx
            if block > model_cfg.n_ctx:
                raise TrainingError(f"block_size {block} exceeds the model's context of {model_cfg.n_ctx}")
            micro, _ = cfg.accumulation(world.size)
            batches = folder.loader("train", batch_size=micro, block_size=block, seed=cfg.seed)
            val = None
            if folder.has_split("val"):
                val = folder.loader("val", batch_size=micro, block_size=block, seed=cfg.seed)
            elif world.is_main:  # a note, not a refusal: --val-fraction 0 asked for no validation
                print(f"{data} has no validation split (prepared with --val-fraction 0): training without evaluation",
                      file=sys.stderr)
            torch.manual_seed(cfg.seed)
            model = GPT(model_cfg)
            return fit(model, cfg, batches, val=val, run_dir=run, tokenizer=tokenizer,
                       bytes_per_token=folder.bytes_per_token("val"))
        finally:
            run.close()
    finally:
        if joined:
            distributed.shutdown()
