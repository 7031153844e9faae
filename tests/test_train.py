"""The training loop: schedule, loss, checkpoints, bit-identical resume, signals, divergence, DDP."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2lab import load_model, preset
from gpt2lab.checkpoint import latest_checkpoint
from gpt2lab.config import GPTConfig, TrainConfig
from gpt2lab.device import cpu_compiler, native_bf16
from gpt2lab.errors import TrainingError
from gpt2lab.metrics import flops_per_token
from gpt2lab.model import GPT
from gpt2lab.optim import param_groups
from gpt2lab.train import Strategy, fit, learning_rate, lm_loss

VOCAB = 64


class Corpus:
    """A learnable token stream (a noisy Markov chain) with data.Loader's interface."""

    def __init__(self, *, batch_size: int = 2, block_size: int = 16, seed: int = 0, n: int = 4000) -> None:
        rng = np.random.default_rng(1234)
        table = rng.integers(0, VOCAB, size=VOCAB)
        tokens = np.empty(n, dtype=np.int64)
        tokens[0] = 0
        noise = rng.random(n) < 0.1
        random_tokens = rng.integers(0, VOCAB, size=n)
        for i in range(1, n):
            tokens[i] = random_tokens[i] if noise[i] else table[tokens[i - 1]]
        self.tokens = torch.from_numpy(tokens)
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed

    def _windows(self, starts) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.stack([self.tokens[s:s + self.block_size + 1] for s in starts])
        return w[:, :-1], w[:, 1:]

    def get(self, step: int, index: int = 0):
        rng = np.random.default_rng([self.seed, step, index])
        return self._windows(rng.integers(0, len(self.tokens) - self.block_size - 1, size=self.batch_size).tolist())

    def eval_batches(self, n: int):
        starts = np.linspace(0, len(self.tokens) - self.block_size - 2, n * self.batch_size).astype(int).tolist()
        for b in range(n):
            yield self._windows(starts[b * self.batch_size:(b + 1) * self.batch_size])


def tiny_model(seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("gpt2-nano", vocab_size=VOCAB, n_ctx=32, dropout=dropout))


def config(**overrides) -> TrainConfig:
    base = dict(batch_size=4, micro_batch=2, block_size=16, max_steps=8, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                eval_interval=4, eval_batches=2, log_interval=1, ckpt_interval=4, keep_last=5, device="cpu",
                peak_tflops=1.0, model="gpt2-nano")
    return TrainConfig(**(base | overrides))


def run(tmp_path: Path, name: str, cfg: TrainConfig, *, model: GPT | None = None, resume: bool = False, **kw):
    model = model if model is not None else tiny_model(dropout=cfg.dropout)
    result = fit(model, cfg, Corpus(batch_size=cfg.micro_batch), val=Corpus(batch_size=cfg.micro_batch),
                 run_dir=tmp_path / name, resume=resume, **kw)
    return model, result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in metrics(run_dir) if "train_loss" in r}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- pieces ----------------------------------------------------------------------------------


def test_learning_rate_warms_up_then_follows_a_cosine_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, horizon=110)
    assert learning_rate(0, **kw) == pytest.approx(0.1)
    assert learning_rate(9, **kw) == pytest.approx(1.0)
    assert learning_rate(10, **kw) == pytest.approx(1.0)
    assert learning_rate(60, **kw) == pytest.approx(0.55)  # halfway down the cosine
    assert learning_rate(110, **kw) == pytest.approx(0.1)
    assert learning_rate(500, **kw) == pytest.approx(0.1)
    lrs = [learning_rate(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_weight_decay_applies_to_2d_weights_only():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "transformer.wte.weight" in decayed and "transformer.h.0.attn.c_attn.weight" in decayed
    assert not any(n.endswith("bias") or ".ln_" in n for n in decayed)
    assert {names[id(p)] for p in no_decay["params"]} >= {"transformer.ln_f.weight", "transformer.h.0.mlp.c_fc.bias"}
    # The tied head is one parameter, optimised once.
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_weight_decay_groups_skip_frozen_parameters():
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("transformer.h.1."))
    groups = param_groups(model, 0.1)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.1."))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(TrainingError, match="nothing would train"):
        param_groups(model, 0.1)


def test_lm_loss_is_cross_entropy_and_the_mask_drops_positions():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=8, vocab_size=11))
    x, y = torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5))
    logits = model(x)
    assert torch.allclose(lm_loss(model, (x, y)), F.cross_entropy(logits.reshape(10, 11), y.reshape(10)))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    kept = mask.bool()
    expected = F.cross_entropy(logits[kept], y[kept])
    assert torch.allclose(lm_loss(model, (x, y, mask)), expected)
    # Masked-out targets (a prompt) contribute nothing, whatever they are.
    y2 = torch.where(kept, y, (y + 3) % 11)
    assert torch.equal(lm_loss(model, (x, y2, mask)), lm_loss(model, (x, y, mask)))


def test_flops_per_token_is_palm_estimate():
    cfg = preset("gpt2")
    n = 124_439_808 - 1024 * 768  # every weight that multiplies, the tied head included, not the position table
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize("bad, match", [
    (dict(batch_size=0), "batch_size"), (dict(lr=0.0), "lr"), (dict(min_lr=1.0, lr=0.1), "min_lr"),
    (dict(beta2=1.0), "betas"), (dict(batch_size=6, micro_batch=4), "multiple"),
    (dict(precision="fp16"), "precision"), (dict(patience=2, eval_interval=0), "patience"),
])
def test_train_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_accumulation_splits_the_global_batch_over_ranks_and_micro_steps():
    assert TrainConfig(batch_size=32, micro_batch=4).accumulation(1) == (4, 8)
    assert TrainConfig(batch_size=32, micro_batch=4).accumulation(2) == (4, 4)
    assert TrainConfig(batch_size=32).accumulation(2) == (16, 1)
    with pytest.raises(ValueError, match="processes"):
        TrainConfig(batch_size=4, micro_batch=4).accumulation(2)


# -- the loop --------------------------------------------------------------------------------


def test_fit_learns_and_writes_a_complete_run_folder(tmp_path):
    cfg = config(max_steps=30, ckpt_interval=10, eval_interval=10, keep_last=2)
    model, result = run(tmp_path, "run", cfg, bytes_per_token=2.0)
    run_dir = tmp_path / "run"
    rows = metrics(run_dir)
    assert rows[0]["step"] == 0 and "val_loss" in rows[0]  # the untrained model's loss, for the curve
    assert rows[0]["val_loss"] == pytest.approx(math.log(VOCAB), abs=0.3)
    assert result.stop_reason == "max_steps" and result.step == 30
    assert result.val_loss < rows[0]["val_loss"] - 0.5
    assert result.val_bpb == pytest.approx(result.val_loss / math.log(2) / 2.0)
    logged = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 31))
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s", "tokens"):
        assert all(math.isfinite(r[key]) for r in logged), key
    assert logged[-1]["tokens"] == 30 * 4 * 16
    assert [r["step"] for r in rows if "val_bpb" in r] == [0, 10, 20, 30]
    # Checkpoints every 10 steps, the last two kept, the newest loadable as the run.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]
    ckpt = run_dir / "checkpoints" / "step-00000030"
    assert {"config.json", "model.safetensors", "train_state.pt"} <= {p.name for p in ckpt.iterdir()}
    assert_same_weights(load_model(run_dir), model)
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["progress"]["step"] == 30 and state["data"] == {"step": 30, "seed": 0}
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prov = json.loads((run_dir / "provenance.jsonl").read_text().splitlines()[0])
    assert prov["train_config"]["max_steps"] == 30 and prov["model_config"]["vocab_size"] == VOCAB
    assert prov["versions"]["torch"] == torch.__version__ and prov["device"]["type"] == "cpu"
    assert "sha" in prov["git"]


needs_compiler = pytest.mark.skipif(cpu_compiler() is not None, reason="torch.compile cannot build CPU kernels here")


@pytest.mark.slow
@needs_compiler
def test_compiled_training_follows_eager_and_runs_eagerly_where_no_compiler_is_found(tmp_path, monkeypatch):
    cfg = config(max_steps=4, eval_interval=2)
    from torch._dynamo.utils import counters

    run(tmp_path, "eager", cfg)
    counters.clear()
    run(tmp_path, "compiled", dataclasses.replace(cfg, compile=True))
    assert counters["stats"]["unique_graphs"] > 0
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    assert all(compiled[k] == pytest.approx(eager[k], rel=1e-4) for k in eager)
    monkeypatch.setattr("gpt2lab.device.cpu_compiler", lambda: "no C++ compiler found")
    counters.clear()
    expected = r"--compile cannot build CPU kernels here \(no C\+\+ compiler found\); training runs eagerly"
    with pytest.warns(UserWarning, match=expected):
        run(tmp_path, "fallback", dataclasses.replace(cfg, compile=True))
    assert counters["stats"]["unique_graphs"] == 0
    assert train_losses(tmp_path / "fallback") == eager


@needs_compiler
def test_cpu_compiler_says_why_torch_compile_cannot_build_here(monkeypatch, tmp_path):
    import torch._inductor.config as inductor

    def reason() -> str | None:
        cpu_compiler.cache_clear()
        try:
            return cpu_compiler()
        finally:
            cpu_compiler.cache_clear()

    with inductor.patch({"cpp.cxx": ("gpt2lab-no-such-cxx",)}):  # (monkeypatch deletes config entries on undo)
        assert "gpt2lab-no-such-cxx" in reason()
    with monkeypatch.context() as m:
        m.setattr("sysconfig.get_path", lambda name: str(tmp_path))
        assert reason() == f"no Python.h in {tmp_path} (install Python's development headers, e.g. python3-dev)"
    assert reason() is None  # this machine compiles (the test above needs it too)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, optimizer):
    # Dropout and accumulation on, so RNG state and optimizer state both have to come back exactly.
    # decay_steps pins the schedule, so that the first half may stop at max_steps=4.
    cfg = config(max_steps=8, ckpt_interval=4, dropout=0.1, decay_steps=8, optimizer=optimizer)
    straight, _ = run(tmp_path, "straight", cfg)
    run(tmp_path, "resumed", config(max_steps=4, ckpt_interval=4, dropout=0.1, decay_steps=8, optimizer=optimizer))
    resumed, result = run(tmp_path, "resumed", cfg, model=tiny_model(seed=99, dropout=0.1), resume=True)
    assert result.step == 8
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    assert_same_weights(resumed, straight)
    a = torch.load(tmp_path / "straight/checkpoints/step-00000008/train_state.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/step-00000008/train_state.pt", weights_only=True)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pid, s in a["optimizer"]["state"].items():
        for key, value in s.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
    moments = {key for s in a["optimizer"]["state"].values() for key in s}
    assert moments == ({"step", "exp_avg", "exp_avg_sq"} | ({"momentum_buffer"} if optimizer == "muon" else set()))
    # The resumed run's log is one run: its provenance says where it resumed.
    events = [json.loads(line)["event"] for line in (tmp_path / "resumed/provenance.jsonl").read_text().splitlines()]
    assert events == ["start", "resume"]


def test_resume_needs_a_checkpoint_and_a_fresh_run_refuses_an_existing_one(tmp_path):
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        run(tmp_path, "empty", config(), resume=True)
    run(tmp_path, "run", config(max_steps=4))
    with pytest.raises(TrainingError, match="--resume"):
        run(tmp_path, "run", config(max_steps=4))
    with pytest.raises(TrainingError, match="batch_size"):
        run(tmp_path, "run", config(max_steps=8, batch_size=8), resume=True)
    with pytest.raises(TrainingError, match="optimizer='adamw' but this run asks for 'muon'"):
        run(tmp_path, "run", config(max_steps=8, optimizer="muon"), resume=True)


def test_a_run_from_before_the_optimizer_setting_resumes_as_adamw(tmp_path):
    run(tmp_path, "old", config(max_steps=4))
    state_file = tmp_path / "old/checkpoints/step-00000004/train_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["config"]["optimizer"]  # as written before the setting existed
    torch.save(state, state_file)
    with pytest.raises(TrainingError, match="optimizer='adamw'"):
        run(tmp_path, "old", config(max_steps=8, optimizer="muon"), resume=True)
    _, result = run(tmp_path, "old", config(max_steps=8), resume=True)
    assert result.step == 8


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes_identically(tmp_path):
    cfg = config(max_steps=8, ckpt_interval=100)
    straight, _ = run(tmp_path, "straight", cfg)

    def press_ctrl_c(step, _metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    _, result = run(tmp_path, "stopped", cfg, on_step=press_ctrl_c)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is fit's only while it runs
    assert result.stop_reason == "interrupted" and result.step == 4
    assert latest_checkpoint(tmp_path / "stopped").name == "step-00000004"
    resumed, _ = run(tmp_path, "stopped", cfg, resume=True)
    assert_same_weights(resumed, straight)
    assert train_losses(tmp_path / "stopped") == train_losses(tmp_path / "straight")


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = lm_loss(model, batch)
        return loss * bad if calls["n"] > 2 * 5 else loss  # 2 micro-batches a step: step 6 is bad

    cfg = config(max_steps=10, ckpt_interval=2, eval_interval=0)
    with pytest.raises(TrainingError, match="step 6") as err:
        run(tmp_path, "run", cfg, strategy=Strategy(loss=poisoned))
    assert "step-00000004" in str(err.value)
    run_dir = tmp_path / "run"
    assert latest_checkpoint(run_dir).name == "step-00000004"
    assert not any(p.name.startswith(".") for p in (run_dir / "checkpoints").iterdir())
    assert all(math.isfinite(v) for v in load_model(run_dir).state_dict()["transformer.wte.weight"].flatten())


def test_max_minutes_stops_with_a_checkpoint_and_the_cosine_follows_the_clock(tmp_path):
    # A tiny time budget: the run stops on time and saves, its learning rate having decayed with the clock.
    # 3 s: long enough that one slow step on a loaded machine cannot eat most of the budget.
    cfg = config(max_steps=10_000, max_minutes=0.05, warmup_steps=2, ckpt_interval=10_000, log_interval=1)
    _, result = run(tmp_path, "run", cfg)
    assert result.stop_reason == "max_minutes"
    assert 3 < result.step < 10_000
    assert latest_checkpoint(tmp_path / "run").name == f"step-{result.step:08d}"
    rows = [r for r in metrics(tmp_path / "run") if "lr" in r]
    lrs = [r["lr"] for r in rows[2:]]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] < cfg.min_lr + 0.3 * (cfg.lr - cfg.min_lr)  # near the end of the cosine when time ran out
    assert rows[-1]["step"] == result.step


def test_learning_rate_follows_the_share_of_a_time_budget():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, horizon=10**9)
    assert learning_rate(5, spent=0.9, **kw) == pytest.approx(0.6)  # warmup first
    assert learning_rate(50, spent=0.5, **kw) == pytest.approx(0.55)
    assert learning_rate(50, spent=1.0, **kw) == pytest.approx(0.1)


def test_early_stopping_keeps_and_marks_the_best_checkpoint(tmp_path):
    class Opposite(Corpus):
        """Validation text that follows the reverse of the training chain: its loss rises as training learns."""

        def eval_batches(self, n):
            for x, y in super().eval_batches(n):
                yield y, x

    cfg = config(max_steps=50, eval_interval=2, patience=2, keep_best=True, keep_last=1, ckpt_interval=100, lr=1e-2)
    model = tiny_model()
    result = fit(model, cfg, Corpus(batch_size=2), val=Opposite(batch_size=2), run_dir=tmp_path / "run")
    assert result.stop_reason == "early_stopping"
    best = json.loads((tmp_path / "run/best.json").read_text())
    assert best["step"] == result.best_step < result.step == best["step"] + 2 * cfg.patience
    assert (tmp_path / "run" / best["checkpoint"] / "model.safetensors").is_file()  # kept beyond keep_last
    assert latest_checkpoint(tmp_path / "run").name == f"step-{result.step:08d}"


def test_extra_files_and_frozen_parameters(tmp_path):
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("transformer.h.2."))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(max_steps=3, ckpt_interval=3)
    _, result = run(tmp_path, "run", cfg, model=model, strategy=Strategy(extra_files={"template.txt": "Q: {q}"}))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("transformer.h.2.") for k in changed)
    assert (result.checkpoint / "template.txt").read_text() == "Q: {q}"


# -- a killed process ------------------------------------------------------------------------

KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_train import Corpus, config, tiny_model
    from gpt2lab.checkpoint import write_model_files
    from gpt2lab.train import Strategy, fit

    torch.set_num_threads({threads})  # the parent's: sums split across threads round differently
    def save_then_die(model, folder, tokenizer):
        write_model_files(model, folder, tokenizer)
        if "step-00000006" in str(folder):  # killed halfway through writing checkpoint 6
            os.kill(os.getpid(), signal.SIGKILL)
    fit(tiny_model(), config(max_steps=8, ckpt_interval=2), Corpus(), val=Corpus(), run_dir={run!r},
        strategy=Strategy(save=save_then_die))
""")


@pytest.mark.slow
def test_kill_9_loses_only_the_steps_since_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "killed"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), run=str(run_dir), threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert latest_checkpoint(run_dir).name == "step-00000004"  # the half-written step 6 does not count
    resumed, result = run(tmp_path, "killed", config(max_steps=8, ckpt_interval=2), resume=True)
    assert result.step == 8
    assert not any(p.name.startswith(".") for p in (run_dir / "checkpoints").iterdir())
    straight, _ = run(tmp_path, "straight", config(max_steps=8, ckpt_interval=2))
    assert_same_weights(resumed, straight)


# -- distributed -----------------------------------------------------------------------------


def _ddp_worker(rank: int, world_size: int, port: int, run_dir: str, fsdp: bool, runs=((6, False),)) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for max_steps, resume in runs:
            # fp32: under bf16, FSDP2 computes with bf16 weights where one process autocasts (not the same rounding)
            cfg = config(max_steps=max_steps, decay_steps=6, micro_batch=2, fsdp=fsdp, precision="fp32")
            fit(tiny_model(seed=99 if resume else 0), cfg, Corpus(batch_size=2), val=Corpus(batch_size=2),
                run_dir=run_dir, resume=resume)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_matches_one_process(tmp_path, run_dir: Path) -> None:
    single, _ = run(tmp_path, "single", config(max_steps=6, decay_steps=6, micro_batch=2, precision="fp32"))
    one, two = train_losses(tmp_path / "single"), train_losses(run_dir)
    assert one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)
    # Rank 0 alone wrote the run: one provenance line per start, and a checkpoint that loads as a plain model.
    assert json.loads((run_dir / "provenance.jsonl").read_text().splitlines()[0])["device"]["world_size"] == 2
    loaded = load_model(run_dir)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_ddp_processes_match_one_process_with_accumulation(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), False), nprocs=2, join=True)
    assert len((tmp_path / "ddp/provenance.jsonl").read_text().splitlines()) == 1
    _check_matches_one_process(tmp_path, tmp_path / "ddp")


@pytest.mark.slow
def test_two_fsdp2_processes_match_one_process_and_resume_exactly(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "straight"), True), nprocs=2, join=True)
    # 3 steps, then a resume to 6 (from a model of another seed: the checkpoint must replace it).
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "resumed"), True, ((3, False), (6, True))),
             nprocs=2, join=True)
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    assert_same_weights(load_model(tmp_path / "resumed"), load_model(tmp_path / "straight"))
    _check_matches_one_process(tmp_path, tmp_path / "straight")


def _fsdp_dtype_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from gpt2lab import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        seen = {}
        for bf16 in (False, True):
            model = tiny_model()
            layer = model.transformer.h[0].attn.c_attn

            def note(module, args, bf16=bf16) -> None:  # the weight the layer computes with
                seen.setdefault(bf16, str(module.weight.dtype))

            layer.register_forward_pre_hook(note)
            wrapped = distributed.wrap(model, fsdp=True, device=torch.device("cpu"), bf16=bf16)
            wrapped(torch.zeros(1, 8, dtype=torch.long)).float().sum().backward()
            grads = {str(p.grad.dtype) for p in model.parameters() if p.grad is not None}
            seen[f"grads {bf16}"] = sorted(grads)
        if rank == 0:
            Path(out).write_text(json.dumps({str(k): v for k, v in seen.items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_under_bf16_computes_with_gathered_bf16_weights_and_keeps_fp32_gradients(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_dtype_worker, args=(2, _free_port(), str(tmp_path / "seen.json")), nprocs=2, join=True)
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["False"] == "torch.float32" and seen["True"] == "torch.bfloat16"
    assert seen["grads True"] == seen["grads False"] == ["torch.float32"]  # the sharded masters stay fp32


def test_bf16_follows_the_fp32_loss_curve_and_is_the_default_where_native(tmp_path):
    """300 steps in each precision from the same weights and batches: every 50-step mean of the
    training loss within 2% of fp32's (the means fall from 2.4 to 0.7), the validation loss
    at the end within 2%. `auto` trains in bf16 on a CPU with native bf16 (such as this one), for
    models wide enough to gain from it."""
    cfg = config(max_steps=300, batch_size=8, micro_batch=8, block_size=32, lr=3e-3, min_lr=3e-4,
                 warmup_steps=20, eval_interval=300, eval_batches=4, ckpt_interval=1000, log_interval=1)
    curves, val = {}, {}
    for precision in ("fp32", "bf16"):
        _, result = run(tmp_path, precision, dataclasses.replace(cfg, precision=precision))
        losses = train_losses(tmp_path / precision)
        curves[precision] = [np.mean([losses[s] for s in range(a + 1, a + 51)]) for a in range(0, 300, 50)]
        val[precision] = result.val_loss
    assert curves["fp32"][-1] < 0.5 * curves["fp32"][0]  # it learned
    for f, b in zip(curves["fp32"], curves["bf16"], strict=True):
        assert abs(b - f) / f <= 0.02, (curves["fp32"], curves["bf16"])
    assert abs(val["bf16"] - val["fp32"]) / val["fp32"] <= 0.02, val
    assert TrainConfig().bf16("cpu", 768) == native_bf16() and TrainConfig(precision="fp32").bf16("cpu") is False
    assert TrainConfig().bf16("cpu", 48) is False and TrainConfig(precision="bf16").bf16("cpu", 48) is True
