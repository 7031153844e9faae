"""Reproduce the GPT-2 paper's zero-shot evaluations, and later public re-evaluations, with gpt2lab's evaluator.

    python benchmarks/reproduce/reproduce.py [--models gpt2 gpt2-medium gpt2-large gpt2-xl] [--tasks TASK ...]
                                             [--limit N] [--batch-size 8] [--device auto] [--out results.json]
    python benchmarks/reproduce/reproduce.py --published      # the published figures and their sources only

Each task's data comes from its public dataset repo on the Hugging Face Hub (huggingface_hub's download
and cache, so HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply), is converted to the file
format `gpt2lab eval` reads, and is scored through gpt2lab's Python API (gpt2lab.evaluate and
gpt2lab.zeroshot). A task whose data cannot be had is skipped with one line; the others still run.
The table puts our figure next to each published one, with its source; where our protocol differs
from the one behind a published figure, the notes under the table say how. Everything a reader may
want to check (repos, files, published numbers, sources) is in the tables at the top of this file.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpt2lab.checkpoint import load_model, load_tokenizer
from gpt2lab.device import resolve_device
from gpt2lab.errors import GPT2LabError
from gpt2lab.evaluate import evaluate_model
from gpt2lab.hub import SHORT_NAMES, parse_name
from gpt2lab.tokenizer import Tokenizer
from gpt2lab.zeroshot import evaluate_zeroshot

MODELS = tuple(SHORT_NAMES)  # gpt2 (124M), gpt2-medium (355M), gpt2-large (774M), gpt2-xl (1558M)

# -- where the published figures come from ---------------------------------------------------------------

PAPER = "https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf"
HF_PERPLEXITY_DOC = "https://huggingface.co/docs/transformers/perplexity"
LM_EVAL_GPT2_LAMBADA = "https://github.com/EleutherAI/lm-evaluation-harness/issues/2159"
GPT_NEO_CARD = "https://huggingface.co/EleutherAI/gpt-neo-1.3B"
LLM_C_HELLASWAG = "https://github.com/karpathy/llm.c/blob/master/dev/data/hellaswag.py"
PER_WORD_NOTE = "https://github.com/openai/gpt-2/issues/78"


@dataclass(frozen=True)
class Published:
    """Figures someone published for one (task, metric), per OpenAI model size, and where."""

    task: str
    metric: str
    figures: dict[str, float]
    who: str
    url: str


PUBLISHED = (
    # Radford et al. 2019, Table 3 (zero-shot; WikiText per original WikiText token, with de-tokenizers).
    Published("wikitext-2", "word ppl (stride 512)",
              {"gpt2": 29.41, "gpt2-medium": 22.76, "gpt2-large": 19.93, "gpt2-xl": 18.34}, "paper, Table 3", PAPER),
    # Hugging Face's "Perplexity of fixed-length models": gpt2-large, the same text and windows as ours.
    Published("wikitext-2", "token ppl (stride 512)", {"gpt2-large": 16.44}, "HF perplexity doc", HF_PERPLEXITY_DOC),
    Published("wikitext-2", "token ppl (stride 1024)", {"gpt2-large": 19.44}, "HF perplexity doc", HF_PERPLEXITY_DOC),
    Published("wikitext-103", "word ppl (stride 512)",
              {"gpt2": 37.50, "gpt2-medium": 26.37, "gpt2-large": 22.05, "gpt2-xl": 17.48}, "paper, Table 3", PAPER),
    Published("lambada", "ppl", {"gpt2": 35.13, "gpt2-medium": 15.60, "gpt2-large": 10.87, "gpt2-xl": 8.63},
              "paper, Table 3", PAPER),
    Published("lambada", "acc", {"gpt2": 45.99, "gpt2-medium": 55.48, "gpt2-large": 60.12, "gpt2-xl": 63.24},
              "paper, Table 3", PAPER),
    # Section 3.5-3.7 and Table 4 give the largest model only.
    Published("summarization", "ROUGE-1", {"gpt2-xl": 29.34}, "paper, Table 4 (TL;DR:)", PAPER),
    Published("summarization", "ROUGE-2", {"gpt2-xl": 8.27}, "paper, Table 4 (TL;DR:)", PAPER),
    Published("summarization", "ROUGE-L", {"gpt2-xl": 26.58}, "paper, Table 4 (TL;DR:)", PAPER),
    Published("translation-en-fr", "BLEU", {"gpt2-xl": 5.0}, "paper, section 3.7", PAPER),
    Published("translation-fr-en", "BLEU", {"gpt2-xl": 11.5}, "paper, section 3.7", PAPER),
    Published("coqa", "F1", {"gpt2-xl": 55.0}, "paper, section 3.5 (dev set)", PAPER),
    # lm-evaluation-harness (the protocol ours follows for lambada_openai and hellaswag).
    Published("lambada", "acc", {"gpt2": 32.56}, "lm-eval 0.4 (issue #2159)", LM_EVAL_GPT2_LAMBADA),
    Published("lambada", "ppl", {"gpt2": 40.06}, "lm-eval 0.4 (issue #2159)", LM_EVAL_GPT2_LAMBADA),
    Published("lambada", "acc", {"gpt2-xl": 51.21}, "lm-eval, GPT-Neo model card", GPT_NEO_CARD),
    Published("lambada", "ppl", {"gpt2-xl": 10.634}, "lm-eval, GPT-Neo model card", GPT_NEO_CARD),
    Published("hellaswag", "acc", {"gpt2": 28.92, "gpt2-xl": 40.04}, "lm-eval, cited by llm.c", LLM_C_HELLASWAG),
    Published("hellaswag", "acc_norm", {"gpt2": 31.14, "gpt2-xl": 50.89}, "lm-eval, cited by llm.c", LLM_C_HELLASWAG),
)


# -- the tasks: where their data lives, how it becomes our evaluator's file, what we report ---------------


def read_rows(files: list[Path]) -> list[dict[str, Any]]:
    """The rows of parquet files (in order) or of JSONL files."""
    if all(f.suffix == ".jsonl" for f in files):
        return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise Unavailable("reading the Hub's parquet files needs pyarrow: pip install pyarrow") from None
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def write_jsonl(rows: list[dict[str, Any]], out: Path) -> None:
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def wikitext_file(files: list[Path], out: Path) -> None:
    """The test rows joined with blank lines, exactly the text Hugging Face's perplexity doc scores."""
    out.write_text("\n\n".join(r["text"] for r in read_rows(files)), encoding="utf-8")


def lambada_file(files: list[Path], out: Path) -> None:
    """OpenAI's LAMBADA jsonl ({"text": ...}) is already what `--task lambada` reads."""
    write_jsonl([{"text": r["text"]} for r in read_rows(files)], out)


def hellaswag_file(files: list[Path], out: Path) -> None:
    keys = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type", "label")
    write_jsonl([{k: r[k] for k in keys if k in r} for r in read_rows(files)], out)


def cnn_dailymail_file(files: list[Path], out: Path) -> None:
    write_jsonl([{"article": r["article"], "highlights": r["highlights"]} for r in read_rows(files)], out)


def wmt_en_fr_file(files: list[Path], out: Path) -> None:
    write_jsonl([{"en": r["translation"]["en"], "fr": r["translation"]["fr"]} for r in read_rows(files)], out)


def wmt_fr_en_file(files: list[Path], out: Path) -> None:
    """French to English: the columns swapped, so the prompts read "french = english" and English is scored."""
    write_jsonl([{"en": r["translation"]["fr"], "fr": r["translation"]["en"]} for r in read_rows(files)], out)


def coqa_file(files: list[Path], out: Path) -> None:
    """The Hub's CoQA keeps the answers as columns ({"input_text": [...], ...}); `--task qa` wants a list."""
    write_jsonl([{"story": r["story"], "questions": r["questions"], "answers": r["answers"]["input_text"]}
                 for r in read_rows(files)], out)


@dataclass(frozen=True)
class Task:
    """One evaluation: the dataset repo and files it is read from, how they become the file our
    evaluator reads, which evaluator task scores it, and how our protocol differs from the paper's."""

    repo: str
    files: str  # a glob over the repo's paths, as snapshot_download's allow_patterns (* spans folders)
    convert: Callable[[list[Path], Path], None]
    kind: str  # gpt2lab's task: perplexity, lambada, hellaswag, summarization, translation, qa
    note: str
    revision: str | None = None  # None: the repo's main branch (no commit of these repos could be verified here)


WIKITEXT_NOTE = ("the paper scored WikiText's tokenized text through invertible de-tokenizers (worth 2.5-5 ppl, it "
                 "says) and divided by WikiText's own token count (" + PER_WORD_NOTE + "); ours scores the raw-v1 "
                 "test rows joined by blank lines (HF's perplexity doc), word ppl dividing the same total by the "
                 "raw text's whitespace-separated words, token ppl by GPT-2 tokens")
TASKS = {
    "wikitext-2": Task("Salesforce/wikitext", "wikitext-2-raw-v1/test-*.parquet", wikitext_file, "perplexity",
                       WIKITEXT_NOTE),
    "wikitext-103": Task("Salesforce/wikitext", "wikitext-103-raw-v1/test-*.parquet", wikitext_file, "perplexity",
                         WIKITEXT_NOTE),
    "lambada": Task("EleutherAI/lambada_openai", "data/lambada_test.jsonl", lambada_file, "lambada",
                    "OpenAI's LAMBADA test file, scored as lm-eval's lambada_openai (every token of the last word "
                    "greedy); the paper does not give its scoring, and lm-eval's figures are lower than the paper's"),
    "hellaswag": Task("Rowan/hellaswag", "data/validation-*.parquet", hellaswag_file, "hellaswag",
                      "validation split, lm-eval's hellaswag; not in the paper"),
    "summarization": Task("abisee/cnn_dailymail", "3.0.0/test-*.parquet", cnn_dailymail_file, "summarization",
                          "the paper's prompt and decoding (TL;DR:, top-k 2, 100 tokens, first 3 sentences); ROUGE "
                          "from rouge-score, averaged F; the paper names neither its ROUGE package nor its sample"),
    "translation-en-fr": Task("wmt/wmt14", "fr-en/test-*.parquet", wmt_en_fr_file, "translation",
                              "newstest2014, 'english = french' prompts after the first 3 test pairs (not scored; "
                              "the paper does not say how many it used), sacrebleu corpus BLEU"),
    "translation-fr-en": Task("wmt/wmt14", "fr-en/test-*.parquet", wmt_fr_en_file, "translation",
                              "as translation-en-fr with the columns swapped: 'french = english' prompts"),
    "coqa": Task("stanfordnlp/coqa", "*validation-*.parquet", coqa_file, "qa",
                 "validation (the paper's dev set), greedy, CoQA's F1 against the one answer the Hub's copy keeps "
                 "(the official script takes the best of four human answers)"),
}
ZERO_SHOT = ("summarization", "translation", "qa")


class Unavailable(Exception):
    """A task's data cannot be had; the message is one line saying why."""


# -- running ------------------------------------------------------------------------------------------------


def fetch(task: Task) -> list[Path]:
    """The task's files from its dataset repo (downloaded into, or read from, the Hugging Face cache)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    hub = f"the Hub ({constants.ENDPOINT})"
    try:
        folder = Path(snapshot_download(task.repo, repo_type="dataset", revision=task.revision,
                                        allow_patterns=[task.files]))
    except RepositoryNotFoundError as e:
        raise Unavailable(f"{hub} has no dataset repo {task.repo} (if it is gated or private: log in, "
                          "or set HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{hub} cannot be reached"
        raise Unavailable(f"{task.repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else "an error"
        raise Unavailable(f"{hub} answered {status} for the dataset repo {task.repo}") from e
    except OSError as e:  # the cache folder: no space, no permission
        raise Unavailable(f"cannot download {task.repo} into {constants.HF_HUB_CACHE}: {e}") from e
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and fnmatch.fnmatch(p.relative_to(folder).as_posix(), task.files))
    if not files:
        raise Unavailable(f"the dataset repo {task.repo} has no file matching {task.files}")
    return files


def prepare(name: str, task: Task, workdir: Path) -> Path:
    """The task's data as the file our evaluator reads, in `workdir`."""
    files = fetch(task)
    out = workdir / f"{name}.{'txt' if task.kind == 'perplexity' else 'jsonl'}"
    try:
        task.convert(files, out)
    except (KeyError, TypeError) as e:
        raise Unavailable(f"{task.repo}'s files are not in the format expected ({type(e).__name__}: {e})") from e
    return out


def model_size(model: str) -> str | None:
    """The OpenAI size a model name stands for (gpt2, openai-community/gpt2-xl@main, ...), else None."""
    parsed = parse_name(model)
    if parsed is None:
        return None
    return next((short for short, repo in SHORT_NAMES.items() if repo.lower() == parsed[0].lower()), None)


def published_for(model: str, task: str, metric: str) -> list[dict[str, Any]]:
    size = model_size(model)
    return [{"value": p.figures[size], "who": p.who, "url": p.url} for p in PUBLISHED
            if p.task == task and p.metric == metric and size in p.figures]


def measure(name: str, task: Task, model, tokenizer: Tokenizer, data: Path, *, limit: int | None,
            batch_size: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Our figures for one task ({metric: value}, in the published tables' units) and the evaluator's results."""
    if task.kind in ZERO_SHOT:
        result = evaluate_zeroshot(model, tokenizer, task=task.kind, data=data, batch_size=batch_size, limit=limit,
                                   progress=True)
        result.pop("examples")
        m = result["metrics"]
        if task.kind == "summarization":
            return {"ROUGE-1": 100 * m["rouge1"], "ROUGE-2": 100 * m["rouge2"], "ROUGE-L": 100 * m["rougeL"]}, [result]
        if task.kind == "translation":
            return {"BLEU": m["bleu"]}, [result]
        return {"F1": 100 * m["f1"]}, [result]
    if task.kind == "perplexity":
        text, figures, results = data.read_text(encoding="utf-8"), {}, []
        n_ctx = model.config.n_ctx
        for stride in (n_ctx // 2, n_ctx):  # HF's doc reports both (512 and 1024 for GPT-2)
            result = evaluate_model(model, tokenizer, task="perplexity", data=data, stride=stride,
                                    batch_size=batch_size, limit=limit, progress=True)
            windows = result.pop("examples")
            nll = sum(w["nll"] for w in windows)
            end = windows[-1]["end"]
            covered = text if end == result["tokens"] else tokenizer.decode(tokenizer.encode(text)[:end])
            figures[f"word ppl (stride {stride})"] = math.exp(nll / len(covered.split()))
            figures[f"token ppl (stride {stride})"] = result["metrics"]["perplexity"]
            results.append(result)
        return figures, results
    result = evaluate_model(model, tokenizer, task=task.kind, data=data, batch_size=batch_size, limit=limit,
                            progress=True)
    result.pop("examples")
    m = result["metrics"]
    if task.kind == "lambada":
        return {"acc": 100 * m["acc"], "ppl": m["perplexity"]}, [result]
    return {"acc": 100 * m["acc"], "acc_norm": 100 * m["acc_norm"]}, [result]


def run(models: list[str], tasks: list[str], *, limit: int | None, batch_size: int, device: str,
        workdir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows {task, metric, model, ours, published, results} for every model and task that could run,
    and one line for each that could not."""
    skipped, data = [], {}
    for name in tasks:
        try:
            data[name] = prepare(name, TASKS[name], workdir)
        except Unavailable as e:
            skipped.append(f"skipping {name}: {e}")
            print(f"reproduce: {skipped[-1]}", file=sys.stderr)
    rows = []
    torch_device = resolve_device(device)
    with tqdm(total=len(models) * len(data), unit="task", desc="reproduce") as bar:
        for model_name in models:
            try:
                tokenizer = load_tokenizer(model_name)
                model = load_model(model_name, device=torch_device, tokenizer=tokenizer)
            except GPT2LabError as e:
                skipped.append(f"skipping {model_name}: {e}")
                print(f"reproduce: {skipped[-1]}", file=sys.stderr)
                bar.update(len(data))
                continue
            for name, path in data.items():
                bar.set_postfix_str(f"{model_name} {name}")
                try:
                    figures, results = measure(name, TASKS[name], model, tokenizer, path, limit=limit,
                                               batch_size=batch_size)
                except GPT2LabError as e:  # a missing metric library, a row our reader refuses
                    skipped.append(f"skipping {name} for {model_name}: {e}")
                    print(f"reproduce: {skipped[-1]}", file=sys.stderr)
                else:
                    rows += [{"task": name, "metric": metric, "model": model_name, "ours": value,
                              "published": published_for(model_name, name, metric), "results": results}
                             for metric, value in figures.items()]
                bar.update(1)
            del model
    return rows, skipped


# -- printing -------------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    """Our figures beside the published ones, then the sources and how our protocol differs."""
    sources: dict[str, int] = {}
    lines = [("task", "metric", "model", "ours", "published")]
    for r in rows:
        cited = []
        for p in r["published"]:
            n = sources.setdefault(p["url"], len(sources) + 1)
            cited.append(f"{p['value']:g} ({p['who']}) [{n}]")
        ours = "" if r["ours"] is None else f"{r['ours']:.2f}"
        lines.append((r["task"], r["metric"], r["model"], ours, "; ".join(cited) or "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line[:4], widths, strict=True)) + "  " + line[4]
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 9)
    out += ["", "sources:"] + [f"  [{n}] {url}" for url, n in sources.items()]
    shown = list(dict.fromkeys(r["task"] for r in rows))
    out += ["", "protocol (ours, and where it differs from the published one):"]
    out += [f"  {name}: {TASKS[name].repo} {TASKS[name].files}; {TASKS[name].note}" for name in shown]
    return "\n".join(out)


def published_rows(models: list[str], tasks: list[str]) -> list[dict[str, Any]]:
    """The published figures alone, as table rows without ours."""
    keys = dict.fromkeys((p.task, p.metric) for p in PUBLISHED if p.task in tasks)
    return [{"task": task, "metric": metric, "model": m, "ours": None, "published": cited}
            for task, metric in keys for m in models if (cited := published_for(m, task, metric))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS),
                    help="Hub names or local folders (default: %(default)s)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), metavar="TASK",
                    help=f"of {', '.join(TASKS)} (default: all)")
    ap.add_argument("--limit", type=int, help="the first N examples of each task (perplexity: N windows)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ap.add_argument("--out", type=Path, help="write every row and the evaluator's results (JSON) here")
    ap.add_argument("--published", action="store_true", help="print the published figures and sources only")
    args = ap.parse_args(argv)
    if args.published:
        print(table(published_rows(args.models, args.tasks)))
        return 0
    with tempfile.TemporaryDirectory(prefix="gpt2lab-reproduce-") as workdir:
        try:
            rows, skipped = run(args.models, args.tasks, limit=args.limit, batch_size=args.batch_size,
                                device=args.device, workdir=Path(workdir))
        except GPT2LabError as e:  # a device that is not there
            print(f"reproduce: error: {e}", file=sys.stderr)
            return 2
    print(table(rows))
    if skipped:
        print("\nnot run:\n" + "\n".join(f"  {line}" for line in skipped))
    if args.out is not None:
        args.out.write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv, "rows": rows,
                                        "skipped": skipped}, indent=1) + "\n", encoding="utf-8")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
