"""The command layer: printing, standard input, files, REPLs. It calls the library, never the reverse.

Each `gpt2lab` command is a function here; gpt2lab.cli builds the command line from its signature
(positional-only parameters are arguments, the rest --options) and its docstring's Args section.
"""

from typing import Annotated

import tyro

# A config dataclass parameter marked Annotated[Config, FLAT] gives its fields as top-level options
# (`--lr`, not `--config.lr`); a dataclass inside it stays nested (`--lora.rank`).
FLAT = tyro.conf.arg(name="")


def flag(name: str) -> object:
    """The option's name on the command line, where the Python parameter's differs (`input` is a builtin)."""
    return tyro.conf.arg(name=name)


def positional(metavar: str) -> object:
    """How a positional argument is shown in the help (MODEL, not its type)."""
    return tyro.conf.arg(metavar=metavar)


# The argument most commands start with.
Model = Annotated[str, positional("MODEL")]

__all__ = ["FLAT", "Annotated", "Model", "flag", "positional"]
