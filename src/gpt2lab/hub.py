"""Models by name from the Hugging Face Hub: `gpt2`, `openai-community/gpt2-xl`, `owner/name@revision`.

checkpoint.resolve calls `download` for a MODEL that is not an existing path and reads as a Hub name
(`is_hub_name`): an existing local path always wins. huggingface_hub fetches into its own cache, so
HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_HUB_OFFLINE and the login token (HF_TOKEN) work as for any
Hugging Face tool, and shows its progress bars. Only what gpt2lab reads is fetched: config.json and
the tokenizer files first (so a repo that is not GPT-2 costs no weights), then the safetensors
weights of the same commit. Pickled weights (.bin, .pt) are never downloaded.

The snapshot folder that comes back is an HF GPT-2 folder like any other. For OpenAI's own repos
the vocabulary is checked to be GPT-2's (the hash Tokenizer.gpt2() has), so a tampered or corrupt
download cannot tokenize differently from the model it claims to be.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import HubError

# The names OpenAI's checkpoints have always gone by, and where they live on the Hub now.
SHORT_NAMES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
OPENAI_REPOS = frozenset(SHORT_NAMES.values())
# config.json and the tokenizer files: everything checked before the weights are fetched.
META_PATTERNS = ["config.json", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json"]
# config.json too, so the pattern list always matches a file and huggingface_hub warns of nothing.
WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json"]
TOP_LEVEL_ONLY = ["*/*"]  # a repo's subfolders hold other formats (onnx/...), never the checkpoint
# `owner/name` as the Hub allows it, or a short name; then an optional @revision (a branch, tag or commit).
_NAME = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<revision>[^@\s]+))?")

_downloaded: dict[tuple[Any, ...], Path] = {}  # one look-up per name per process (a command resolves MODEL often)


def parse_name(name: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) for a Hub name such as `gpt2`, `owner/name` or `owner/name@v1`, else None."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    repo = m["repo"]
    if "/" not in repo:
        if repo not in SHORT_NAMES:
            return None  # a bare word is a missing local path, not a guess at a Hub repo
        repo = SHORT_NAMES[repo]
    if ".." in repo or "--" in repo or repo.endswith((".", "-")):
        return None
    return repo, m["revision"]


def is_hub_name(name: str | Path) -> bool:
    """Whether `name` reads as a Hub model name (checked only after a local path of that name is not found)."""
    return parse_name(str(name)) is not None


def download(name: str) -> Path:
    """The snapshot folder of Hub model `name` in the Hugging Face cache, downloaded if need be and
    checked to be a GPT-2 checkpoint; raises HubError, saying what to do, when it cannot be had."""
    parsed = parse_name(name)
    if parsed is None:
        raise HubError(f"{name} is not a Hub model name: give owner/name[@revision] or one of {', '.join(SHORT_NAMES)}")
    repo, revision = parsed
    from huggingface_hub import constants

    key = (repo, revision, constants.HF_HUB_CACHE, constants.ENDPOINT, constants.HF_HUB_OFFLINE)
    if key not in _downloaded:
        folder = _fetch(name, repo, revision, META_PATTERNS)
        _check_meta(name, repo, folder)
        # The weights of the very commit whose config was checked, even if the branch moved meanwhile.
        _fetch(name, repo, folder.name, WEIGHT_PATTERNS)
        _check_weights(name, folder)
        _downloaded[key] = folder
    return _downloaded[key]


def _fetch(name: str, repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns,
                                      ignore_patterns=TOP_LEVEL_ONLY))
    except RevisionNotFoundError as e:
        raise HubError(f"{name}: the Hub repo {repo} has no revision {revision!r}; "
                       "give a branch, tag or commit hash that exists") from e
    except GatedRepoError as e:
        raise HubError(f"{name}: the Hub repo {repo} is gated: accept its terms on its Hub page, then log in "
                       "(`hf auth login`) or set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"{name} is neither a local path nor a model on the Hub ({repo} not found; if it is "
                       "private, log in with `hf auth login` or set HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:  # also IncompleteSnapshotError: the cache holds only part of it
        where = f"{name} is not a local path, nor (fully) in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{where}, and HF_HUB_OFFLINE is set: download it once online, "
                           "or unset HF_HUB_OFFLINE") from e
        raise HubError(f"{where}, and the Hub ({constants.ENDPOINT}) cannot be reached: "
                       "check the connection (or HF_ENDPOINT), then try again") from e
    except HfHubHTTPError as e:
        response = getattr(e, "response", None)
        status = response.status_code if response is not None else "an error"
        raise HubError(f"{name}: the Hub ({constants.ENDPOINT}) answered {status} for {repo}; "
                       "try again later, or check HF_TOKEN") from e
    except OSError as e:  # the cache folder: no space, no permission
        raise HubError(f"{name}: cannot download into {constants.HF_HUB_CACHE} ({e}); "
                       "free space there or set HF_HOME to another folder") from e


def _check_meta(name: str, repo: str, folder: Path) -> None:
    """Refuse a repo that is not GPT-2, lacks a tokenizer, or (OpenAI's) has a vocabulary not GPT-2's."""
    config = folder / "config.json"
    if not config.is_file():
        raise HubError(f"{name}: the Hub repo {repo} has no config.json; it is not a transformers GPT-2 model")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise HubError(f"{name}: {repo}'s config.json is not a JSON object ({e})") from e
    if model_type != "gpt2":
        raise HubError(f"{name}: the Hub repo {repo} holds a {model_type!r} model, not GPT-2; "
                       "gpt2lab loads GPT-2 only")
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
            or (folder / "tokenizer.json").is_file()):
        raise HubError(f"{name}: the Hub repo {repo} has no tokenizer (vocab.json + merges.txt or tokenizer.json), "
                       "so its token ids cannot be read")
    if repo.lower() in OPENAI_REPOS:
        from .tokenizer import GPT2_SHA256, Tokenizer

        sha = Tokenizer.from_dir(folder).sha256
        if sha != GPT2_SHA256:
            raise HubError(f"{name}: the vocabulary downloaded from {repo} has sha256 {sha[:12]}..., not GPT-2's "
                           f"({GPT2_SHA256[:12]}...); delete it from the cache (`hf cache delete`) and download again")


def _check_weights(name: str, folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        raise HubError(f"{name}: the Hub repo has no safetensors weights (gpt2lab never downloads pickled "
                       ".bin/.pt files); convert it with transformers' save_pretrained(safe_serialization=True), "
                       "or use a repo that has model.safetensors")
