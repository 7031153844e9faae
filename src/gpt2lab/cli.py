"""The `gpt2lab` command: one table from subcommand to a typed Python function.

Each function's signature becomes its arguments (parameters without a default are positional,
the rest are --options) and its docstring becomes the help, so the CLI and the Python API are
the same functions. A function's return value is printed: strings as they are, dicts as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import GPT2LabError

# subcommand (words separated by spaces for groups) -> "module:function" in gpt2lab.
# Modules are imported only for the subcommand that runs, so `gpt2lab tokenizer ...` starts fast.
COMMANDS: dict[str, str] = {
    "convert": "checkpoint:convert",
    "info": "checkpoint:info",
    "prepare": "data:prepare",
    "tokenizer encode": "tokenizer:encode_files",
    "tokenizer decode": "tokenizer:decode_ids",
    "tokenizer count": "tokenizer:count_tokens",
    "tokenizer train": "tokenizer:train_tokenizer",
}


def resolve_command(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(f"gpt2lab.{module}"), name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_selected(argv))
    args = vars(parser.parse_args(argv))
    func = args.pop("_func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        result = func(**args)
    except (GPT2LabError, ValueError, FileNotFoundError) as e:
        print(f"gpt2lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpt2lab: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, str):
        print(result)
    elif result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _selected(argv: list[str]) -> list[str] | None:
    """The command names argv selects, so that only their modules are imported (None: all)."""
    words = [a for a in argv if not a.startswith("-")][:2]
    for n in (2, 1):
        name = " ".join(words[:n])
        if name in COMMANDS:
            return [name]
    return None


def build_parser(only: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2lab", description="Train, fine-tune, run, evaluate and serve GPT-2.")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    groups: dict[str, Any] = {}
    for name, target in COMMANDS.items():
        if only is not None and name not in only:
            continue
        func = resolve_command(target)
        *group, leaf = name.split()
        target = subparsers
        if group:
            if group[0] not in groups:
                gp = subparsers.add_parser(group[0], help=f"{group[0]} commands")
                groups[group[0]] = gp.add_subparsers(title=f"{group[0]} commands", metavar="COMMAND")
            target = groups[group[0]]
        summary, params = _parse_doc(func)
        sub = target.add_parser(leaf, help=summary, description=summary)
        _add_arguments(sub, func, params)
        sub.set_defaults(_func=func)
    return parser


def _parse_doc(func: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """The docstring's first line, and `name: help` lines describing parameters."""
    doc = inspect.getdoc(func) or ""
    lines = doc.splitlines()
    params: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, text = line.strip().partition(":")
        if sep and name.isidentifier():
            params[name] = text.strip()
    return (lines[0] if lines else ""), params


def _add_arguments(parser: argparse.ArgumentParser, func: Callable[..., Any], docs: dict[str, str]) -> None:
    hints = typing.get_type_hints(func)
    for p in inspect.signature(func).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind, choices, many = _arg_type(hints.get(p.name, str))
        help_ = docs.get(p.name, "")
        if p.default is inspect.Parameter.empty:
            parser.add_argument(p.name, type=kind, choices=choices, nargs="+" if many else None, help=help_)
            continue
        flag = "--" + p.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=p.default, help=help_)
        else:
            shown = f" (default: {p.default})" if p.default not in (None, (), []) else ""
            parser.add_argument(flag, dest=p.name, type=kind, choices=choices, default=p.default,
                                nargs="+" if many else None, help=help_ + shown)


def _arg_type(hint: Any) -> tuple[Any, list[Any] | None, bool]:
    """(converter, choices, takes several values) for a parameter's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _arg_type(inner[0])
    if origin is typing.Literal:
        choices = list(typing.get_args(hint))
        return type(choices[0]), choices, False
    if origin in (list, tuple):
        kind, choices, _ = _arg_type(typing.get_args(hint)[0])
        return kind, choices, True
    if hint is Path:
        return Path, None, False
    return (hint if hint in (int, float, bool) else str), None, False


if __name__ == "__main__":
    raise SystemExit(main())
