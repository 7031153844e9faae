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
import warnings
from collections.abc import Callable
from typing import Any

from . import allocator
from .argv import Option, UsageError, options, set_lists, take_lists, with_config_file
from .errors import GPT2LabError, Stopped

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
    "estimate": "estimate:estimate",
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
    shown = warnings.showwarning
    warnings.showwarning = functools.partial(_show_warning, shown)
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except _Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # also while the command's modules are still being imported
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM, raised where the program is so that `finally` blocks and cleanups run."""


def _show_warning(others: Callable[..., None], message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: Any = None, line: str | None = None) -> None:
    """gpt2lab's own warnings ("gpt2lab: ...") as one line, without the file and line that warned;
    `others` shows the rest."""
    text = str(message)
    if text.startswith(f"{PROG}: "):
        print(f"{PROG}: warning: {_one_line(text[len(PROG) + 2:])}", file=sys.stderr)
    else:
        others(message, category, filename, lineno, file, line)


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _main(argv: list[str]) -> int:
    try:
        call = parse(argv)
        allocator.tune()  # training steps free and reallocate the same large tensors: keep them mapped
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


def parse(argv: list[str]) -> Callable[[], Any]:
    """The command argv names, with its arguments bound: call it to run the command.
    `--help` prints the help and exits 0; a command line that does not fit raises UsageError."""
    from tyro.extras import SubcommandApp

    name = _selected(argv)
    argv, config_file = with_config_file(argv, name)
    lists: dict[Option, list[str]] = {}
    if name is not None:
        argv, lists = take_lists(argv, options(resolve_command(name)))
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
            call = app.cli(prog=PROG, description=DESCRIPTION, args=argv)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        where = name or (argv[0] if argv and argv[0] in GROUPS else None)
        message = _usage_message(errors.getvalue(), where)
        raise UsageError(message + (f" (with the options of --config {config_file})" if config_file else "")) from None
    set_lists(call.keywords, lists, call.func)
    return call


def _deferred(func: Callable[..., Any]) -> Callable[..., Callable[[], Any]]:
    @functools.wraps(func)  # tyro reads the signature, type hints and docstring through __wrapped__
    def bind(*args: Any, **kwargs: Any) -> Callable[[], Any]:
        return functools.partial(func, *args, **kwargs)

    return bind


_BORDER = set("╭╮╰╯─━┏┓┗┛+-=│┃| ")
_GENERIC = r"(Value error|Required options|Invalid choice|Unrecognized options|Missing argument)"  # repeated below
_HELP_INDENT = 8  # in tyro's boxes an argument's help text is indented this far: left to --help


def _usage_message(text: str, command: str | None = None) -> str:
    """tyro's error (a box on a terminal, ruled sections when piped) as one line: what is wrong, and
    where the help is. Its first line is the title."""
    words, see = [], False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or set(line) <= _BORDER:
            continue
        if not words:  # the title: box corners and rules around it
            words.append(line.strip("╭╮╰╯─━┏┓┗┛+- ") + ":")
            continue
        body = line.strip("│┃|").rstrip()
        if body.strip().startswith(("Argument helptext", "For full helptext")):
            see = True
            break
        if len(body) - len(body.lstrip()) > _HELP_INDENT:
            continue
        words.append(body.strip())
    message = re.sub(rf"^{_GENERIC}: ", "", " ".join(" ".join(words).split()))
    # A nested config's check reads "Error parsing __tyro-dummy-inner__.config.lora: <gpt2lab's message>".
    message = re.sub(r"Error parsing [^\s:]*(config|__tyro)[^\s:]*: ", "", message) or "bad command line"
    if len(message) > 300:
        message = message[:297].rsplit(" ", 1)[0] + " ..."
    return f"{message} (see {PROG}{' ' + command if command else ''} --help)" if see or command else message


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


if __name__ == "__main__":
    raise SystemExit(main())
