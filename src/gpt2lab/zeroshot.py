"""The GPT-2 paper's generative zero-shot tasks (Radford et al. 2019, section 3), prompted and decoded
as the paper describes, and scored with the standard metric's reference library.

    summarization  article + "\\nTL;DR:", top-k sampling with k = 2 (temperature 1), 100 new tokens; the
                   summary is the first 3 sentences generated. ROUGE-1/2/L F-measure (rouge-score,
                   Porter stemmer), averaged over articles.
    translation    K example pairs "english = french" (the first K rows of the file, not scored), one a
                   line, then "english ="; greedy; the translation is the text up to the first newline.
                   Corpus BLEU (sacrebleu, its defaults: 13a tokenisation, 0-100).
    qa             CoQA: the story, the conversation so far with the gold answers ("Q: ...\\nA: ..."),
                   then "Q: question\\nA:"; greedy; the answer is the text up to the first newline.
                   CoQA's F1 (its official normalisation), averaged over turns.

Generation is gpt2lab.generate's Generator; a prompt longer than the context keeps its last tokens
(the paper's inputs are cut to fit the same way: the cue at the end matters most).
"""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from tqdm import tqdm

from .errors import ConfigError, GPT2LabError, TaskFormatError
from .evaluate import read_jsonl
from .generate import SEED_LIMIT, GenerationConfig, Generator
from .model import GPT
from .tokenizer import Tokenizer

ZeroShotTask = Literal["summarization", "translation", "qa"]
SEED = 0  # the default sampling seed (summarization), so that a run can be repeated exactly
SHOTS = 3  # translation's default example pairs; the paper does not say how many it used
SUMMARY_SENTENCES = 3
SUMMARY_TOKENS = 100
ANSWER_TOKENS = 64  # translation and qa stop at the first newline, long before this


class MissingDependency(GPT2LabError, ImportError):
    """A metric library that only the zero-shot tasks need is not installed."""


# -- prompts, exactly as the paper formats them ------------------------------------------------------


def summarization_prompt(article: str) -> str:
    """The article, then the cue "TL;DR:" on a line of its own."""
    return article.strip() + "\nTL;DR:"


def translation_prompt(shots: Sequence[tuple[str, str]], english: str) -> str:
    """One "english sentence = french sentence" line per example pair, then "english sentence =". """
    return "".join(f"{en} = {fr}\n" for en, fr in shots) + f"{english} ="


def qa_prompt(story: str, history: Sequence[tuple[str, str]], question: str) -> str:
    """The story, a blank line, the turns so far as "Q: ...\\nA: ..." lines, then "Q: question\\nA:"."""
    turns = "".join(f"Q: {q}\nA: {a}\n" for q, a in history)
    return f"{story.strip()}\n\n{turns}Q: {question}\nA:"


def first_sentences(text: str, n: int = SUMMARY_SENTENCES) -> str:
    """The first n sentences of `text` (a sentence ends at . ! or ? followed by white space)."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return " ".join(sentences[:n])


# -- CoQA's F1, as its official evaluation script computes it ----------------------------------------


def coqa_normalize(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse white space (CoQA's rule)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text, flags=re.UNICODE).split())


def coqa_f1(prediction: str, gold: str | Sequence[str]) -> float:
    """Token F1 of the normalised answers; with several gold answers, the best of them."""
    if not isinstance(gold, str):
        return max(coqa_f1(prediction, g) for g in gold)
    pred, ref = coqa_normalize(prediction).split(), coqa_normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


# -- reading the files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One prompt to complete and the reference(s) its output is scored against."""

    prompt: str
    reference: str
    where: dict[str, Any]  # where it came from in the file, for the per-example results


def _text(obj: dict[str, Any], key: str, where: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise TaskFormatError(f"{where}: expected a non-empty string field {key!r} ({what})")
    return value


def read_summarization(path: Path) -> list[Example]:
    """CNN/DailyMail's rows: {"article", "highlights"} ("summary" is taken for "highlights")."""
    examples = []
    for n, obj in read_jsonl(path):
        key = "highlights" if "highlights" in obj else "summary"
        article = _text(obj, "article", f"{path}:{n}", "CNN/DailyMail's article, highlights")
        gold = _text(obj, key, f"{path}:{n}", "the reference: 'highlights' or 'summary'")
        examples.append(Example(summarization_prompt(article), gold, {"line": n}))
    return examples


def read_translation(path: Path, shots: int) -> tuple[list[Example], list[tuple[str, str]]]:
    """The scored rows {"en", "fr"}, and the first `shots` rows, which become every prompt's examples."""
    pairs = [((_text(obj, "en", f"{path}:{n}", 'a row is {"en": ..., "fr": ...}'),
               _text(obj, "fr", f"{path}:{n}", 'a row is {"en": ..., "fr": ...}')), n) for n, obj in read_jsonl(path)]
    for (en, fr), n in pairs:
        if "\n" in en or "\n" in fr:
            raise TaskFormatError(f"{path}:{n}: a sentence pair holds a newline, which ends a translation")
    if len(pairs) <= shots:
        raise TaskFormatError(f"{path} has {len(pairs)} rows: --shots {shots} takes the first {shots} as examples, "
                              "leaving none to score")
    context = [pair for pair, _ in pairs[:shots]]
    return [Example(translation_prompt(context, en), fr, {"line": n}) for (en, fr), n in pairs[shots:]], context


def _answer(value: Any) -> str | None:
    """CoQA gives turns as strings or as {"input_text": ...} objects (its own files)."""
    value = value.get("input_text") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def read_qa(path: Path) -> list[Example]:
    """CoQA's rows {"story", "questions", "answers"}: one example per turn, after the gold turns before it."""
    examples = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        story = _text(obj, "story", where, 'a row is {"story", "questions", "answers"}, as CoQA\'s')
        questions, answers = obj.get("questions"), obj.get("answers")
        if not isinstance(questions, list) or not isinstance(answers, list) or not questions:
            raise TaskFormatError(f"{where}: 'questions' and 'answers' must be non-empty lists (CoQA's)")
        if len(questions) != len(answers):
            raise TaskFormatError(f"{where}: {len(questions)} questions but {len(answers)} answers")
        turns = [(_answer(q), _answer(a)) for q, a in zip(questions, answers, strict=True)]
        for t, (q, a) in enumerate(turns):
            if q is None or a is None:
                raise TaskFormatError(f"{where}: turn {t}: questions and answers must be strings or "
                                      '{"input_text": ...} objects')
            examples.append(Example(qa_prompt(story, turns[:t], q), a, {"line": n, "turn": t}))
    return examples


# -- generating and scoring --------------------------------------------------------------------------


def _metric_library(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingDependency(f"the zero-shot tasks need {name.split('.')[0]}: pip install 'gpt2lab[eval]'") \
            from None


def _generate(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str], config: GenerationConfig,
              batch_size: int, task: str, progress: bool) -> list[str]:
    generator = Generator(model, tokenizer)
    texts: list[str] = []
    with tqdm(total=len(prompts), unit="example", desc=task, disable=None if progress else True) as bar:
        for i in range(0, len(prompts), batch_size):
            texts += [c.text or "" for c in generator.generate(list(prompts[i:i + batch_size]), config)]
            bar.update(min(batch_size, len(prompts) - i))
    return texts


def check_options(task: str, batch_size: int, limit: int | None, seed: int, shots: int) -> None:
    """Refuse bad options before a model is loaded."""
    if task not in get_args(ZeroShotTask):
        raise ConfigError(f"unknown zero-shot task {task!r}; choose {', '.join(get_args(ZeroShotTask))}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be a positive number of examples, got {limit}")
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"--seed must be from 0 to 2**64 - 1, got {seed}")
    if shots < 0:
        raise ConfigError(f"--shots must be 0 or more example pairs, got {shots}")


def evaluate_zeroshot(model: GPT, tokenizer: Tokenizer, *, task: ZeroShotTask, data: str | Path, batch_size: int = 8,
                      limit: int | None = None, seed: int = SEED, shots: int = SHOTS,
                      progress: bool = False) -> dict[str, Any]:
    """Generate for every example of `data` as the paper did and score it; `limit` keeps the first N examples
    (qa: N turns; translation: N rows after the example pairs). The results are shaped as evaluate_model's."""
    check_options(task, batch_size, limit, seed, shots)
    data = Path(data)
    if not data.is_file():
        raise TaskFormatError(f"{data} is not a file: give the {task} data file")
    started = time.perf_counter()
    result = _run(model, tokenizer, task, data, batch_size, limit, seed, shots, progress)
    return {"task": task, "data": str(data), "n_examples": len(result["examples"]), **result,
            "seconds": time.perf_counter() - started}


def _run(model: GPT, tokenizer: Tokenizer, task: str, data: Path, batch_size: int, limit: int | None, seed: int,
         shots: int, progress: bool) -> dict[str, Any]:
    common = {"truncate_prompt": True, "stop_at_eot": True}
    extra: dict[str, Any] = {}
    if task == "summarization":
        scorer_module = _metric_library("rouge_score.rouge_scorer")
        examples = read_summarization(data)
        config = GenerationConfig(max_new_tokens=SUMMARY_TOKENS, top_k=2, temperature=1.0, seed=seed, **common)
        extra["decoding"] = f"top-k sampling, k=2, temperature 1, {SUMMARY_TOKENS} tokens, seed {seed}; " \
                            f"summary = the first {SUMMARY_SENTENCES} sentences"
    elif task == "translation":
        sacrebleu = _metric_library("sacrebleu")
        examples, context = read_translation(data, shots)
        config = GenerationConfig(max_new_tokens=ANSWER_TOKENS, greedy=True, stop=("\n",), **common)
        extra.update(shots=context, decoding="greedy; translation = the text up to the first newline")
    else:
        examples = read_qa(data)
        config = GenerationConfig(max_new_tokens=ANSWER_TOKENS, greedy=True, stop=("\n",), **common)
        extra["decoding"] = "greedy; answer = the text up to the first newline"
    if not examples:
        raise TaskFormatError(f"{data} holds no examples")
    examples = examples[:limit]
    generated = _generate(model, tokenizer, [ex.prompt for ex in examples], config, batch_size, task, progress)
    golds = [ex.reference for ex in examples]
    if task == "summarization":
        outputs = [first_sentences(text) for text in generated]
        scorer = scorer_module.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        scores = [{k: s.fmeasure for k, s in scorer.score(gold, out).items()} for gold, out in zip(golds, outputs,
                                                                                                      strict=True)]
        metrics = {k: sum(s[k] for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}
        scoring = "ROUGE-1/2/L F-measure (rouge-score, use_stemmer=True), averaged over articles"
    elif task == "translation":
        outputs = [text.strip() for text in generated]
        metrics = {"bleu": sacrebleu.corpus_bleu(outputs, [golds]).score}
        scores = [{} for _ in outputs]
        scoring = "corpus BLEU, sacrebleu's defaults (13a tokenisation, 0-100)"
    else:
        outputs = [text.strip() for text in generated]
        scores = [{"f1": coqa_f1(out, gold)} for gold, out in zip(golds, outputs, strict=True)]
        metrics = {"f1": sum(s["f1"] for s in scores) / len(scores)}
        scoring = "CoQA F1: token overlap after CoQA's normalisation (lowercase, no punctuation or a/an/the)"
    return {
        "metrics": metrics, "scoring": scoring, **extra,
        "examples": [{**ex.where, "prompt": ex.prompt, "generated": text, "output": out, "reference": ex.reference,
                      **score} for ex, text, out, score in zip(examples, generated, outputs, scores, strict=True)],
    }
