"""How gpt2lab writes to disk: the one owner of atomic writes, destinations, locks and leftovers.

The promises (docs/guide/files.md):
- A folder or file gpt2lab writes appears under its name only once it is complete: it is
  written under a temporary name beside it (`.NAME.tmp-PID-XXXX`) and renamed into place.
- A destination that holds files gpt2lab did not write is refused, never replaced; one that
  gpt2lab wrote is replaced only when asked (`--force`), never the source or a folder holding it.
- A run folder has one writer at a time, under an exclusive lock.
- What a crash leaves behind (temporary folders of processes that no longer run, a torn last
  line of a log) is recognised by name and owner and cleaned up, or repaired, on the next run.
- Running out of disk space is an error that names the path and leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from .errors import GPT2LabError

LOCK_FILE = ".gpt2lab.lock"  # in every run folder: what marks it as one (see is_run_folder)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?$")


class DestinationError(GPT2LabError, ValueError):
    """A destination that gpt2lab will not write: it holds the user's files, the source, or a run."""


class DiskFullError(GPT2LabError, OSError):
    """The disk filled while gpt2lab was writing; nothing half-written was left behind."""


class LockedError(GPT2LabError, RuntimeError):
    """A folder is being written by another gpt2lab process."""


# -- permissions, liveness, leftovers ----------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OverflowError:
        return False
    return True


def clean_leftovers(parent: str | Path, name: str | None = None) -> list[Path]:
    """Remove what killed gpt2lab processes left in `parent`; return what was cleaned.

    Only gpt2lab's own names count (`.NAME.tmp-PID-*`, `.NAME.old-PID`), and only when process PID
    no longer runs. A `.NAME.old-PID` is the previous complete version of NAME, moved aside just
    before the new one was renamed in: if NAME is missing (killed between the two renames) it is
    put back, otherwise it is removed. `name` limits the cleaning to leftovers of that one entry.
    """
    parent = Path(parent)
    cleaned: list[Path] = []
    if not parent.is_dir():
        return cleaned
    for entry in sorted(parent.iterdir()):
        m = _LEFTOVER.match(entry.name)
        if m is None or (name is not None and m["name"] != name) or pid_alive(int(m["pid"])):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and not target.exists():
            entry.rename(target)
        else:
            _remove(entry)
        cleaned.append(entry)
    return cleaned


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_dir(path: str | Path) -> None:
    """Delete a folder so that no crash can leave it looking whole: it is renamed to a hidden
    leftover name first (one atomic step), then deleted; clean_leftovers finishes a killed delete."""
    path = Path(path)
    aside = path.with_name(f".{path.name}.tmp-{os.getpid()}-deleting")
    path.rename(aside)
    shutil.rmtree(aside)


# -- atomic writes -----------------------------------------------------------------------------


def _finish_tree(folder: Path) -> None:
    """Data on disk before the rename makes it visible, with the modes the user's umask gives
    (some writers, safetensors among them, create their files 0600 whatever the umask)."""
    mask = _umask()
    for f in folder.rglob("*"):
        if f.is_symlink():
            continue
        if f.is_dir():
            os.chmod(f, 0o777 & ~mask)
        elif f.is_file():
            os.chmod(f, 0o666 & ~mask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def absolute(path: str | Path) -> Path:
    """`path` made absolute with `.` and `..` resolved by name (`nonexist/../x` is `x`); symlinks are kept."""
    return Path(os.path.abspath(Path(path).expanduser()))


def _identity(path: Path) -> tuple[int, int] | None:
    """What is at `path` now (inode, change time), to notice that someone wrote there meanwhile."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _out_of_space(e: BaseException, folder: Path) -> bool:
    """Whether a write failed because the disk is full. Not every writer says so: safetensors and
    torch.save wrap ENOSPC in their own errors, so a failed write on a full disk counts too."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(e, Exception):  # KeyboardInterrupt and the like are never the disk's doing
        return False
    try:
        return shutil.disk_usage(folder).free < 64 * 1024
    except OSError:
        return False


def disk_full(path: Path, written: int, needed: int | None = None) -> DiskFullError:
    """The one-line error for ENOSPC while writing `path`."""
    free = shutil.disk_usage(_existing(path)).free
    need = (f"it needs about {needed / 2**20:.1f} MiB" if needed
            else f"{written / 2**20:.1f} MiB were written before the disk filled")
    return DiskFullError(f"no space left on the device while writing {path}: {need}, {free / 2**20:.1f} MiB are "
                         "free there; nothing was left half-written. Free some space, or write elsewhere")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_space(path: str | Path, needed: int) -> None:
    """Raise DiskFullError now, before writing, if `needed` bytes cannot fit where `path` goes."""
    path = Path(path)
    if shutil.disk_usage(_existing(path)).free < needed:
        raise disk_full(path, 0, needed)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` only once the block completes.

    An existing `path` is moved aside first and removed only after the new folder is in place,
    so a crash at any point leaves the old or the new folder (clean_leftovers puts an old one
    back if need be), never a partial one. Callers check the destination first (check_destination).
    `needed`: the bytes the folder will take, if known, checked against the free space first.
    """
    path = absolute(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path.parent, path.name)
    before = _identity(path)
    if needed is not None:
        check_space(path, needed)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the user's umask decides
    try:
        yield tmp
        _finish_tree(tmp)
        if _identity(path) != before:  # someone wrote there meanwhile: what they wrote stays
            raise DestinationError(f"{path} changed while gpt2lab was writing it (another process, or by hand); "
                                   "it was left as it is and nothing was written: check it, then run again")
        old = None
        if before is None:  # a new destination: never replace what appeared meanwhile
            try:
                os.rename(tmp, path)  # fails on a non-empty folder that another process just renamed in
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise DestinationError(f"{path} appeared while gpt2lab was writing it (another process?); it was "
                                       "left as it is and nothing was written: check it, then run again") from None
        else:
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
        _fsync_dir(path.parent)
        if old is not None:
            _remove(old)
    except BaseException as e:
        written, full = _tree_bytes(tmp), _out_of_space(e, path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full(path, written, needed) from None
        raise


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write one file atomically: text, bytes, or a function that writes the temporary path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written, full = (tmp.stat().st_size if tmp.is_file() else 0), _out_of_space(e, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full(path, written) from None
        raise
    return path


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log. A crash can tear only this last line, which read_jsonl repairs."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(path, 0) from None
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically."""
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


# -- records -----------------------------------------------------------------------------------


def read_json(path: str | Path, error: type[GPT2LabError], what: str = "file") -> Any:
    """Parse a JSON file, raising `error` with a one-line message naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder, expected a JSON {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); the {what} is corrupt") from None


def read_record(path: str | Path, *, format: str, version: int, error: type[GPT2LabError],
                what: str = "record") -> dict[str, Any]:
    """A versioned JSON record {"format": FORMAT, "version": N, ...}: checked, or `error`."""
    rec = read_json(path, error, what)
    if not isinstance(rec, dict) or rec.get("format") != format:
        raise error(f"{path} is not a gpt2lab {what} (format {format!r})")
    if not isinstance(rec.get("version"), int):
        raise error(f"{path} has no integer version; the {what} is corrupt")
    if rec["version"] > version:
        raise error(f"{path} was written by a newer gpt2lab ({what} version {rec['version']}); upgrade gpt2lab")
    return rec


def is_record(path: str | Path, format: str) -> bool:
    """Whether `path` is a JSON file whose "format" is `format` (never raises)."""
    try:
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(rec, dict) and rec.get("format") == format


def read_jsonl(path: str | Path, error: type[GPT2LabError], *, repair: bool = False) -> list[Any]:
    """The rows of a JSON-lines log. A last line that a crash cut short (no newline, not JSON) is
    dropped with a warning, and with `repair` also cut from the file; a bad line elsewhere is `error`."""
    path = Path(path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows: list[Any] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == len(lines) - 1:  # no newline after it: a write that a crash cut short
                print(f"gpt2lab: warning: {path}: dropped a torn last line (a crash mid-write)", file=sys.stderr)
                if repair:
                    atomic_write(path, raw[: len(raw) - len(line)])
                break
            raise error(f"{path}, line {i + 1}: not valid JSON ({e}); fix or delete that line") from None
    return rows


# -- destinations ------------------------------------------------------------------------------


def is_run_folder(path: str | Path) -> bool:
    """A training run's folder: it holds gpt2lab's lock file, or checkpoints/step-* folders."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / LOCK_FILE).is_file():
        return True
    ckpts = path / "checkpoints"
    return ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir())


# Folders a command writes inside a run of its own (fine-tuning's prepared data, a merged model).
RUN_SUBFOLDERS = ("data", "data-val", "merged")


def _gpt2lab_kind(folder: Path) -> str | None:
    """What kind of gpt2lab folder `folder` is (a run, a checkpoint, a data folder), or None."""
    if is_run_folder(folder):
        return "training run"
    if (folder / "config.json").is_file() and any((folder / n).is_file() for n in (
            "model.safetensors", "train_state.pt", "model.safetensors.index.json")):
        return "checkpoint"
    if (folder / "adapter.json").is_file():
        return "LoRA adapter"
    if is_record(folder / "manifest.json", "gpt2lab-tokens"):
        return "prepared data folder"
    return None


_OWN_RUN: ContextVar[Path | None] = ContextVar("gpt2lab_own_run", default=None)


@contextlib.contextmanager
def writing_inside(run: Path) -> Iterator[None]:
    """Let the command that holds `run` write the run's own subfolders (RUN_SUBFOLDERS) meanwhile."""
    token = _OWN_RUN.set(Path(os.path.realpath(run)))
    try:
        yield
    finally:
        _OWN_RUN.reset(token)


def enclosing_folder(path: str | Path) -> tuple[Path, str] | None:
    """The gpt2lab folder (run, checkpoint, data) that `path` lies inside, and its kind; None if
    none. Both the path as given and with symlinks resolved are checked. Only the command holding a
    run (writing_inside) may write that run's own subfolders (RUN_SUBFOLDERS)."""
    given, real = absolute(path), Path(os.path.realpath(absolute(path)))
    for path in (given, real):
        for parent in path.parents:
            if (kind := _gpt2lab_kind(parent)) is not None:
                own = _OWN_RUN.get()
                if (kind == "training run" and path.parent == parent and path.name in RUN_SUBFOLDERS
                        and own is not None and own == Path(os.path.realpath(parent))):
                    break
                return parent, kind
    return None


def _contains(outer: Path, inner: Path) -> bool:
    outer, inner = outer.resolve(), inner.resolve()
    return outer == inner or outer in inner.parents


def check_destination(dst: str | Path, *, what: str, ours: Callable[[Path], bool], force: bool,
                      sources: Iterable[str | Path] = (), flag: str = "--force") -> Path:
    """Refuse to write `what` into `dst` unless nothing the user wrote can be lost.

    Refused always: a file; a training run folder; a source, or a folder that holds one; a
    non-empty folder that `ours` does not recognise as the same kind of thing gpt2lab wrote.
    Refused without `force`: a folder gpt2lab wrote. A missing or empty folder is fine.
    """
    dst = absolute(dst)
    if (inside := enclosing_folder(dst)) is not None:
        raise DestinationError(f"{dst} lies inside the {inside[1]} {inside[0]}; writing there would change it: "
                               "choose a destination outside it")
    for src in sources:
        if Path(src).exists() and _contains(dst, Path(src)):
            same = dst.resolve() == Path(src).resolve()
            raise DestinationError(f"{dst} {'is' if same else 'holds'} the source {src}; writing there would "
                                   "destroy it: choose another destination")
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"{dst} is a file; give the path of a new or empty folder")
    if not dst.is_dir() or not any(dst.iterdir()):
        return dst
    if is_run_folder(dst):
        raise DestinationError(f"{dst} is a training run folder; gpt2lab never replaces one: "
                               "choose another destination")
    if not ours(dst):
        names = sorted(p.name for p in dst.iterdir())
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise DestinationError(f"{dst} holds files gpt2lab did not write ({shown}); gpt2lab never replaces them: "
                               "give a new or empty folder")
    if not force:
        raise DestinationError(f"{dst} already holds a {what}; pass {flag} to replace it, or choose another folder")
    return dst


_NOT_REGULAR = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def check_file_destination(path: str | Path, *, flag: str, error: type[GPT2LabError] = DestinationError,
                           force: bool = False, replaceable: Callable[[Path], bool] | None = None,
                           owner: str = "gpt2lab", what: str = "a file to write", sources: Iterable[str | Path] = (),
                           keep: Mapping[str, str | Path] | None = None) -> Path:
    """check_destination for one output file, written by atomic_write (a rename over `path`).

    Refused always: a folder; a path under a file or in a folder that cannot be written; a path
    inside a gpt2lab run, checkpoint or data folder; a link, FIFO, device or socket (the rename
    would replace the node itself, not write to what it stands for); a source, a file inside a
    source folder or a `keep` folder (description -> folder), or the file standard input reads.
    An existing regular file is replaced when `replaceable` recognises it as `owner`'s output, or
    (without `replaceable`) with `force`.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise error(f"{flag} {path} is a folder; give the path of {what}, e.g. {path / 'out.json'}")
    folder = next(p for p in absolute(path).parents if p.exists())  # where missing folders would be made
    if not folder.is_dir():
        raise error(f"{flag} {path}: {folder} is a file, not a folder; choose a path inside a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"{flag} {path}: {folder} is not writable; choose a folder you can write to")
    if (inside := enclosing_folder(path)) is not None:
        raise error(f"{flag} {path} lies inside the {inside[1]} {inside[0]}; writing there would change it: "
                    "choose a path outside it")
    sources = list(sources)
    for what, folder in [*(("the input folder", s) for s in sources), *(keep or {}).items()]:
        if Path(folder).is_dir() and absolute(path).is_relative_to(absolute(folder)):
            raise error(f"{flag} {path} is inside {what} {folder}; writing there could destroy it: "
                        "choose another path")
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return path
    if stat.S_ISLNK(st.st_mode):
        raise error(f"{flag} {path} is a symbolic link (to {os.readlink(path)}); gpt2lab never replaces "
                    "a link: give the path of a regular file, or a new one")
    if not stat.S_ISREG(st.st_mode):
        kind = _NOT_REGULAR.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise error(f"{flag} {path} is {kind}; gpt2lab writes its output by renaming a new file over "
                    "the path, which would replace it: give the path of a regular file, or a new one")
    same = (st.st_dev, st.st_ino)  # the same inode, not the same name: a link or another spelling
    for src in sources:
        if _inode(src) == same:
            raise error(f"{flag} {path} is the input {src}; writing there would destroy it: choose another path")
    if _inode(sys.stdin) == same:
        raise error(f"{flag} {path} is the file standard input reads; writing there would destroy it: "
                    "choose another path")
    if replaceable is not None:
        if not replaceable(path):
            raise error(f"{flag} {path} is a file that {owner} did not write; gpt2lab never replaces it: "
                        "choose another path")
    elif not force:
        raise error(f"{flag} {path} already exists; pass --force to replace it, or choose another path")
    return path


def _inode(file: str | Path | Any) -> tuple[int, int] | None:
    """(device, inode) of a path (links followed) or an open stream; None where there is none."""
    try:
        st = os.stat(file) if isinstance(file, str | os.PathLike) else os.fstat(file.fileno())
    except (AttributeError, OSError, ValueError):  # missing; stdin None, a StringIO, or closed
        return None
    return st.st_dev, st.st_ino


def only_names(folder: Path, allowed: Iterable[str]) -> bool:
    """Whether every entry of `folder` is one of `allowed` (what one kind of gpt2lab folder holds)."""
    allowed = set(allowed)
    return all(p.name in allowed for p in folder.iterdir())


# -- locks -------------------------------------------------------------------------------------


class FolderLock:
    """An exclusive lock on a folder (flock on FOLDER/.gpt2lab.lock), held by one process.

    The kernel drops a flock when its process dies, however it dies, so a lock left by a killed
    run never blocks the next one; the file keeps the holder's PID for the error message.
    """

    def __init__(self, folder: str | Path, what: str = "folder") -> None:
        self.path = Path(folder) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full(self.path, 0) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"{self.path.parent} is in use by another gpt2lab process (PID {holder}); wait for "
                              f"it to finish or stop it, or choose another {self.what}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            if e.errno == errno.ENOSPC:
                raise disk_full(self.path, 0) from None
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
