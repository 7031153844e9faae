"""`gpt2lab eval`: checks the file arguments before any work, loads the model, writes --out and
prints a one-line summary; the scoring is gpt2lab.evaluate's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

from ..checkpoint import load_model, load_tokenizer
from ..device import resolve_device
from ..evaluate import Task, _check_options, _data_file, evaluate_model
from ..files import check_file_destination, clean_leftovers, write_json
from ..tokenizer import Tokenizer
from ..zeroshot import SEED, SHOTS, ZeroShotTask, evaluate_zeroshot
from ..zeroshot import check_options as check_zeroshot_options
from . import Model


def summary(results: dict[str, Any]) -> str:
    """One line a person can read: the task, its metrics, how many examples, how long."""
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in results["metrics"].items())
    unit = "windows" if results["task"] == "perplexity" else "examples"
    return f"{results['task']} on {results['data']}: {metrics} ({results['n_examples']} {unit}, " \
           f"{results['seconds']:.1f} s)"


def evaluate(model: Model, /, *, task: Task | ZeroShotTask, data: str, stride: int | None = None, batch_size: int = 8,
             limit: int | None = None, out: Path | None = None, per_example: bool = False,
             tokenizer: str | None = None, device: str = "auto", seed: int = SEED, shots: int = SHOTS) -> str:
    """Score a model: perplexity of a text file, a zero-shot benchmark (LAMBADA, HellaSwag, BIG-bench), or one of
    the GPT-2 paper's generative tasks (summarization, translation, qa), prompted as the paper did.

    Args:
        model: a gpt2lab checkpoint, a run folder (its newest checkpoint), an HF GPT-2 folder, or a Hub name (gpt2)
        task: what to measure; the file format follows: text, LAMBADA jsonl, HellaSwag jsonl, BIG-bench task.json,
            CNN/DailyMail jsonl (article, highlights), en/fr pairs jsonl, CoQA jsonl (story, questions, answers)
        data: the task's file; for multiple-choice also bigbench:TASK (taken from the bigbench 1.0.0 sdist)
        stride: perplexity only: tokens between window starts (default n_ctx / 2)
        batch_size: windows or choices per forward pass (generative tasks: prompts generated at once)
        limit: score only the first N examples (perplexity: the first N windows; qa: the first N turns)
        out: write the results (JSON) to this file (a new one, or results gpt2lab eval wrote before)
        per_example: include every example's scores in the results file
        tokenizer: a tokenizer folder, or gpt2 (default: the one the model was saved with)
        device: auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps
        seed: summarization only: the seed of its top-k sampling, so a run can be repeated
        shots: translation only: the first N rows are the example pairs every prompt starts with (not scored)
    """
    # Everything that can be checked without the model is checked before it is loaded.
    out = None if out is None else check_file_destination(out, flag="--out", replaceable=_is_results,
                                                              owner="gpt2lab eval", what="the results file")
    zeroshot = task in get_args(ZeroShotTask)
    if zeroshot:
        check_zeroshot_options(task, batch_size, limit, seed, shots)
    else:
        _check_options(task, stride, batch_size, limit)
    torch_device = resolve_device(device)
    path = _data_file(task, data)
    tok = load_tokenizer(model) if tokenizer is None else Tokenizer.from_spec(tokenizer)
    gpt = load_model(model, device=torch_device, tokenizer=tok)
    if zeroshot:
        results = evaluate_zeroshot(gpt, tok, task=task, data=path, batch_size=batch_size, limit=limit, seed=seed,
                                    shots=shots, progress=True)
    else:
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
