"""`gpt2lab generate`: prompts from --prompt, --prompt-file or stdin, the --interactive REPL, --stream
printing and --json output; the sampling and the Generator are gpt2lab.generate's."""

from __future__ import annotations

import codecs
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from json import dumps
from pathlib import Path
from typing import Any

from ..checkpoint import prompt_template
from ..device import resolve_device
from ..errors import GenerationError, GPT2LabError
from ..generate import _SURROGATE, Completion, GenerationConfig, Generator
from ..quantize import Mode
from ..template import PromptTemplate
from . import FLAT, Annotated, Model, flag

DEFAULTS = GenerationConfig()


def generate(model: Model, /, *, prompt: list[str] | None = None, prompt_file: Path | None = None,
             config: Annotated[GenerationConfig, FLAT] = DEFAULTS, stream: bool = False,
             interactive: bool = False, as_json: Annotated[bool, flag("json")] = False, mode: Mode = "fp32",
             compiled: Annotated[bool, flag("compile")] = False, template: bool = True,
             device: str = "auto") -> str | None:
    """Generate text from a model: continue each prompt (or stdin), print the results.

    Args:
        model: a gpt2lab checkpoint, a training run folder, an HF GPT-2 folder, or a Hub name (gpt2, owner/name[@rev])
        prompt: one or more prompts, generated as one batch (default: --prompt-file, else stdin)
        prompt_file: a UTF-8 file whose whole text is the prompt
        stream: print text as it is generated
        interactive: a REPL: each line you type is a prompt (Ctrl-D to quit, Ctrl-C stops a reply)
        as_json: print one JSON object per sample: text, token_ids (the new ids), logprobs, finish_reason
        mode: fp32; bf16 weights; or int8 weight-only quantization (both about 2x+ faster on CPU)
        compiled: run the model through torch.compile (slow first call)
        template: show each prompt as fine-tuning did, through the checkpoint's prompt template (if it has one)
        device: auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps
    """
    config = replace(config, stop=tuple(_unescape(s) for s in config.stop))  # --stop '\n' means a newline
    if interactive and (prompt or prompt_file):
        raise GenerationError("--interactive reads prompts from the terminal: drop --prompt/--prompt-file")
    if interactive or (not prompt and prompt_file is None):
        _prompt_stdin(interactive)  # no stdin to read is refused before the model is loaded
    resolved = resolve_device(device)  # a bad name is refused before the model is read
    gen = Generator.load(model, mode=mode, compile=compiled, device=resolved)
    fmt = _prompt_format(model) if template else str
    if interactive:
        _repl(gen, config, fmt)
        return None
    prompts = [fmt(p) for p in _read_prompts(prompt, prompt_file)]
    if as_json:
        return "\n".join(dumps(c.to_dict(), ensure_ascii=False) for c in gen.generate(prompts, config))
    if not stream:
        done = gen.generate(prompts, config)
        return "\n\n".join(f"{_header(c, config, len(prompts))}{prompts[c.prompt_index]}{c.text}" for c in done)
    # Streaming prints one sample after another; sample i uses seed + i, so the text is the
    # same as the batched run would give.
    for i, text in enumerate(prompts):
        for s in range(config.num_samples):
            if i or s:
                print()  # a blank line between samples, as in the batched output
            seed = None if config.seed is None else config.seed + s
            one = replace(config, num_samples=1, seed=seed)
            header = _header(Completion(prompt_index=i, sample_index=s, token_ids=[], logprobs=[],
                                        finish_reason="length"), config, len(prompts))
            _print_stream(gen, text, one, header)
    return None


def _header(c: Completion, config: GenerationConfig, n_prompts: int) -> str:
    """A separator line naming the sample, when there is more than one."""
    if n_prompts == 1 and config.num_samples == 1:
        return ""
    return f"--- prompt {c.prompt_index}, sample {c.sample_index} ---\n"


def _print_stream(gen: Generator, prompt: str, config: GenerationConfig, header: str = "",
                  echo: bool = True) -> None:
    print(header + (prompt if echo else ""), end="", flush=True)
    for event in gen.stream(prompt, config):
        print(event.text, end="", flush=True)
    print(flush=True)


def _prompt_format(model: str) -> Callable[[str], str]:
    """Prompts as the model was fine-tuned to see them: the template in its finetune.json, if any."""
    text = prompt_template(model)
    return str if text is None else PromptTemplate(text).format


def _repl(gen: Generator, config: GenerationConfig, fmt: Callable[[str], str] = str) -> None:
    """Each line read is a prompt; a line that cannot be used (not UTF-8, too long) is one error, not the end."""
    print("gpt2lab generate: type a prompt and press Enter; Ctrl-C stops a reply, Ctrl-D quits.", file=sys.stderr)
    n = 0
    while True:
        print(">>> ", end="", flush=True)
        try:
            raw = _read_line()
        except KeyboardInterrupt:
            raw = None
        if raw is None:
            print(file=sys.stderr)
            return
        n += 1
        try:
            line = _utf8(raw, f"input line {n}")
            if line.strip():
                _print_stream(gen, fmt(line), config, echo=False)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        except GPT2LabError as e:
            print(f"gpt2lab: error: {e}", file=sys.stderr)


def _read_line() -> bytes | str | None:
    """The next line of stdin without its line ending, as bytes where stdin has them (so that a line
    that is not UTF-8 can be reported and skipped), or None at the end of the input."""
    if sys.stdin is None or getattr(sys.stdin, "closed", False):  # generate() refuses this before the REPL
        return None
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    line = stream.readline()
    if not line:
        return None
    nl = b"\n" if isinstance(line, bytes) else "\n"
    return line[:-1] if line.endswith(nl) else line


def _read_prompts(prompt: list[str] | None, prompt_file: Path | None) -> list[str]:
    if prompt and prompt_file:
        raise GenerationError("give --prompt or --prompt-file, not both")
    if prompt:
        return [_utf8(p, f"--prompt {i}") for i, p in enumerate(prompt)]
    if prompt_file is not None:
        try:
            data = Path(prompt_file).read_bytes()
        except OSError as e:
            raise GenerationError(f"cannot read --prompt-file {prompt_file}: {e.strerror or e}") from None
        return [_utf8(data, f"--prompt-file {prompt_file}")]
    try:
        data = _prompt_stdin(interactive=False).read()
    except OSError as e:  # e.g. `< folder`: EISDIR
        raise GenerationError(f"cannot read the prompt on stdin ({e.strerror or e}): give --prompt TEXT or "
                              "--prompt-file PATH") from None
    return [_utf8(data, "the prompt on stdin")]


def _prompt_stdin(interactive: bool) -> Any:
    """Standard input as prompts are read from it (its bytes where it has them), or a one-line
    error where it cannot give any: closed, or (without --interactive) a terminal."""
    stdin = sys.stdin
    # Python sets sys.stdin to None when the process starts with descriptor 0 closed (`0<&-`).
    if stdin is None or getattr(stdin, "closed", False):
        if interactive:
            raise GenerationError("standard input is closed, so --interactive has no prompts to read: run it "
                                  "from a terminal or pipe prompts in, or give --prompt TEXT or --prompt-file PATH "
                                  "without --interactive")
        raise GenerationError("standard input is closed, so there is no prompt to read: give --prompt TEXT or "
                              "--prompt-file PATH, or pipe the prompt in")
    if not interactive and stdin.isatty():
        raise GenerationError("no prompt: give --prompt TEXT, --prompt-file PATH, pipe text on stdin, "
                              "or use --interactive")
    return getattr(stdin, "buffer", stdin)


def _utf8(data: bytes | str, source: str) -> str:
    """`data` as text, or a one-line GenerationError naming `source` where it is not UTF-8.

    Python hands over command-line arguments and some text streams with the bytes it could not
    decode kept as lone surrogates (surrogateescape); those count as not UTF-8 too.
    """
    if isinstance(data, str):
        if not _SURROGATE.search(data):
            return data
        try:
            data = data.encode("utf-8", "surrogateescape")  # back to the bytes the user gave
        except UnicodeEncodeError:
            data = data.encode("utf-8", "surrogatepass")  # a surrogate that no byte stands for
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f"byte {e.start}" + (f", line {line}" if b"\n" in data else "")
        raise GenerationError(f"{source} is not UTF-8 (0x{data[e.start]:02x} at {where}): give UTF-8 text, "
                              "e.g. convert it with iconv -t UTF-8") from None


def _unescape(s: str) -> str:
    """Backslash escapes typed on a command line (\\n, \\t, \\u00e9) as the characters they name.

    A bad escape (a lone backslash at the end, \\x4, an unknown \\q) is a one-line error naming the
    stop string, rather than being kept as typed: the user meant something, and it was not that.
    """
    text = _utf8(s, f"--stop {s!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the codec only warns about an unknown escape such as \\q
        try:
            out = codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")
        except (UnicodeDecodeError, DeprecationWarning) as e:
            why = e.reason if isinstance(e, UnicodeDecodeError) else str(e.__cause__ or e)  # codecs wraps it
            raise GenerationError(f"--stop {s!r} has a bad backslash escape ({why}): write \\\\ for a "
                                  "backslash, \\n for a newline, \\t for a tab, \\u00e9 for a character") from None
    if _SURROGATE.search(out):
        raise GenerationError(f"--stop {s!r} names a lone surrogate, which no generated text contains: "
                              "give a whole character, e.g. \\U0001F600")
    return out
