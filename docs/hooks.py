"""mkdocs hook: the command-line reference page is written at build time from the commands themselves.

`reference/cli.md` holds the marker below; each build replaces it with the output of
`python -m gpt2lab COMMAND --help` for every entry of `gpt2lab.cli.COMMANDS`, so the page cannot
drift from the code and no generated text is committed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from mkdocs.exceptions import PluginError

MARKER = "<!-- gpt2lab-cli-reference -->"
PAGE = "reference/cli.md"


def command_help(command: str) -> str:
    """`gpt2lab COMMAND --help`, as a user would see it in a terminal 80 columns wide."""
    env = os.environ | {"COLUMNS": "80", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "gpt2lab", *command.split(), "--help"],
                          capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise PluginError(f"`gpt2lab {command} --help` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.rstrip()


def cli_reference() -> str:
    from gpt2lab.cli import COMMANDS

    names = list(COMMANDS)
    # Each help starts a Python that imports torch (a few seconds): two at a time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        helps = list(pool.map(command_help, names))
    sections = []
    for name, text in zip(names, helps, strict=True):
        # argparse prints the usage, a blank line, then the description: that paragraph heads the section.
        paragraphs = text.split("\n\n")
        summary = " ".join(paragraphs[1].split()) if len(paragraphs) > 1 else ""
        sections.append(f"## `gpt2lab {name}`\n\n{summary}\n\n```text\n{text}\n```\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs calls hooks by these names
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE} lost its marker {MARKER!r}: the CLI reference has nowhere to go")
    return markdown.replace(MARKER, cli_reference())
