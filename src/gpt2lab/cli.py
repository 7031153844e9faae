"""The `gpt2lab` command: one table from subcommand to a typed Python function.

Each function's signature becomes its arguments (parameters without a default are positional,
keyword-only ones and the rest are --options, a config dataclass parameter gives one --option per
field) and its docstring becomes the help, so the CLI and the Python API are the same functions.
A function's return value is printed: strings as they are, dicts as JSON.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import importlib
import inspect
import json
import os
import signal
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import GPT2LabError, Stopped

# subcommand (words separated by spaces for groups) -> "module:function" in gpt2lab.
# Modules are imported only for the subcommand that runs, so `gpt2lab tokenizer ...` starts fast.
COMMANDS: dict[str, str] = {
    "convert": "checkpoint:convert",
    "info": "checkpoint:info",
    "generate": "commands.generate:generate",
    "prepare": "data:prepare",
    "train": "commands.train:train",
    "demo": "demo:demo",
    "tokenizer encode": "commands.tokenizer:encode_files",
    "tokenizer decode": "commands.tokenizer:decode_ids",
    "tokenizer count": "commands.tokenizer:count_tokens",
    "tokenizer train": "commands.tokenizer:train_tokenizer",
    "eval": "commands.evaluate:evaluate",
    "finetune": "finetune:finetune",
    "lora merge": "finetune:merge",
}


def resolve_command(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(f"gpt2lab.{module}"), name)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so that what is half-written is removed on the way out;
    # training installs its own handler (save, then stop) while it runs.
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except _Terminated:
        print("gpt2lab: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # also while the command's modules are still being imported
        print("gpt2lab: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM, raised where the program is so that `finally` blocks and cleanups run."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _main(argv: list[str]) -> int:
    parser = build_parser(_selected(argv))
    args = vars(parser.parse_args(argv))
    args.pop("_given", None)
    func = args.pop("_func", None)
    if func is None:  # a group or nothing named: its commands, then what is wrong on one line
        parser.print_help()
        print("gpt2lab: error: no command given; choose one of the commands above", file=sys.stderr)
        return 2
    try:
        result = func(**_grouped(args))  # building a config validates it: inside the try
        if isinstance(result, str):
            print(result)
        elif result is not None:
            print(json.dumps(result, indent=2, default=str))
        sys.stdout.flush()
    except Stopped as e:  # a run that saved and stopped on a signal: its report, then 128 + the signal
        if e.report:
            print(e.report)
        print(f"gpt2lab: {e}", file=sys.stderr)
        return 128 + e.signum
    except GPT2LabError as e:
        print(f"gpt2lab: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + signal.SIGPIPE
    except OSError as e:  # the machine's answer about a path the user gave: permissions, a full disk, ...
        where = f": {e.filename}" if e.filename else " (standard output)" if e.errno == errno.ENOSPC else ""
        print(f"gpt2lab: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class _Repeatable(argparse.Action):
    """A list option: the values of every use, in order (`--x A --x B` and `--x A B` give [A, B]);
    the first use replaces the default rather than adding to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = namespace.__dict__.setdefault("_given", set())
        before = getattr(namespace, self.dest) if self.dest in given else []
        given.add(self.dest)
        setattr(namespace, self.dest, [*before, *values])


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: what is wrong, and where the help is."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _selected(argv: list[str]) -> list[str] | None:
    """The command names argv selects, so that only their modules are imported (None: all)."""
    words = [a for a in argv if not a.startswith("-")][:2]
    for n in (2, 1):
        name = " ".join(words[:n])
        if name in COMMANDS:
            return [name]
    return None


def build_parser(only: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="gpt2lab", description="Train, fine-tune, run, evaluate and serve GPT-2.")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
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
                groups[group[0]] = gp.add_subparsers(title=f"{group[0]} commands", metavar="COMMAND",
                                                     parser_class=_Parser)
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
    groups: dict[str, type] = {}
    for p in inspect.signature(func).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = hints.get(p.name, str)
        if (cls := _config_class(hint)) is not None:
            # A config dataclass parameter becomes one --option per field, its docstring the help;
            # an instance as the parameter's default supplies the defaults (e.g. the demo's settings).
            field_hints, field_docs = typing.get_type_hints(cls), _field_docs(cls)
            base = p.default if isinstance(p.default, cls) else None
            for f in dataclasses.fields(cls):
                if f.metadata.get("cli") is False:  # set by the function itself, not an option
                    continue
                default = getattr(base, f.name) if base is not None else f.default
                _add_option(parser, f.name, f"{p.name}.{f.name}", field_hints[f.name], default,
                            field_docs.get(f.name, ""))
            groups[p.name] = cls
        elif p.default is inspect.Parameter.empty and p.kind is not p.KEYWORD_ONLY:
            kind, choices, many = _arg_type(hint)
            parser.add_argument(p.name, type=kind, choices=choices, nargs="+" if many else None,
                                help=docs.get(p.name, "").replace("%", "%%"))
        else:  # keyword-only parameters without a default are required --options
            _add_option(parser, p.name, p.name, hint, p.default, docs.get(p.name, ""))
    parser.set_defaults(_groups=groups)


def _add_option(parser: argparse.ArgumentParser, name: str, dest: str, hint: Any, default: Any, help_: str) -> None:
    kind, choices, many = _arg_type(hint)
    flag = "--" + name.replace("_", "-")
    help_ = help_.replace("%", "%%")
    required = default is inspect.Parameter.empty or default is dataclasses.MISSING
    if kind is bool and not required:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_)
        return
    shown = f" (default: {default})" if not required and default not in (None, (), []) else ""
    if many:  # `--prompt A --prompt B` and `--prompt A B` both give [A, B]: a repeat never drops values
        default = None if required or default is None else list(default)
        parser.add_argument(flag, dest=dest, type=kind, choices=choices, required=required, action=_Repeatable,
                            metavar=None if choices else name.upper(), default=default, nargs="+",
                            help=help_ + " (repeatable)" + shown)
        return
    parser.add_argument(flag, dest=dest, type=kind, choices=choices, required=required,
                        metavar=None if choices else name.upper(),
                        default=None if required else default, help=help_ + shown)


def _config_class(hint: Any) -> type | None:
    """The dataclass that a `Config` or `Config | None` parameter takes, else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _field_docs(cls: type) -> dict[str, str]:
    """A dataclass's attribute docstrings (the string under each field), which Python does not keep.
    A subclass's fields inherit their bases' docstrings unless it redeclares them."""
    docs = {}
    for base in cls.__mro__[:0:-1]:
        if dataclasses.is_dataclass(base):
            docs |= _field_docs(base)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _grouped(args: dict[str, Any]) -> dict[str, Any]:
    """Parsed options with each config dataclass's fields gathered back into one instance."""
    for name, cls in args.pop("_groups", {}).items():
        prefix = f"{name}."
        fields = {key: args.pop(key) for key in [k for k in args if k.startswith(prefix)]}
        args[name] = cls(**{key.removeprefix(prefix): value for key, value in fields.items()})
    return args


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
