"""Griffe extension for the API page: gpt2lab's docstrings are plain text, not markdown.

They keep `name: what it is` lines for parameters and fields, `>>>` examples, and brackets such
as `hf:NAME[:CONFIG][@SPLIT]` that markdown would take for links. This shows each of them as
written: parameter lines as a list, examples as Python code, brackets as brackets.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

NAMED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*):\s+(?P<text>\S.*)$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def _escape(text: str) -> str:
    """Brackets escaped outside code spans, so that they stay text."""
    out, last = [], 0
    for m in CODE_SPAN.finditer(text):
        out.append(text[last:m.start()].replace("[", r"\[").replace("]", r"\]"))
        out.append(m.group(0))
        last = m.end()
    out.append(text[last:].replace("[", r"\[").replace("]", r"\]"))
    return "".join(out)


def plain_to_markdown(doc: str) -> str:
    lines = doc.splitlines()
    out: list[str] = []
    i, in_list = 0, False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):  # a doctest: the example and its output, as code
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i].strip())
                i += 1
            out += ["", "```python", *block, "```", ""]
            in_list = False
            continue
        m = NAMED.match(line) if i > 0 else None
        if m:
            if not in_list and out and out[-1].strip():
                out.append("")
            out.append(f"- `{m['name']}`: {_escape(m['text'])}")
            in_list = True
        elif in_list and line.startswith(" ") and line.strip():  # the item's continuation
            out.append("  " + _escape(line.strip()))
        elif line.startswith("    ") and line.strip():  # an indented block: shown as it is
            block = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                block.append(lines[i][4:])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```text", *block, "```", ""]
            in_list = False
            continue
        else:
            in_list = False
            out.append(_escape(line))
        i += 1
    return "\n".join(out)


class PlainDocstrings(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        todo = [pkg]
        while todo:
            obj = todo.pop()
            if obj.docstring is not None:
                obj.docstring.value = plain_to_markdown(obj.docstring.value)
            todo += [m for m in obj.members.values() if not m.is_alias]
