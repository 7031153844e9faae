"""Models by name from the Hub, through huggingface_hub's real download path against a local Hub.

`LocalHub` (tests/localhub.py) is a thread serving tiny GPT-2 repos (written by gpt2lab's own export_hf)
the way the Hub does for snapshot_download: GET /api/models/{repo}/revision/{rev} (the commit), GET
.../tree/{rev} (the file list), HEAD and GET /{repo}/resolve/{commit}/{file} (X-Repo-Commit, ETag,
Content-Length), and 404s with the Hub's X-Error-Code. huggingface_hub reads HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE when it is imported, so in this process the fixture sets its constants; the one
subprocess test sets the environment variables themselves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from localhub import LocalHub, commit, folder_files, point_at

from gpt2lab import hub
from gpt2lab.checkpoint import convert, export_hf, info, load_model, load_tokenizer, save_checkpoint
from gpt2lab.cli import main
from gpt2lab.config import GPTConfig
from gpt2lab.errors import HubError
from gpt2lab.generate import Generator
from gpt2lab.model import GPT
from gpt2lab.tokenizer import EOT, Tokenizer, Vocabulary

MAIN, V1 = "a" * 40, "b" * 40  # two commits of owner/tiny: main, and the tag v1 (other weights)
PICKLE = "pytorch_model.bin"


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict:
    """The served repos, {repo: {"refs": {revision: commit}, "commits": {commit: {file: bytes}}}},
    and the local folders they were made from."""
    root = tmp_path_factory.mktemp("hub-repos")
    gpt2 = Tokenizer.gpt2()
    tiny = dict(n_layer=1, n_head=2, n_embd=16, n_ctx=32, vocab_size=gpt2.vocab_size)
    torch.manual_seed(1)
    export_hf(GPT(GPTConfig(**tiny)), root / "tiny", tokenizer=gpt2)
    torch.manual_seed(2)
    export_hf(GPT(GPTConfig(**tiny)), root / "tiny-v1", tokenizer=gpt2)
    other = Tokenizer(Vocabulary(tokens=tuple([bytes([b]) for b in range(256)] + [EOT]), merges=()))
    export_hf(GPT(GPTConfig(**(tiny | {"vocab_size": other.vocab_size}))), root / "bytes", tokenizer=other)

    pickled = b"\x80 a pickle that must never be fetched"
    tiny_files = folder_files(root / "tiny") | {PICKLE: pickled}
    llama = tiny_files | {"config.json": json.dumps({"model_type": "llama", "hidden_size": 16}).encode()}
    no_safetensors = {k: v for k, v in tiny_files.items() if not k.endswith(".safetensors")}

    def one(files: dict[str, bytes], label: str) -> dict:
        return {"refs": {"main": commit(label)}, "commits": {commit(label): files}}

    served = {
        "owner/tiny": {"refs": {"main": MAIN, "v1": V1},
                       "commits": {MAIN: tiny_files, V1: folder_files(root / "tiny-v1") | {PICKLE: pickled}}},
        "openai-community/gpt2": one(tiny_files, "gpt2"),
        "openai-community/gpt2-medium": one(folder_files(root / "bytes"), "medium"),  # not GPT-2's vocabulary
        "owner/llama": one(llama, "llama"),
        "owner/pickled": one(no_safetensors, "pickled"),
    }
    return {"served": served, "tiny": root / "tiny", "tiny-v1": root / "tiny-v1"}


@pytest.fixture
def local_hub(repos, tmp_path, monkeypatch):
    server = LocalHub(repos["served"])
    point_at(monkeypatch, server.url, tmp_path / "hf" / "hub")
    yield server
    server.stop()


def logits(model: GPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[464, 3290, 318, 257, 1332]]))


def one_line_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    lines = capsys.readouterr().err.splitlines()
    # huggingface_hub's progress bars may come first (a download checked only once fetched)
    err = [line for line in lines if line.strip() and not re.match(r"Fetching \d+ files:", line)]
    assert len(err) == 1 and err[0].startswith("gpt2lab: error:"), lines
    return err[0]


# -- downloading ----------------------------------------------------------------------------------


def test_a_hub_name_loads_the_same_model_as_its_folder(local_hub, repos, capsys):
    model = load_model("owner/tiny")
    torch.testing.assert_close(logits(model), logits(load_model(repos["tiny"])), rtol=0, atol=0)
    assert load_tokenizer("owner/tiny").name == "gpt2"
    assert PICKLE not in local_hub.fetched()
    assert local_hub.fetched() == {"config.json", "model.safetensors", "vocab.json", "merges.txt",
                                   "tokenizer_config.json"}

    options = dict(max_new_tokens=3, greedy=True)
    named = Generator.load("owner/tiny", device="cpu").generate("hi", **options)[0]
    local = Generator.load(repos["tiny"], device="cpu").generate("hi", **options)[0]
    assert named.token_ids == local.token_ids
    assert main(["generate", "owner/tiny", "--prompt", "hi", "--max-new-tokens", "3", "--greedy"]) == 0
    via_name = capsys.readouterr().out
    assert main(["generate", str(repos["tiny"]), "--prompt", "hi", "--max-new-tokens", "3", "--greedy"]) == 0
    assert via_name == capsys.readouterr().out
    assert len([r for r in local_hub.requests if r[0] == "GET" and "/resolve/" in r[1]]) == 5  # each file once


def test_info_and_convert_take_a_hub_name(local_hub, repos, tmp_path):
    described = info("owner/tiny")
    assert described["format"] == "hf" and Path(described["path"]).name == MAIN
    assert convert("owner/tiny", str(tmp_path / "mine")) == f"wrote gpt2lab checkpoint to {tmp_path / 'mine'}"
    # Ours is stored untransposed, so the matmuls may round differently: close, not bit-equal.
    torch.testing.assert_close(logits(load_model(tmp_path / "mine")), logits(load_model(repos["tiny"])))
    assert load_tokenizer(tmp_path / "mine").name == "gpt2"


def test_the_short_name_is_openais_repo_and_its_vocabulary_is_checked(local_hub, repos):
    torch.testing.assert_close(logits(load_model("gpt2")), logits(load_model(repos["tiny"])), rtol=0, atol=0)
    assert any(p.startswith("/api/models/openai-community/gpt2/") for _, p in local_hub.requests)
    with pytest.raises(HubError, match="not GPT-2's"):
        load_model("gpt2-medium")  # a look-alike served under OpenAI's name with another vocabulary
    assert "model.safetensors" not in {p.rsplit("/", 1)[-1] for _, p in local_hub.requests if "medium" in p}


def test_the_cli_honours_hf_endpoint_and_hf_home(local_hub, repos, tmp_path):
    env = os.environ | {"HF_ENDPOINT": local_hub.url, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "0"}
    argv = [sys.executable, "-m", "gpt2lab", "generate", "owner/tiny", "--prompt", "hi", "--max-new-tokens", "3",
            "--greedy"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "home" / "hub" / "models--owner--tiny" / "snapshots" / MAIN / "model.safetensors").is_file()
    assert PICKLE not in local_hub.fetched()


def test_the_cache_serves_offline(local_hub, repos, monkeypatch):
    expected = logits(load_model("owner/tiny"))
    local_hub.stop()
    monkeypatch.setattr(hub, "_downloaded", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    torch.testing.assert_close(logits(load_model("owner/tiny")), expected, rtol=0, atol=0)
    monkeypatch.setattr(hub, "_downloaded", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, but the Hub is unreachable: the cache too
    torch.testing.assert_close(logits(load_model("owner/tiny")), expected, rtol=0, atol=0)


def test_a_revision_pin(local_hub, repos, capsys):
    v1 = logits(load_model(repos["tiny-v1"]))
    torch.testing.assert_close(logits(load_model("owner/tiny@v1")), v1, rtol=0, atol=0)
    torch.testing.assert_close(logits(load_model(f"owner/tiny@{V1}")), v1, rtol=0, atol=0)
    assert not torch.equal(logits(load_model("owner/tiny")), v1)
    assert "no revision 'v9'" in one_line_error(capsys, "info", "owner/tiny@v9")


def test_a_local_folder_wins_over_the_hub(local_hub, repos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(3)
    mine = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, n_ctx=8, vocab_size=300))
    save_checkpoint(mine, Path("owner") / "tiny")
    assert load_model("owner/tiny").config.n_embd == 8
    assert local_hub.requests == []


# -- errors: one line each, saying what to do -------------------------------------------------------


def test_offline_and_not_cached(local_hub, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in one_line_error(capsys, "info", "owner/tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    local_hub.stop()
    assert "cannot be reached" in one_line_error(capsys, "info", "owner/tiny")


@pytest.mark.parametrize(("name", "says"), [
    ("owner/nothing", "neither a local path nor a model on the Hub"),
    ("owner/llama", "holds a 'llama' model, not GPT-2"),
    ("owner/pickled", "no safetensors weights"),
    ("gpt2-medium", "not GPT-2's"),
])
def test_a_repo_that_cannot_be_used(local_hub, capsys, name, says):
    assert says in one_line_error(capsys, "info", name)
    assert PICKLE not in local_hub.fetched()


def test_names():
    assert hub.parse_name("gpt2") == ("openai-community/gpt2", None)
    assert hub.parse_name("gpt2-xl@main") == ("openai-community/gpt2-xl", "main")
    assert hub.parse_name("owner/name@refs/pr/1") == ("owner/name", "refs/pr/1")
    for not_a_name in ("runs", "./owner/name", "/abs/path", "a/b/c", "owner/na..me", "owner/", "gpt3"):
        assert hub.parse_name(not_a_name) is None, not_a_name
