"""Run folders: one writer under a lock, recovery from what crashes leave, signals, exit codes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_train import Corpus, assert_same_weights, config, run, tiny_model

from gpt2lab.checkpoint import latest_checkpoint
from gpt2lab.errors import GPT2LabError, TrainingError
from gpt2lab.files import LockedError
from gpt2lab.rundir import STATE_FILE, RunDir, seed_everything
from gpt2lab.train import fit

TESTS = str(Path(__file__).parent)


def steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# -- one writer ----------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_train import Corpus, config, tiny_model
    from gpt2lab.train import fit

    torch.set_num_threads({threads})  # the parent's: sums split across threads round differently
    def wait_at(step, metrics):
        if step == 3:  # checkpoint 2 is on disk: tell the test, then hold the run open
            print("running", flush=True)
            sys.stdin.readline()
    fit(tiny_model(), config(max_steps=8, ckpt_interval=2), Corpus(), val=Corpus(), run_dir={run!r}, on_step=wait_at)
""")


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_and_a_killed_ones_lock_does_not_block_resume(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(tests=TESTS, run=str(run_dir),
                                                                     threads=torch.get_num_threads())],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "running"
        for resume in (False, True):
            with pytest.raises(LockedError, match=rf"in use by another gpt2lab process \(PID {holder.pid}\)"):
                run(tmp_path, "run", config(max_steps=8, ckpt_interval=2), resume=resume)
        holder.kill()  # kill -9 while it holds the lock
        holder.wait()
    finally:
        holder.kill()
        holder.wait()
    resumed, result = run(tmp_path, "run", config(max_steps=8, ckpt_interval=2), resume=True)
    assert result.step == 8
    straight, _ = run(tmp_path, "straight", config(max_steps=8, ckpt_interval=2))
    assert_same_weights(resumed, straight)


def test_out_must_be_a_folder_for_runs(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match="is a file"):
        run(tmp_path, "file", config())
    with pytest.raises(TrainingError, match="under a file"):
        run(tmp_path, "file/run", config())
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(TrainingError, match="not a gpt2lab run.*todo.txt"):
        run(tmp_path, "notes", config())
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]
    # a user's folder that happens to hold files named like a run's is still the user's
    (tmp_path / "logs").mkdir()
    for name in ("metrics.jsonl", "loss.png", "provenance.jsonl"):
        (tmp_path / "logs" / name).write_text("mine")
    with pytest.raises(TrainingError, match="not a gpt2lab run"):
        run(tmp_path, "logs", config())
    assert {p.read_text() for p in (tmp_path / "logs").iterdir()} == {"mine"}
    # a run never goes inside another gpt2lab folder
    run(tmp_path, "done", config(max_steps=2))
    for inside in ("done/sub", "done/checkpoints/step-00000002/x"):
        with pytest.raises(TrainingError, match="lies inside the (training run|checkpoint)"):
            run(tmp_path, inside, config())


def test_a_refused_or_failed_start_leaves_no_folder_behind(tmp_path):
    from gpt2lab.train import pretrain

    for out in ("new", "a/../b"):
        with pytest.raises(GPT2LabError):
            pretrain(tmp_path / "missing-data", tmp_path / out, config())
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_fresh_start_on_a_finished_run_deletes_nothing(tmp_path):
    run(tmp_path, "r", config(max_steps=4, ckpt_interval=2))
    (tmp_path / "r" / "checkpoints" / "step-00000004" / STATE_FILE).unlink()  # the user keeps only the weights
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(TrainingError, match="already holds a run"):
        run(tmp_path, "r", config(max_steps=4))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


# -- training state ----------------------------------------------------------------------------------


def test_a_checkpoints_training_state_restores_every_rng_and_refuses_a_changed_config(tmp_path):
    config = {"model": "gpt2-nano", "batch_size": 4, "block_size": 8, "seed": 3, "dropout": 0.0, "lr": 1e-3,
              "optimizer": "adamw"}

    def write_model(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))

    run = RunDir.open(tmp_path / "r", resume=False)
    seed_everything(3)
    run.save(5, write_model, progress={"step": 5, "tokens": 40}, config=config, optimizer={"state": {}},
             world_size=1)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    run.close()
    resumed = RunDir.open(tmp_path / "r", resume=True)
    try:
        state = resumed.state
        assert state.checkpoint == resumed.resume_from == tmp_path / "r/checkpoints/step-00000005"
        assert state.progress == {"step": 5, "tokens": 40} and state.config == config
        state.restore_rng()
        got = (random.random(), np.random.rand(), torch.rand(3))
        assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
        state.check_resumable(config | {"lr": 2e-3})  # the learning rate may change on resume
        with pytest.raises(TrainingError, match="step-00000005 was trained with seed=3 but this run asks for 4"):
            state.check_resumable(config | {"seed": 4})
        with pytest.raises(TrainingError, match="with optimizer='adamw' but this run asks for 'muon'"):
            state.check_resumable(config | {"optimizer": "muon"})
    finally:
        resumed.close()


# -- what crashes leave behind ---------------------------------------------------------------------


@pytest.mark.parametrize("torn", ['{"step": 5, "train_lo', '{"step": 4, "val_loss": 1.', "\x00" * 7])
def test_a_torn_metrics_line_does_not_block_resume(tmp_path, capsys, torn):
    run(tmp_path, "r", config(max_steps=4))
    metrics = tmp_path / "r" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + torn)
    run(tmp_path, "r", config(max_steps=8), resume=True)
    assert "metrics.jsonl: dropped a torn last line" in capsys.readouterr().err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 9))


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(len(data)),
                      "zeroed": bytes(len(data))}[how])


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "zeroed"])
@pytest.mark.parametrize("file", [STATE_FILE, "model.safetensors"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, how, file):
    cfg = config(max_steps=8, ckpt_interval=2, decay_steps=8)
    run(tmp_path, "r", config(max_steps=6, ckpt_interval=2, decay_steps=8))
    damage(tmp_path / "r" / "checkpoints" / "step-00000006" / file, how)
    resumed, result = run(tmp_path, "r", cfg, resume=True)
    err = capsys.readouterr().err
    assert f"step-00000006/{file} is unreadable" in err and "resuming from step-00000004" in err
    assert "moved to corrupt-step-00000006" in err  # kept, out of the way: it neither counts nor is pruned for
    assert (tmp_path / "r" / "checkpoints" / "corrupt-step-00000006" / file).is_file()
    straight, _ = run(tmp_path, "straight", cfg)
    assert result.step == 8
    assert_same_weights(resumed, straight)


def test_no_readable_checkpoint_is_one_error_naming_the_file(tmp_path):
    run(tmp_path, "r", config(max_steps=4, ckpt_interval=2))
    for ckpt in (tmp_path / "r" / "checkpoints").iterdir():
        damage(ckpt / STATE_FILE, "truncated")
    with pytest.raises(TrainingError, match=r"no checkpoint of .* reads back \(.*step-00000004/train_state.pt"):
        run(tmp_path, "r", config(max_steps=8), resume=True)


KILLED_PRUNE = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_train import Corpus, config, tiny_model
    from gpt2lab import files
    from gpt2lab.train import fit

    torch.set_num_threads({threads})
    real_rmtree = files.shutil.rmtree
    def die_deleting(path, *args, **kwargs):  # kill -9 once a file of the pruned checkpoint is gone
        (os.path.isfile(os.path.join(path, "model.safetensors")) and os.remove(os.path.join(path, "model.safetensors")))
        os.kill(os.getpid(), signal.SIGKILL)
    files.shutil.rmtree = die_deleting
    fit(tiny_model(), config(max_steps=8, ckpt_interval=2, keep_last=2), Corpus(), val=Corpus(), run_dir={run!r})
""")


@pytest.mark.slow
def test_kill_9_while_pruning_leaves_no_incomplete_checkpoint_and_resume_cleans_up(tmp_path, capsys):
    run_dir = tmp_path / "r"
    script = KILLED_PRUNE.format(tests=TESTS, run=str(run_dir), threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = steps(run_dir)
    assert "step-00000002" not in names and names[-2:] == ["step-00000004", "step-00000006"]
    assert any(n.startswith(".step-00000002.tmp-") for n in names)  # the half-deleted one, out of sight
    assert latest_checkpoint(run_dir).name == "step-00000006"
    resumed, result = run(tmp_path, "r", config(max_steps=8, ckpt_interval=2, keep_last=2), resume=True)
    assert steps(run_dir) == ["step-00000006", "step-00000008"]
    straight, _ = run(tmp_path, "straight", config(max_steps=8, ckpt_interval=2, keep_last=2))
    assert_same_weights(resumed, straight)


@pytest.mark.parametrize("resume", [False, True])
def test_opening_a_run_cleans_what_killed_runs_left(tmp_path, capsys, resume):
    run_dir = tmp_path / "r"
    if resume:
        run(tmp_path, "r", config(max_steps=4, ckpt_interval=2))
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").touch()
    leftovers = {
        "step-00000010": ["config.json"],  # an older version's half-pruned checkpoint
        "step-00000012": ["config.json", "model.safetensors"],  # weights, no training state: maybe the user's
        ".step-00000014.tmp-abc123": ["config.json"],  # a half-written save of an older version
        ".step-00000016.tmp-999999999-x": ["config.json", "model.safetensors"],
        ".step-00000002.tmp-999999999-deleting": ["config.json"],
    }
    for name, names in leftovers.items():
        (ckpts / name).mkdir()
        for f in names:
            (ckpts / name / f).write_text("{}")
    (ckpts / "notes.txt").write_text("mine")  # not ours: kept
    run(tmp_path, "r", config(max_steps=6, ckpt_interval=2), resume=resume)
    expected = ["step-00000002", "step-00000004", "step-00000006", "step-00000012"]
    assert steps(run_dir) == sorted(["notes.txt", *expected])
    err = capsys.readouterr().err
    assert "step-00000010, an incomplete checkpoint" in err and "step-00000012 has weights but no" in err


# -- signals ---------------------------------------------------------------------------------------


class SlowVal(Corpus):
    """Validation data that receives a signal while the evaluation runs, and counts what it gives."""

    def __init__(self, signum: int | None, at_call: int, **kw) -> None:
        super().__init__(**kw)
        self.signum, self.at_call, self.calls, self.given = signum, at_call, 0, 0
        self.max_eval_batches = 5

    def eval_batches(self, n: int):
        self.calls += 1
        for i, batch in enumerate(super().eval_batches(n)):
            if self.signum is not None and self.calls == self.at_call and i == 3:
                os.kill(os.getpid(), self.signum)
            self.given += 1
            yield batch


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("at_call", [1, 2])  # the first evaluation (step 0) and one inside the loop
def test_a_stop_request_during_evaluation_is_honoured_at_once(tmp_path, signum, at_call):
    val = SlowVal(signum, at_call, batch_size=2)
    result = fit(tiny_model(), config(max_steps=8, eval_interval=4, eval_batches=1_000_000), Corpus(), val=val,
                 run_dir=tmp_path / "r")
    assert result.stop_reason == "interrupted" and result.signal == signum
    assert val.given <= 5 * at_call  # bounded by what the split holds, and cut short
    metrics = tmp_path / "r" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if at_call == 1:  # stopped before any training: nothing to save
        assert result.checkpoint is None and rows == []
    else:
        assert result.step == 4 and result.checkpoint.name == "step-00000004"
        assert [r["step"] for r in rows if "val_loss" in r] == [0]  # no loss from a partial evaluation


def test_eval_batches_are_bounded_by_the_validation_split(tmp_path, capsys):
    val = SlowVal(None, 0, batch_size=2)
    fit(tiny_model(), config(max_steps=4, eval_interval=4, eval_batches=1_000_000), Corpus(), val=val,
        run_dir=tmp_path / "r")
    assert val.given == 5 * val.calls
    assert "evaluating on 5" in capsys.readouterr().err


SIGNALLED_CLI = textwrap.dedent("""
    import os, sys
    import gpt2lab.train as train
    from gpt2lab.cli import main

    real = train._accumulate_gradients
    def signalled(model, batches, step, **kw):
        if step == 2:
            os.kill(os.getpid(), {signum})
        return real(model, batches, step, **kw)
    train._accumulate_gradients = signalled
    sys.exit(main(["train", "--data", {data!r}, "--out", {out!r}, "--model", "gpt2-nano", "--block-size", "16",
                   "--batch-size", "2", "--max-steps", "50", "--eval-interval", "0", "--eval-batches", "1",
                   "--device", "cpu", "--peak-tflops", "1"]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_gpt2lab_train_stopped_by_a_signal_saves_and_exits_128_plus_the_signal(tmp_path, signum, code):
    from gpt2lab.data import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40)
    prepare(str(corpus), out=tmp_path / "data", tokenizer="gpt2", val_fraction=0.25, progress=False)
    script = SIGNALLED_CLI.format(signum=int(signum), data=str(tmp_path / "data"), out=str(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"stopped by {signal.Signals(signum).name} at step 3" in proc.stderr
    assert "continue with --resume" in proc.stderr.splitlines()[-1]
    assert "checkpoint:" in proc.stdout  # the run's summary still goes to stdout
    assert RunDir(tmp_path / "run").latest().name == "step-00000003"


@pytest.mark.parametrize("when", ["checked before writing", "found while writing"])
def test_a_full_disk_during_training_is_one_error_and_leaves_the_checkpoints_whole(tmp_path, monkeypatch, when):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    if when == "found while writing":  # no estimate of the size: the disk fills mid-checkpoint
        monkeypatch.setattr("gpt2lab.files.check_space", lambda path, needed: None)
    try:
        (mnt / "ballast").write_bytes(b"\0" * 1_600_000)  # room for one checkpoint (1.1 MB) and the logs, not two
        with pytest.raises(GPT2LabError) as e:
            run(mnt, "r", config(max_steps=8, ckpt_interval=2, keep_last=5))
        assert "no space left" in str(e.value) and "\n" not in str(e.value)
        assert str(mnt / "r" / "checkpoints") in str(e.value)
        left = steps(mnt / "r")
        assert left and all(name.startswith("step-") for name in left)  # no half-written folder
        assert all(RunDir.complete(mnt / "r" / "checkpoints" / name) for name in left)
        (mnt / "ballast").unlink()
        _, result = run(mnt, "r", config(max_steps=8, ckpt_interval=2, keep_last=1), resume=True)
        assert result.step == 8
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
