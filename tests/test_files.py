"""files.py: atomic writes, leftovers of killed processes, destinations, locks, JSONL, disk full, umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpt2lab import files
from gpt2lab.errors import GPT2LabError, TrainingError


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- atomic writes and leftovers -------------------------------------------------------------


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "a").write_text("old")
    with pytest.raises(RuntimeError), files.atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("crash while writing")
    assert tree(tmp_path) == {"ck/a": "old"}  # the old folder, and no temporary one
    with files.atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "a").write_text("new")
    assert tree(tmp_path) == {"ck/a": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_leftovers_of_dead_processes_are_cleaned_and_a_moved_aside_folder_is_put_back(tmp_path, live_pid):
    dead = dead_pid()
    for name, text in [(f".ck.tmp-{dead}-x1", "partial"), (f".other.tmp-{dead}-x2", "partial"),
                       (f".ck.tmp-{live_pid}-x3", "being written"), (".ck.tmp-abc", "not our name"),
                       (f"notes.tmp-{dead}", "the user's"), (f".data.old-{dead}", "the only copy")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)
    # killed between moving the old `data` aside and renaming the new one in: `data` is missing
    cleaned = files.clean_leftovers(tmp_path)
    assert {p.name for p in cleaned} == {f".ck.tmp-{dead}-x1", f".other.tmp-{dead}-x2", f".data.old-{dead}"}
    assert tree(tmp_path) == {f".ck.tmp-{live_pid}-x3/f": "being written", ".ck.tmp-abc/f": "not our name",
                              f"notes.tmp-{dead}/f": "the user's", "data/f": "the only copy"}
    # killed after the new one was renamed in: the old copy goes
    (tmp_path / f".data.old-{dead}").mkdir()
    files.clean_leftovers(tmp_path, "data")
    assert not (tmp_path / f".data.old-{dead}").exists() and (tmp_path / "data/f").read_text() == "the only copy"


@pytest.mark.parametrize("meddle", ["create", "add a file", "replace"])
def test_a_destination_changed_during_the_write_is_left_as_it_is(tmp_path, meddle):
    dst = tmp_path / "out"
    if meddle != "create":
        dst.mkdir()
    with pytest.raises(files.DestinationError, match="changed while gpt2lab was writing"):
        with files.atomic_dir(dst) as tmp:
            (tmp / "ours").write_text("x")
            if meddle == "replace":
                dst.rmdir()
            dst.mkdir(exist_ok=True)  # another process, or the user, meanwhile
            (dst / "notes.txt").write_text("theirs")
    assert tree(tmp_path) == {"out/notes.txt": "theirs"}


def test_atomic_dir_accepts_relative_and_dotted_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    with files.atomic_dir("a/../b") as tmp:
        (tmp / "f").write_text("x")
    monkeypatch.chdir(tmp_path / "b")
    with files.atomic_dir(".") as tmp:  # the folder one stands in, replaced
        (tmp / "g").write_text("y")
    assert tree(tmp_path) == {"b/g": "y"}


def test_atomic_dir_cleans_its_own_leftovers_only(tmp_path):
    dead = dead_pid()
    (tmp_path / f".ck.tmp-{dead}-q").mkdir()
    (tmp_path / f".xy.tmp-{dead}-q").mkdir()
    with files.atomic_dir(tmp_path / "ck"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".xy.tmp-{dead}-q", "ck"]


def test_remove_dir_never_leaves_a_partial_folder_under_its_name(tmp_path, monkeypatch):
    (tmp_path / "step-1").mkdir()
    for name in ("config.json", "model.safetensors", "train_state.pt"):
        (tmp_path / "step-1" / name).write_text("x")

    def die_halfway(path, *a, **k):  # a kill -9 after one file went
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(files.shutil, "rmtree", die_halfway)
    with pytest.raises(KeyboardInterrupt):
        files.remove_dir(tmp_path / "step-1")
    assert not (tmp_path / "step-1").exists()
    [left] = tmp_path.iterdir()
    assert left.name.startswith(".step-1.tmp-")


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_folders_and_files_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        with files.atomic_dir(tmp_path / "ck") as tmp:
            (tmp / "a").write_text("x")
        files.atomic_write(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "ck" / "a").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o666 & ~mask


def test_files_that_writers_create_0600_get_the_umask_modes_too(tmp_path):
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o002)
    try:
        with files.atomic_dir(tmp_path / "ck") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ck" / "model.safetensors").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "ck" / "sub").stat().st_mode) == 0o775


# -- JSON lines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("torn", ['{"step": 3, "lo', '{"step": 3', '{', '\x00\x00'])
def test_a_torn_last_line_is_dropped_and_repaired(tmp_path, capsys, torn):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n' + torn)
    assert files.read_jsonl(path, TrainingError) == [{"step": 1}, {"step": 2}]
    assert "torn last line" in capsys.readouterr().err
    assert path.read_text().endswith(torn)  # reading alone changes nothing
    files.read_jsonl(path, TrainingError, repair=True)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_bad_line_inside_a_log_is_an_error_naming_it(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(TrainingError, match=r"m.jsonl, line 2: not valid JSON"):
        files.read_jsonl(path, TrainingError)


# -- destinations --------------------------------------------------------------------------------


def ours(folder: Path) -> bool:
    return (folder / "ours.json").is_file() and files.only_names(folder, ["ours.json", "w"])


def check(dst, force=False, sources=()):
    return files.check_destination(dst, what="thing", ours=ours, force=force, sources=sources)


def test_destination_rules(tmp_path):
    assert check(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check(tmp_path / "empty")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "ours.json").write_text("{}")
    with pytest.raises(files.DestinationError, match="pass --force"):
        check(mine)
    check(mine, force=True)
    (mine / "thesis.txt").write_text("years of work")  # one file of the user's: never ours again
    for force in (False, True):
        with pytest.raises(files.DestinationError, match="did not write.*thesis.txt"):
            check(mine, force=force)
    (tmp_path / "file").write_text("x")
    with pytest.raises(files.DestinationError, match="is a file"):
        check(tmp_path / "file", force=True)
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    with pytest.raises(files.DestinationError, match="training run"):
        check(run, force=True)
    (run / "checkpoints" / "step-00000001").rmdir()
    (run / files.LOCK_FILE).touch()
    with pytest.raises(files.DestinationError, match="training run"):
        check(run, force=True)
    for inside in ("checkpoints/step-00000001", "anything", "data/x"):
        with pytest.raises(files.DestinationError, match="lies inside the training run"):
            check(run / inside, force=True)
    for own in ("data", "merged"):  # a run's own subfolders: only the command holding the run writes them
        with pytest.raises(files.DestinationError, match="lies inside the training run"):
            check(run / own)
        with files.writing_inside(run):
            check(run / own)
    (tmp_path / "link").symlink_to(run / "checkpoints")  # through a symlink, the same folders
    with pytest.raises(files.DestinationError, match="lies inside the training run"):
        check(tmp_path / "link" / "step-00000001", force=True)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    (tmp_path / "ck" / "model.safetensors").write_text("")
    with pytest.raises(files.DestinationError, match="lies inside the checkpoint"):
        check(tmp_path / "ck" / "tokenizer", force=True)


@pytest.mark.parametrize("dst", ["src", "par", ".", "par/../par", "link"])
def test_a_destination_that_is_or_holds_the_source_is_refused(tmp_path, monkeypatch, dst):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "par" / "src").mkdir(parents=True)
    (tmp_path / "src").symlink_to(tmp_path / "par" / "src")
    (tmp_path / "link").symlink_to(tmp_path / "par")
    with pytest.raises(files.DestinationError, match="source"):
        check(dst, force=True, sources=["par/src"])


# -- locks ---------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from gpt2lab.files import FolderLock
    FolderLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    sys.stdin.readline()
""")


def test_a_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(files.LockedError, match=rf"in use by another gpt2lab process \(PID {holder.pid}\)"):
            files.FolderLock(tmp_path).acquire()
        holder.kill()  # kill -9: the kernel drops the lock, the stale file stays
        holder.wait()
        assert (tmp_path / files.LOCK_FILE).exists()
        with files.FolderLock(tmp_path):
            assert (tmp_path / files.LOCK_FILE).read_text().strip() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait()


# -- disk full -----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (mounting needs root; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_error_naming_the_path_and_leaves_nothing(small_disk):
    (small_disk / "ck").mkdir()
    (small_disk / "ck" / "a").write_text("old")
    with pytest.raises(files.DiskFullError) as e, files.atomic_dir(small_disk / "ck") as tmp:
        (tmp / "big").write_bytes(b"x" * 200_000)
    message = str(e.value)
    assert isinstance(e.value, GPT2LabError) and "\n" not in message
    assert f"while writing {small_disk / 'ck'}" in message and "MiB were written" in message
    assert tree(small_disk) == {"ck/a": "old"}
    with pytest.raises(files.DiskFullError, match="f.bin"):
        files.atomic_write(small_disk / "f.bin", b"x" * 200_000)
    assert sorted(p.name for p in small_disk.iterdir()) == ["ck"]
    with pytest.raises(files.DiskFullError, match=r"needs about 1\.0 MiB"):  # known sizes fail before writing
        with files.atomic_dir(small_disk / "other", needed=2**20):
            raise AssertionError("never reached")


def test_an_output_file_never_replaces_a_link_a_special_file_or_anything_inside_a_run(tmp_path):
    def out(path, **kw):
        return files.check_file_destination(path, flag="--out", replaceable=lambda p: p.read_text() == "ours",
                                            owner="gpt2lab eval", **kw)

    (tmp_path / "ours.json").write_text("ours")
    (tmp_path / "theirs.json").write_text("theirs")
    assert out(tmp_path / "ours.json") == tmp_path / "ours.json"  # its own output: replaced
    assert out(tmp_path / "new.json") == tmp_path / "new.json"
    (tmp_path / "link.json").symlink_to(tmp_path / "ours.json")
    os.mkfifo(tmp_path / "fifo")
    run = tmp_path / "run"
    run.mkdir()
    (run / files.LOCK_FILE).touch()
    for path, why in [("theirs.json", "did not write"), ("link.json", "symbolic link"), ("fifo", "named pipe"),
                      ("run/results.json", "inside the training run"), ("run", "is a folder"),
                      ("theirs.json/x.json", "is a file, not a folder")]:
        with pytest.raises(files.DestinationError, match=why):
            out(tmp_path / path)
    with pytest.raises(files.DestinationError, match="is the input"):
        out(tmp_path / "ours.json", sources=[tmp_path / "link.json"])
    assert (tmp_path / "theirs.json").read_text() == "theirs"
