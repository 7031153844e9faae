"""What the command line does before tyro parses it: options from a `--config` file, and list
options, which tyro would take only from their last use (`--prompt A --prompt B` keeps B) and
whose values may not start with a dash. gpt2lab takes every use of a list option out of argv, in
order, and sets the values on the parsed call itself."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError


class UsageError(ConfigError):
    """The command line (or its --config file) does not fit the command."""


@dataclasses.dataclass(frozen=True)
class Option:
    flag: str  # as tyro names it: max-steps, lora.targets
    path: tuple[str, ...]  # the parameter, then the fields of the dataclasses it is in
    kind: str  # "list", "bool" or "value"


def options(func: Callable[..., Any]) -> dict[str, Option]:
    """Every --option of a command function, by flag (a switch also as --no-X)."""
    def walk(hints: dict[str, Any], prefix: str, path: tuple[str, ...]) -> Iterator[Option]:
        for name, hint in hints.items():
            flag = name.replace("_", "-")
            for extra in getattr(hint, "__metadata__", ()):  # Annotated[T, tyro.conf.arg(name=...)]
                if getattr(extra, "name", None) is not None:
                    flag = extra.name
            hint = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            if dataclasses.is_dataclass(hint):
                fields = typing.get_type_hints(hint, include_extras=True)
                yield from walk(fields, f"{prefix}{flag}." if flag else prefix, (*path, name))
            elif typing.get_origin(hint) in (list, tuple):
                yield Option(prefix + flag, (*path, name), "list")
            else:
                yield Option(prefix + flag, (*path, name), "bool" if hint is bool else "value")

    hints = typing.get_type_hints(func, include_extras=True)
    hints.pop("return", None)
    found = {}
    for option in walk(hints, "", ()):
        found[option.flag] = option
        if option.kind == "bool":
            head, _, leaf = option.flag.rpartition(".")
            found[f"{head}{'.' if head else ''}no-{leaf}"] = option
    return found


def _name(arg: str) -> str:
    return arg[2:].partition("=")[0].replace("_", "-")


def take_lists(argv: list[str], known: dict[str, Option]) -> tuple[list[str], dict[Option, list[str]]]:
    """argv without its list options, and their values (every use, in order). A value ends at the
    next known option, so values may start with a dash: `--stop -- --prompt -1`."""
    def is_option(arg: str) -> bool:
        return arg in ("-h", "--help", "--") or (arg.startswith("--") and _name(arg) in known)

    rest: list[str] = []
    values: dict[Option, list[str]] = {}
    i = 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg == "--":  # what follows is positional
            rest += argv[i - 1:]
            break
        option = known.get(_name(arg)) if arg.startswith("--") else None
        if option is None or option.kind != "list":
            rest.append(arg)
            continue
        got = values.setdefault(option, [])
        if "=" in arg:
            got.append(arg.partition("=")[2])
            continue
        start = len(got)
        while i < len(argv) and not is_option(argv[i]):
            got.append(argv[i])
            i += 1
        if len(got) == start:
            raise UsageError(f"--{option.flag} needs a value: --{option.flag} VALUE (repeat it for more)")
    return rest, values


def set_lists(kwargs: dict[str, Any], values: dict[Option, list[str]], func: Callable[..., Any]) -> None:
    """Put list options' values into a parsed call's keyword arguments (dataclasses rebuilt, and so
    checked again by their __post_init__)."""
    import inspect

    for option, given in values.items():
        name = option.path[0]
        current = kwargs[name] if name in kwargs else inspect.signature(func).parameters[name].default
        kwargs[name] = _replaced(current, option.path[1:], given)


def _replaced(obj: Any, path: tuple[str, ...], value: list[str]) -> Any:
    if not path:
        return tuple(value) if isinstance(obj, tuple) else list(value)
    inner = getattr(obj, path[0])
    return dataclasses.replace(obj, **{path[0]: _replaced(inner, path[1:], value)})


def with_config_file(argv: list[str], command: str | None) -> tuple[list[str], str | None]:
    """argv with `--config FILE`'s options added (and the file's name): a YAML mapping of option
    names to values (`lr: 3e-4`, `lora: {rank: 4}`, `prompt: [a, b]`). An option that is also
    on the command line is taken from there."""
    if "-h" in argv or "--help" in argv:
        return [a for a in argv if a != "--config" and not a.startswith("--config=")], None
    uses = [i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")]
    if not uses:
        return argv, None
    if len(uses) > 1:
        raise UsageError("--config is given twice: give one options file")
    i = uses[0]
    path, drop = (argv[i].partition("=")[2], 1) if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "", 2)
    if not path:
        raise UsageError("--config needs a file: --config run.yaml")
    if command is None:
        raise UsageError("--config goes after a command: gpt2lab COMMAND --config run.yaml")
    rest = argv[:i] + argv[i + drop:]
    given = {_given(arg) for arg in rest if arg.startswith("--")}
    return rest + _config_options(read_config(Path(path)), given, path), path


def _given(arg: str) -> str:
    """`--lora.no-x=1` -> `lora.x`: the option an argument sets."""
    *prefix, leaf = _name(arg).split(".")
    return ".".join([*prefix, leaf.removeprefix("no-")])


def read_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        options = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path} is not a YAML file: {' '.join(str(e).split())}") from None
    if options is None:  # empty, or only comments
        return {}
    if not isinstance(options, dict):
        raise UsageError(f"--config {path} must hold a mapping of option names to values (lr: 3e-4), "
                         f"not a {type(options).__name__}")
    return options


def _config_options(options: dict[str, Any], given: set[str], path: str, prefix: str = "") -> list[str]:
    tokens: list[str] = []
    for key, value in options.items():
        name = prefix + str(key).replace("_", "-")
        if name.rpartition(".")[2].startswith("no-"):
            raise UsageError(f"--config {path}: write {name.replace('no-', '', 1)}: false, not {key}: true")
        if isinstance(value, dict):
            tokens += _config_options(value, given, path, f"{name}.")
        elif name in given:
            continue
        elif isinstance(value, bool):
            head, _, leaf = name.rpartition(".")
            tokens.append(f"--{name}" if value else f"--{head}{'.' if head else ''}no-{leaf}")
        elif isinstance(value, list | tuple):
            if not value:
                raise UsageError(f"--config {path}: {key} is an empty list; leave it out to keep the default")
            tokens += [f"--{name}={item}" for item in value]
        else:
            tokens.append(f"--{name}={'None' if value is None else value}")
    return tokens
