"""The `gpt2lab` command, built by tyro from the command functions' typed signatures and docstrings.

Each command is a function in gpt2lab.commands: its positional-only parameters are the arguments,
the rest are --options (a config dataclass gives one option per field, `--lora.rank` for a nested
one), its docstring is the help. Repeating a list option appends (`--prompt A --prompt B`). Any
command also reads options from a YAML file, `--config run.yaml`; the command line wins over it.
A command's return value is printed: strings as they are, dicts as JSON.

tyro was chosen over jsonargparse (litgpt's) because it keeps the GNU conventions this CLI had
from the start: --dashed-names, --flag/--no-flag switches, and several values after one option.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import io
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, GPT2LabError, Stopped

PROG = "gpt2lab"
DESCRIPTION = ("Train, fine-tune, run, evaluate and serve GPT-2. Every command also takes --config FILE: "
               "a YAML file of its options (the command line wins).")

# subcommand (words separated by spaces for groups) -> "module:function" in gpt2lab.commands.
# Modules are imported only for the subcommand that runs, so `gpt2lab tokenizer ...` starts fast.
COMMANDS: dict[str, str] = {
    "prepare": "prepare:prepare",
    "train": "train:train",
    "finetune": "finetune:finetune",
    "generate": "generate:generate",
    "eval": "evaluate:evaluate",
    "serve": "serve:serve",
    "demo": "demo:demo",
    "convert": "checkpoint:convert",
    "info": "checkpoint:info",
    "tokenizer encode": "tokenizer:encode_files",
    "tokenizer decode": "tokenizer:decode_ids",
    "tokenizer count": "tokenizer:count_tokens",
    "tokenizer train": "tokenizer:train_tokenizer",
    "lora merge": "finetune:merge",
}
GROUPS = {"tokenizer": "encode, decode and count tokens; learn a BPE vocabulary",
          "lora": "LoRA adapters: merge one into a plain checkpoint"}


def resolve_command(name: str) -> Callable[..., Any]:
    module, _, function = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(f"gpt2lab.commands.{module}"), function)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so that what is half-written is removed on the way out;
    # training installs its own handler (save, then stop) while it runs.
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except _Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # also while the command's modules are still being imported
        print(f"{PROG}: interrupted", file=sys.stderr)
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
    try:
        call = parse(argv)
        result = call()
        if isinstance(result, str):
            print(result)
        elif result is not None:
            print(json.dumps(result, indent=2, default=str))
        sys.stdout.flush()
    except Stopped as e:  # a run that saved and stopped on a signal: its report, then 128 + the signal
        if e.report:
            print(e.report)
        print(f"{PROG}: {e}", file=sys.stderr)
        return 128 + e.signum
    except GPT2LabError as e:
        print(f"{PROG}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + signal.SIGPIPE
    except OSError as e:  # the machine's answer about a path the user gave: permissions, a full disk, ...
        where = f": {e.filename}" if e.filename else " (standard output)" if e.errno == errno.ENOSPC else ""
        print(f"{PROG}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


class UsageError(ConfigError):
    """The command line (or its --config file) does not fit the command: tyro's message, on one line."""


def parse(argv: list[str]) -> Callable[[], Any]:
    """The command argv names, with its arguments bound: call it to run the command.
    `--help` prints the help and exits 0; a command line that does not fit raises UsageError."""
    from tyro.extras import SubcommandApp

    name = _selected(argv)
    argv = _with_config_file(argv, name)
    if name is not None:
        argv = _merge_repeats(argv, _list_options(resolve_command(name)))
    app, groups = SubcommandApp(), {}
    for command in [name] if name else COMMANDS:
        *group, leaf = command.split()
        into = app
        if group:
            if group[0] not in groups:
                groups[group[0]] = SubcommandApp()
                app.command(groups[group[0]], name=group[0], help=GROUPS[group[0]])
            into = groups[group[0]]
        into.command(_deferred(resolve_command(command)), name=leaf)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            # tyro calls the command function it chose; _deferred makes that call return the bound
            # command instead of running it, so that only parsing happens with stderr captured.
            return app.cli(prog=PROG, description=DESCRIPTION, args=argv)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise UsageError(_usage_message(errors.getvalue(), name)) from None


def _deferred(func: Callable[..., Any]) -> Callable[..., Callable[[], Any]]:
    @functools.wraps(func)  # tyro reads the signature, type hints and docstring through __wrapped__
    def bind(*args: Any, **kwargs: Any) -> Callable[[], Any]:
        return functools.partial(func, *args, **kwargs)

    return bind


_BORDER = set("╭╮╰╯─━┏┓┗┛+-=│┃| ")
_GENERIC = r"(Value error|Required options|Invalid choice|Unrecognized options)"  # titles the text repeats


def _usage_message(text: str, command: str | None = None) -> str:
    """tyro's error (a box on a terminal, ruled sections when piped) as one line: what is wrong, and
    where the help is. Its first line is the title; an argument's help text after it is left to --help."""
    lines = [line.strip().strip("╭╮╰╯─━┏┓┗┛+-│┃| ") for line in text.splitlines()
             if line.strip() and not set(line.strip()) <= _BORDER]
    words, see = [], False
    for n, line in enumerate(lines):
        if line.startswith(("Argument helptext", "For full helptext")):
            see = True
            break
        words.append(f"{line}:" if n == 0 else line)
    message = _one_line(" ".join(words))
    message = re.sub(rf"^{_GENERIC}: ", "", message)
    # A nested config's check reads "Error parsing __tyro-dummy-inner__.config.lora: <gpt2lab's message>".
    message = re.sub(r"Error parsing [^\s:]*(config|__tyro)[^\s:]*: ", "", message) or "bad command line"
    return f"{message} (see {PROG}{' ' + command if command else ''} --help)" if see else message


def _selected(argv: list[str]) -> str | None:
    """The command argv's first words name, or None (then every command is built, for the help)."""
    words = []
    for arg in argv[:2]:
        if arg.startswith("-"):
            break
        words.append(arg)
    for n in (2, 1):
        name = " ".join(words[:n])
        if len(words) >= n and name in COMMANDS:
            return name
    return None


def _list_options(func: Callable[..., Any]) -> set[str]:
    """The --options of a command that take several values (`prompt`, `lora.targets`), as tyro names them."""
    import dataclasses
    import types
    import typing

    def walk(hints: dict[str, Any], prefix: str) -> Iterator[str]:
        for name, hint in hints.items():
            flag = name.replace("_", "-")
            for extra in getattr(hint, "__metadata__", ()):  # Annotated[T, tyro.conf.arg(name=...)]
                flag = getattr(extra, "name", None) if getattr(extra, "name", None) is not None else flag
            hint = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            if dataclasses.is_dataclass(hint):
                fields = typing.get_type_hints(hint, include_extras=True)
                yield from walk(fields, f"{prefix}{flag}." if flag else prefix)
            elif typing.get_origin(hint) in (list, tuple):
                yield prefix + flag

    hints = typing.get_type_hints(func, include_extras=True)
    hints.pop("return", None)
    return set(walk(hints, ""))


def _merge_repeats(argv: list[str], lists: set[str]) -> list[str]:
    """`--prompt A --prompt B` as `--prompt A B`: tyro would keep only the last use of a list option."""
    segments: list[list[str]] = []
    uses: dict[str, list[str]] = {}  # list option -> its segment: the flag and every value given
    i = 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        name = arg[2:].partition("=")[0].replace("_", "-") if arg.startswith("--") else ""
        if name not in lists:
            segments.append([arg])
            continue
        values = [arg.partition("=")[2]] if "=" in arg else []
        while "=" not in arg and i < len(argv) and not argv[i].startswith("-"):
            values.append(argv[i])
            i += 1
        if not values:  # left as it was: tyro says what is missing
            segments.append([arg])
        elif name in uses:
            uses[name] += values
        else:
            uses[name] = [f"--{name}", *values]
            segments.append(uses[name])
    return [arg for segment in segments for arg in segment]


def _with_config_file(argv: list[str], name: str | None) -> list[str]:
    """argv with `--config FILE`'s options in place of it: a YAML mapping of option names to values
    (`lr: 3e-4`, `lora: {rank: 4}`, `prompt: [a, b]`). An option also given on the command line is
    taken from there."""
    uses = [i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")]
    if not uses:
        return argv
    if len(uses) > 1:
        raise UsageError("--config is given twice: give one options file")
    i = uses[0]
    path, drop = (argv[i].partition("=")[2], 1) if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "", 2)
    if not path:
        raise UsageError("--config needs a file: --config run.yaml")
    if name is None:
        raise UsageError("--config goes after a command: gpt2lab train --config run.yaml")
    rest = argv[:i] + argv[i + drop:]
    given = {_flag_name(arg) for arg in rest if arg.startswith("--")}
    return rest + _config_options(_read_config(Path(path)), given)


def _read_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        options = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path} is not a YAML file: {_one_line(str(e))}") from None
    if not isinstance(options, dict):
        raise UsageError(f"--config {path} must hold a mapping of option names to values (lr: 3e-4), "
                         f"not {type(options).__name__}")
    return options


def _flag_name(arg: str) -> str:
    """`--lora.no-x=1` -> `lora.x`: the option an argument sets, in the form _config_options makes."""
    *prefix, leaf = arg[2:].partition("=")[0].replace("_", "-").split(".")
    return ".".join([*prefix, leaf.removeprefix("no-")])


def _config_options(options: dict[str, Any], given: set[str], prefix: str = "") -> list[str]:
    tokens: list[str] = []
    for key, value in options.items():
        name = prefix + str(key).replace("_", "-")
        if isinstance(value, dict):
            tokens += _config_options(value, given, f"{name}.")
        elif name in given:
            continue
        elif isinstance(value, bool):
            head, _, leaf = name.rpartition(".")
            tokens.append(f"--{name}" if value else f"--{head}{'.' if head else ''}no-{leaf}")
        elif isinstance(value, list | tuple):
            if not value:
                raise UsageError(f"--config: {key} is an empty list; leave it out to keep the default")
            for item in value:
                tokens += [f"--{name}", str(item)]
        else:
            tokens += [f"--{name}", "None" if value is None else str(value)]
    return tokens


if __name__ == "__main__":
    raise SystemExit(main())
