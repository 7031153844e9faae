"""A local Hugging Face Hub for tests: huggingface_hub's real download path, against a thread on 127.0.0.1.

`LocalHub` serves model repos and dataset repos the way the Hub does for snapshot_download and
hf_hub_download (read in huggingface_hub's hf_api.py, file_download.py and _snapshot_download.py):
    GET  /api/{models,datasets}/{repo}/revision/{rev}   the commit (repo_info)
    GET  /api/{models,datasets}/{repo}/tree/{rev}[/dir]  the file list (list_repo_tree)
    HEAD, GET /{repo}/resolve/{rev}/{file}               a model's file (X-Repo-Commit, ETag, Content-Length)
    HEAD, GET /datasets/{repo}/resolve/{rev}/{file}      a dataset's file
and 404s with the Hub's X-Error-Code. huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE
when it is imported, so in a test process `point_at` sets its constants instead.

A repo is {"refs": {revision: commit}, "commits": {commit: {path: bytes}}}; paths may have folders.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from huggingface_hub import constants

from gpt2lab import hub


def commit(label: str) -> str:
    """A 40-hex commit id, the same for the same label."""
    return hashlib.sha1(label.encode()).hexdigest()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def one_commit(files: dict[str, bytes], label: str) -> dict:
    """A repo with one commit, on main."""
    return {"refs": {"main": commit(label)}, "commits": {commit(label): files}}


class LocalHub:
    """A Hub endpoint in a thread: enough of the API for snapshot_download and hf_hub_download,
    for model repos (`served`) and dataset repos (`datasets`)."""

    def __init__(self, served: dict, datasets: dict | None = None) -> None:
        self.served, self.datasets, self.requests = served, datasets or {}, []
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub_.answer(self, body=True)

            def do_HEAD(self) -> None:
                hub_.answer(self, body=False)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append((h.command, path))
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) > 1 and parts[1] in ("models", "datasets"):
            repos, repo, rest = self.datasets if parts[1] == "datasets" else self.served, parts[2:4], parts[4:]
        elif parts[0] == "datasets":
            repos, repo, rest = self.datasets, parts[1:3], parts[3:]
        else:
            repos, repo, rest = self.served, parts[0:2], parts[2:]
        repo = "/".join(repo)
        if repo not in repos:
            return self.send(h, 404, {"error": "Repository not found"}, code="RepoNotFound", body=body)
        record = repos[repo]
        if len(rest) < 2 or rest[0] not in ("revision", "tree", "resolve"):
            return self.send(h, 404, {"error": "not found"}, body=body)
        kind, rev, filename = rest[0], rest[1], "/".join(rest[2:])
        sha = record["refs"].get(rev, rev if rev in record["commits"] else None)
        if sha is None:
            return self.send(h, 404, {"error": f"Invalid rev id: {rev}"}, code="RevisionNotFound", body=body)
        files = record["commits"][sha]
        if kind == "revision":
            return self.send(h, 200, {"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]},
                             body=body)
        if kind == "tree":  # always recursive: snapshot_download asks for recursive=True
            under = filename.rstrip("/") + "/" if filename else ""
            return self.send(h, 200, [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                      for f, b in files.items() if f.startswith(under)], body=body)
        if filename not in files:
            return self.send(h, 404, {"error": "Entry not found"}, code="EntryNotFound", sha=sha, body=body)
        data = files[filename]
        h.send_response(200)
        h.send_header("X-Repo-Commit", sha)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, obj, *, code: str | None = None, sha: str | None = None,
             body: bool) -> None:
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if code:
            h.send_header("X-Error-Code", code)
        if sha:
            h.send_header("X-Repo-Commit", sha)
        h.end_headers()
        if body:
            h.wfile.write(data)

    def fetched(self) -> set[str]:
        """The names of the files downloaded (GET), of every repo."""
        return {p.rsplit("/", 1)[-1] for m, p in self.requests if m == "GET" and "/resolve/" in p}


def point_at(monkeypatch, url: str, cache: Path, *, offline: bool = False) -> None:
    """What HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE set when huggingface_hub is imported."""
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hub, "_downloaded", {})  # each test resolves afresh
