"""fetch: pinned packages, including one that must be downloaded by a pip of its own."""

import tarfile

from gpt2lab.fetch import Package, cache_dir, fetch_package, sha256_file


def test_a_package_is_downloaded_by_the_pip_it_names(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text("hello")
    archive = tmp_path / "gpt2lab-fetch-probe-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "a.txt", arcname="gpt2lab-fetch-probe-1.0/data/a.txt")
        tf.add(tmp_path / "a.txt", arcname="gpt2lab-fetch-probe-1.0/setup.py")
    # The pinned pip, as fetch_package leaves it in the cache: a stand-in that "downloads" the archive
    # above (the real pip could not: no index holds this package), so a fetch that works proves it ran.
    stub = cache_dir() / "packages" / "pip-0.0" / "pip"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "__main__.py").write_text(
        "import shutil, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[0] == 'download' and '--no-deps' in args and args[-1] == 'gpt2lab-fetch-probe==1.0'\n"
        f"shutil.copy({str(archive)!r}, args[args.index('-d') + 1])\n"
    )
    pkg = Package(name="gpt2lab-fetch-probe", version="1.0", sha256=sha256_file(archive), include=("data/*",),
                  pip=Package(name="pip", version="0.0", sha256="0" * 64))
    root = fetch_package(pkg)
    assert (root / "data" / "a.txt").read_text() == "hello"
    assert not (root / "setup.py").exists()
