"""The manual runs: every example in README.md and docs/ is executed, and the site builds.

Each fenced block tagged ```python, ```sh or ```console is a test, run in a folder of its own per
page that holds the small inputs the examples name (see `make_workspace`, and "The examples" in
docs/index.md). Blocks of one page run in order and share that folder; Python blocks of one page
also share one namespace. Shell blocks run under bash with the venv's `gpt2lab` first on PATH.
A console block's `$ ` lines are commands and the lines after each are its expected output
(stdout and stderr together; `...` matches anything).

An example that cannot run offline or in seconds (`make demo`, real GPT-2 weights, GPUs) is
preceded in the markdown by `<!-- no-test: REASON -->`, and shows here as skipped with that
reason. Every other fence must say it is not code to run (```text, ```json), so that nothing
runnable hides in an untagged one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNABLE = ("python", "sh", "console")
SHOWN = ("text", "json")  # shown to the reader, never run
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,})(?P<info>[^`]*)$")
NO_TEST = re.compile(r"^<!--\s*no-test:\s*(?P<reason>\S.*?)\s*-->$")
BIN = Path(sys.executable).parent  # the venv's bin: its python, gpt2lab and torchrun


# -- collecting the examples ---------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None  # the no-test reason

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def read_blocks(page: Path) -> list[Block]:
    """Every fenced block of a markdown page, with the no-test reason written just before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: a fence that never closes"
        above = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        skip = NO_TEST.match(above)
        code = "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"
        blocks.append(Block(page, i + 1, m["info"].strip().split(" ")[0], code, skip["reason"] if skip else None))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in read_blocks(page)]
EXAMPLES = [b for b in BLOCKS if b.lang in RUNNABLE]


def test_every_fence_says_whether_it_runs():
    untagged = [f"{b.name} ({b.lang or 'no language'})" for b in BLOCKS if b.lang not in RUNNABLE + SHOWN]
    assert not untagged, f"tag these fences {RUNNABLE} to run them, or {SHOWN} to show them: {untagged}"
    stray = [b.name for b in BLOCKS if b.skip and b.lang not in RUNNABLE]
    assert not stray, f"no-test markers before blocks that never run: {stray}"
    assert len(EXAMPLES) > 40 and {b.page.name for b in EXAMPLES} >= {"README.md", "tokenizer.md", "training.md"}


def test_no_test_markers_are_rare():
    """Skips are for what cannot run here (make demo, real GPT-2 weights, GPUs), not for examples that broke."""
    skipped = [b for b in EXAMPLES if b.skip]
    assert len(skipped) <= len(EXAMPLES) // 4, [f"{b.name}: {b.skip}" for b in skipped]


LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor, as Python-Markdown's toc extension (which mkdocs uses) makes it."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_readme_links_reach_the_manual():
    """mkdocs checks the links inside docs/ (strict, anchors included); this checks the README's."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [m["target"] for m in LINK.finditer(text) if "://" not in m["target"]]
    assert len(targets) > 10
    for target in targets:
        path, _, anchor = target.partition("#")
        page = ROOT / path
        assert page.is_file(), f"README links to {path}, which does not exist"
        if anchor:
            headings = [line.lstrip("#").strip() for line in page.read_text(encoding="utf-8").splitlines()
                        if line.startswith("#")]
            assert anchor in {slug(h) for h in headings}, f"README links to {target}: no such heading"


def test_layout_names_every_module():
    modules = {p.name for p in (ROOT / "src" / "gpt2lab").glob("*.py") if not p.name.startswith("__")}
    listed = set(re.findall(r"^src/gpt2lab/(\w+\.py) ", (ROOT / "docs/guide/layout.md").read_text(), re.MULTILINE))
    assert listed == modules, f"docs/guide/layout.md: add {sorted(modules - listed)}, drop {sorted(listed - modules)}"


# -- the folder the examples run in ------------------------------------------------------------

WORDS = {
    "name": ["the king", "the queen", "a fool", "the duke", "my lord", "the soldier", "a shepherd", "the lady"],
    "verb": ["speaks of", "waits for", "sings to", "looks upon", "remembers", "forgives", "follows", "calls"],
    "thing": ["the sea", "a crown", "the night", "an old friend", "the garden", "a letter", "the storm",
              "the morning", "a song", "the river"],
    "end": [".", "!", "?", ", and all is well.", ", but no one answers."],
}


def sentence(rng: random.Random) -> str:
    s = " ".join(rng.choice(WORDS[part]) for part in ("name", "verb", "thing")) + rng.choice(WORDS["end"])
    return s[0].upper() + s[1:]


def paragraph(rng: random.Random, n: int) -> str:
    return " ".join(sentence(rng) for _ in range(n))


def make_workspace(root: Path) -> None:
    """The inputs the examples name: docs/index.md ("The examples") lists them for the reader."""
    from gpt2lab import GPT, Tokenizer, preset, save_checkpoint

    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text("\n\n".join(paragraph(rng, 8) for _ in range(150)) + "\n")
    (root / "held_out.txt").write_text("\n\n".join(paragraph(rng, 8) for _ in range(10)) + "\n")
    (root / "my_texts").mkdir()
    for i in range(20):
        (root / "my_texts" / f"{i:02d}.txt").write_text("\n".join(paragraph(rng, 4) for _ in range(5)) + "\n")
    with open(root / "rows.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"id": i, "body": paragraph(rng, 5)}) + "\n")
    with open(root / "pairs.jsonl", "w") as f:
        for _ in range(40):
            who, thing = rng.choice(WORDS["name"]), rng.choice(WORDS["thing"]).capitalize()
            f.write(json.dumps({"prompt": f"What does {who} remember?", "completion": f" {thing}."}) + "\n")
    (root / "prompt.txt").write_text("The queen looks upon")
    with open(root / "lambada_test.jsonl", "w") as f:
        for _ in range(6):
            f.write(json.dumps({"text": paragraph(rng, 2).rstrip(".!?")}) + "\n")
    with open(root / "hellaswag_val.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"activity_label": "Walking", "ctx_a": paragraph(rng, 1), "ctx_b": "then he",
                                "endings": [sentence(rng) for _ in range(4)], "label": i % 4}) + "\n")
    examples = [{"input": f"What does {rng.choice(WORDS['name'])} remember?",
                 "target_scores": {t: float(j == 0) for j, t in enumerate(rng.sample(WORDS["thing"], 3))}}
                for _ in range(5)]
    (root / "task.json").write_text(json.dumps({"name": "remembering", "examples": examples}, indent=1))
    torch.manual_seed(0)
    save_checkpoint(GPT(preset("gpt2-nano", vocab_size=50257)), root / "ckpt", tokenizer=Tokenizer.gpt2())


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    os.environ.setdefault("GPT2LAB_CACHE", str(tmp_path_factory.getbasetemp().parent / "gpt2lab-test-cache"))
    root = tmp_path_factory.mktemp("docs-workspace") / "examples"
    make_workspace(root)
    return root


# -- running them ---------------------------------------------------------------------------------


@dataclass
class PageRun:
    """One page's examples, run in order in one folder; Python blocks share `namespace`."""

    folder: Path
    namespace: dict[str, Any] = field(default_factory=lambda: {"__name__": "__docs__"})
    done: set[int] = field(default_factory=set)
    failed: str | None = None


_RUNS: dict[Path, PageRun] = {}


def run_python(block: Block, run: PageRun) -> None:
    code = compile("\n" * block.line + block.code, str(block.page), "exec")  # tracebacks name the page's lines
    cwd = os.getcwd()
    os.chdir(run.folder)
    try:
        exec(code, run.namespace)
    finally:
        os.chdir(cwd)


def shell_env() -> dict[str, str]:
    return os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
                         "PYTHONUNBUFFERED": "1", "COLUMNS": "100"}


def run_sh(block: Block, run: PageRun) -> None:
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block.code], cwd=run.folder, env=shell_env(),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{block.name} exited {proc.returncode}\n--- script\n{block.code}--- stdout\n{proc.stdout[-4000:]}"
                    f"--- stderr\n{proc.stderr[-4000:]}", pytrace=False)


def console_steps(code: str) -> list[tuple[str, str]]:
    """(command, expected output) pairs of a console block."""
    steps: list[tuple[str, list[str]]] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"console output before any `$ ` command: {line!r}"
            steps[-1][1].append(line)
    return [(cmd, "\n".join(out)) for cmd, out in steps]


def matches(expected: str, actual: str) -> bool:
    """`actual` is `expected`, where `...` stands for any text (lines included); trailing spaces ignored."""
    def clean(s: str) -> str:
        return "\n".join(line.rstrip() for line in s.strip("\n").splitlines())
    pattern = ".*?".join(re.escape(part) for part in clean(expected).split("..."))
    return re.fullmatch(pattern, clean(actual), re.DOTALL) is not None


def run_console(block: Block, run: PageRun) -> None:
    for command, expected in console_steps(block.code):
        # No `set -e`: a line may show a failure and then its exit code (`...; echo "exit code $?"`).
        proc = subprocess.run(["bash", "-c", "set -o pipefail\n" + command], cwd=run.folder, env=shell_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.fail(f"{block.name}: `{command}` exited {proc.returncode}\n{proc.stdout[-4000:]}", pytrace=False)
        if expected.strip() and not matches(expected, proc.stdout):
            pytest.fail(f"{block.name}: `{command}` printed\n{proc.stdout}\n--- but the page shows\n{expected}",
                        pytrace=False)


RUNNERS = {"python": run_python, "sh": run_sh, "console": run_console}


def page_run(page: Path, workspace: Path, tmp_path_factory) -> PageRun:
    if page not in _RUNS:
        folder = tmp_path_factory.mktemp("docs-" + page.stem) / "work"
        shutil.copytree(workspace, folder)
        _RUNS[page] = PageRun(folder)
    return _RUNS[page]


@pytest.mark.slow
@pytest.mark.parametrize("block", [
    pytest.param(b, id=b.name, marks=[pytest.mark.skip(reason=f"no-test: {b.skip}")] if b.skip else [])
    for b in EXAMPLES
])
def test_example(block: Block, workspace: Path, tmp_path_factory):
    run = page_run(block.page, workspace, tmp_path_factory)
    # The blocks above this one first (when this one was selected alone): it builds on them.
    for earlier in [b for b in EXAMPLES if b.page == block.page and b.line <= block.line and not b.skip]:
        if earlier.line in run.done:
            continue
        if run.failed is not None:
            pytest.skip(f"the example at {run.failed} on this page failed first")
        try:
            RUNNERS[earlier.lang](earlier, run)
        except BaseException:
            run.failed = earlier.name
            raise
        run.done.add(earlier.line)


# -- the site ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_site_builds_without_warnings(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[docs]' to build the manual")
    site = tmp_path / "site"
    quiet = {"NO_COLOR": "1", "NO_MKDOCS_2_WARNING": "1"}  # the theme's end-of-life banner is not a build warning
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=os.environ | quiet)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-6000:]
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    from gpt2lab.cli import COMMANDS
    for command in COMMANDS:  # each command's own --help is on the page
        assert f"usage: gpt2lab {command} [-h]" in cli, command
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("load_model", "save_checkpoint", "Tokenizer", "TrainConfig", "Generator", "evaluate_model"):
        assert name in api, name
    assert not list(site.rglob("hooks.py")), "the build hook is not part of the site"
