"""`gpt2lab eval`: checks the file arguments before any work, loads the model, writes --out and
prints a one-line summary; the scoring is gpt2lab.evaluate's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoint import load_model, load_tokenizer
from ..device import resolve_device
from ..evaluate import Task, _check_options, _data_file, evaluate_model
from ..files import check_file_destination, clean_leftovers, write_json
from ..tokenizer import Tokenizer
from . import Model


def summary(results: dict[str, Any]) -> str:
    """One line a person can read: the task, its metrics, how many examples, how long."""
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in results["metrics"].items())
    unit = "windows" if results["task"] == "perplexity" else "examples"
    return f"{results['task']} on {results['data']}: {metrics} ({results['n_examples']} {unit}, " \
           f"{results['seconds']:.1f} s)"


def evaluate(model: Model, /, *, task: Task, data: str, stride: int | None = None, batch_size: int = 8,
             limit: int | None = None, out: Path | None = None, per_example: bool = False,
             tokenizer: str | None = None, device: str = "auto") -> str:
    """Score a model: perplexity of a text file, or a zero-shot benchmark (LAMBADA, HellaSwag, BIG-bench).

    Args:
        model: a gpt2lab checkpoint, a run folder (its newest checkpoint), an HF GPT-2 folder, or a Hub name (gpt2)
        task: what to measure; the file format follows: text, LAMBADA jsonl, HellaSwag jsonl, BIG-bench task.json
        data: the task's file; for multiple-choice also bigbench:TASK (taken from the bigbench 1.0.0 sdist)
        stride: perplexity only: tokens between window starts (default n_ctx / 2)
        batch_size: windows or choices per forward pass
        limit: score only the first N examples (perplexity: the first N windows)
        out: write the results (JSON) to this file (a new one, or results gpt2lab eval wrote before)
        per_example: include every example's scores in the results file
        tokenizer: a tokenizer folder, or gpt2 (default: the one the model was saved with)
        device: auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps
    """
    # Everything that can be checked without the model is checked before it is loaded.
    out = None if out is None else check_file_destination(out, flag="--out", replaceable=_is_results,
                                                              owner="gpt2lab eval", what="the results file")
    _check_options(task, stride, batch_size, limit)
    torch_device = resolve_device(device)
    path = _data_file(task, data)
    tok = load_tokenizer(model) if tokenizer is None else Tokenizer.from_spec(tokenizer)
    gpt = load_model(model, device=torch_device, tokenizer=tok)
    results = evaluate_model(gpt, tok, task=task, data=path, stride=stride, batch_size=batch_size, limit=limit,
                             progress=True)
    results = {"model": str(model), "tokenizer": tok.name, "device": str(torch_device), **results}
    if not per_example:
        results.pop("examples")
    line = summary(results)
    if out is not None:
        clean_leftovers(out.parent, out.name)  # what a killed earlier write left beside it
        write_json(out, results)
        line += f"; results in {out}"
    return line


def _is_results(path: Path) -> bool:
    """Whether `path` holds results that `gpt2lab eval --out` wrote (those it may replace)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and {"model", "task", "metrics"} <= obj.keys()
