"""Perplexity and zero-shot benchmarks, scored exactly as the reference implementations score them.

Perplexity is Hugging Face's sliding-window method ("Perplexity of fixed-length models"):
windows of n_ctx tokens start every `stride` tokens, and each window scores only the tokens the
previous one did not reach, so (for stride < n_ctx) every token but the first is scored exactly
once, with at least n_ctx - stride tokens of context (all of them, near the start). The docs' loop multiplies each
window's mean loss by its label count minus one, which is the number of scored tokens only for the
first window; we add up per-token losses, the sum that loop sets out to compute.

The benchmarks are lm-evaluation-harness "loglikelihood" requests: a (context, continuation) pair
of strings is tokenized as lm-eval's `_encode_pair` does (trailing spaces of the context move to
the continuation; the continuation's tokens are those of context + continuation after the
context's), truncated on the left to n_ctx tokens, and scored as the sum of the continuation
tokens' log-probabilities, plus whether greedy decoding would have produced it.
    lambada          lm-eval's lambada_openai: context = all but the last space-separated word,
                     continuation = " " + last word; acc = greedy, perplexity = exp(-mean sum).
    hellaswag        lm-eval's hellaswag: its preprocessing, continuation = " " + ending; acc
                     ranks sums, acc_norm ranks sums divided by the ending's length in characters.
    multiple-choice  BIG-bench JSON tasks, formatted as BIG-bench does (zero-shot); the grade is the
                     target score of the choice with the highest log-likelihood.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import ConfigError, TaskFormatError
from .fetch import Package, fetch_package
from .model import GPT
from .tokenizer import Tokenizer

Task = Literal["perplexity", "lambada", "hellaswag", "multiple-choice"]

# BIG-bench's JSON tasks: the task.json files of the bigbench 1.0.0 sdist (fetched on first use, for
# `gpt2lab eval --data bigbench:TASK`; they are evaluation data, not a corpus `prepare` knows).
BIGBENCH_PACKAGE = Package(
    name="bigbench", version="1.0.0", sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    include=("bigbench/benchmark_tasks/*/task.json",),  # fnmatch's * spans subtask folders
    pip=Package(name="pip", version="25.0.1", include=("pip/*",),
                sha256="c46efd13b6aa8279f33f2864459c8ce587ea6a1a59ee20de055868d8f7688f7f"),
)
BIGBENCH_FILES = "bigbench/benchmark_tasks/*/task.json"  # glob, relative to the package root
# The JSON tasks of the pinned bigbench 1.0.0 sdist: the folders of bigbench/benchmark_tasks that hold a
# task.json (programmatic tasks have a task.py instead and are not extracted). Listed here so that a
# misspelt name is refused before the 358 MB archive is fetched; subtasks are checked once it is there.
BIGBENCH_TASKS = (
    "abstract_narrative_understanding", "anachronisms", "analogical_similarity", "analytic_entailment", "arithmetic",
    "ascii_word_recognition", "authorship_verification", "auto_categorization", "auto_debugging", "bbq_lite_json",
    "bridging_anaphora_resolution_barqa", "causal_judgment", "cause_and_effect", "checkmate_in_one",
    "chess_state_tracking", "chinese_remainder_theorem", "cifar10_classification", "code_line_description",
    "codenames", "color", "common_morpheme", "conceptual_combinations", "conlang_translation",
    "contextual_parametric_knowledge_conflicts", "crash_blossom", "crass_ai", "cryobiology_spanish", "cryptonite",
    "cs_algorithms", "dark_humor_detection", "date_understanding", "disambiguation_qa", "discourse_marker_prediction",
    "disfl_qa", "dyck_languages", "elementary_math_qa", "emoji_movie", "emojis_emotion_prediction",
    "empirical_judgments", "english_proverbs", "english_russian_proverbs", "entailed_polarity",
    "entailed_polarity_hindi", "epistemic_reasoning", "evaluating_information_essentiality", "fact_checker",
    "fantasy_reasoning", "few_shot_nlg", "figure_of_speech_detection", "formal_fallacies_syllogisms_negation", "gem",
    "gender_inclusive_sentences_german", "general_knowledge", "geometric_shapes", "goal_step_wikihow",
    "gre_reading_comprehension", "hhh_alignment", "hindi_question_answering", "hindu_knowledge", "hinglish_toxicity",
    "human_organs_senses", "hyperbaton", "identify_math_theorems", "identify_odd_metaphor", "implicatures",
    "implicit_relations", "intent_recognition", "international_phonetic_alphabet_nli",
    "international_phonetic_alphabet_transliterate", "intersect_geometry", "irony_identification", "kanji_ascii",
    "kannada", "key_value_maps", "known_unknowns", "language_games", "language_identification", "linguistic_mappings",
    "linguistics_puzzles", "list_functions", "logic_grid_puzzle", "logical_args", "logical_deduction",
    "logical_fallacy_detection", "logical_sequence", "mathematical_induction", "matrixshapes", "metaphor_boolean",
    "metaphor_understanding", "minute_mysteries_qa", "misconceptions", "misconceptions_russian", "mnist_ascii",
    "modified_arithmetic", "moral_permissibility", "movie_dialog_same_or_different", "movie_recommendation",
    "mult_data_wrangling", "multiemo", "natural_instructions", "navigate", "nonsense_words_grammar", "novel_concepts",
    "object_counting", "odd_one_out", "operators", "paragraph_segmentation", "parsinlu_qa",
    "parsinlu_reading_comprehension", "penguins_in_a_table", "periodic_elements", "persian_idioms",
    "phrase_relatedness", "physical_intuition", "physics", "physics_questions", "play_dialog_same_or_different",
    "polish_sequence_labeling", "presuppositions_as_nli", "qa_wikidata", "question_selection", "real_or_fake_text",
    "reasoning_about_colored_objects", "repeat_copy_logic", "rephrase", "riddle_sense", "ruin_names",
    "salient_translation_error_detection", "scientific_press_release", "semantic_parsing_in_context_sparc",
    "semantic_parsing_spider", "sentence_ambiguity", "similarities_abstraction", "simp_turing_concept",
    "simple_arithmetic_json", "simple_arithmetic_json_multiple_choice", "simple_arithmetic_json_subtasks",
    "simple_arithmetic_multiple_targets_json", "simple_ethical_questions", "simple_text_editing", "snarks",
    "social_iqa", "social_support", "sports_understanding", "strange_stories", "strategyqa", "sufficient_information",
    "suicide_risk", "swahili_english_proverbs", "swedish_to_german_proverbs", "symbol_interpretation",
    "temporal_sequences", "tense", "timedial", "topical_chat", "tracking_shuffled_objects", "understanding_fables",
    "undo_permutation", "unit_conversion", "unit_interpretation", "unnatural_in_context_learning",
    "vitaminc_fact_verification", "what_is_the_tao", "which_wiki_edit", "winowhy", "word_sorting", "word_unscrambling",
)
BIGBENCH_SEED = 42  # lm-eval's BIG-bench port orders the choices listed in a prompt with RandomState(42)
HEAD_ROWS = 2048  # positions put through the output head at once: bounds the (rows, vocab) logits in memory


# -- scoring token ids ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; tokens [first, end) are scored."""

    begin: int
    end: int
    first: int


def sliding_windows(n_tokens: int, n_ctx: int, stride: int) -> list[Window]:
    """Hugging Face's windows: one starts every `stride` tokens until one reaches the end.

    With stride < n_ctx every token after the first is scored once; with stride == n_ctx (disjoint
    windows) the first token of each window is not scored at all, exactly as in HF's loop.
    """
    if not 1 <= stride <= n_ctx:
        raise ConfigError(f"stride must be in 1..n_ctx ({n_ctx}), got {stride}: a longer one would skip tokens")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + n_ctx, n_tokens)
        # A window's first token has no context in it, so it is scored only by an earlier window (if
        # the windows overlap, i.e. stride < n_ctx); the sequence's first token is never scored.
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def token_logprobs(model: GPT, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and whether it is the argmax, for hidden states (N, C) and target ids (N,).

    Only the scored positions go through the output head, in slices, so a batch never holds a
    (B, T, vocab) tensor of logits it would mostly throw away.
    """
    logps, argmax = [], []
    for h, t in zip(hidden.split(HEAD_ROWS), targets.split(HEAD_ROWS), strict=True):
        logp = F.log_softmax(model.lm_head(h).float(), dim=-1)  # (n, V)
        logps.append(logp.gather(1, t[:, None]).squeeze(1))
        argmax.append(logp.argmax(dim=-1) == t)
    return torch.cat(logps), torch.cat(argmax)


def score_windows(model: GPT, ids: Sequence[int], windows: Sequence[Window], *, batch_size: int = 4,
                  progress: bool = False) -> list[float]:
    """The summed negative log-likelihood (nats) of each window's scored tokens."""
    device = model.transformer.ln_f.weight.device
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    nlls: list[float] = []
    with torch.inference_mode(), tqdm(total=len(windows), unit="window", desc="perplexity",
                                      disable=None if progress else True) as bar:
        for batch in _equal_length_batches(windows, batch_size):
            x = torch.stack([ids_t[w.begin:w.end] for w in batch]).to(device)  # (B, T)
            hidden = model.hidden(x)  # (B, T, C)
            # The hidden state at local position j predicts token begin + j + 1.
            rows = [hidden[r, w.first - w.begin - 1:w.end - w.begin - 1] for r, w in enumerate(batch)]
            targets = torch.cat([ids_t[w.first:w.end] for w in batch]).to(device)
            logp, _ = token_logprobs(model, torch.cat(rows), targets)
            nlls += [-float(s.sum()) for s in logp.double().split([w.end - w.first for w in batch])]
            bar.update(len(batch))
    return nlls


def _equal_length_batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of one length, batch_size at a time (only the last window is shorter)."""
    batch: list[Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or w.end - w.begin != batch[0].end - batch[0].begin):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


@dataclass(frozen=True)
class Score:
    """A continuation's summed log-probability (nats), and whether greedy decoding produces it."""

    logprob: float
    greedy: bool


def score_continuations(model: GPT, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        batch_size: int = 16, progress: bool = False,
                        labels: Sequence[str] | None = None) -> list[Score]:
    """Score (context ids, continuation ids) pairs as lm-eval does: the last n_ctx + 1 tokens of
    context + continuation, minus the last one, go through the model in one pass.

    labels: what to call each request's continuation in an error (default: "request i's continuation").
    """
    n_ctx = model.config.n_ctx
    inputs: list[list[int]] = []
    for i, (ctx, cont) in enumerate(requests):
        what = labels[i] if labels is not None else f"request {i}'s continuation"
        if not cont:
            raise TaskFormatError(f"{what} is empty; there is nothing to score")
        if len(cont) > n_ctx:
            raise TaskFormatError(f"{what} has {len(cont)} tokens, more than the model's context ({n_ctx}); "
                                  "it cannot be scored in one window")
        inputs.append((list(ctx) + list(cont))[-(n_ctx + 1):][:-1])
    # Longest first, as lm-eval: rows of a batch have similar lengths, and running out of memory shows at once.
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    device = model.transformer.ln_f.weight.device
    scores: list[Score | None] = [None] * len(requests)
    with torch.inference_mode(), tqdm(total=len(requests), unit="req", desc="scoring",
                                      disable=None if progress else True) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            # Right padding needs no mask: causal attention never lets a token see the padding after it.
            x = torch.zeros(len(chunk), len(inputs[chunk[0]]), dtype=torch.long)
            for r, i in enumerate(chunk):
                x[r, :len(inputs[i])] = torch.tensor(inputs[i])
            hidden = model.hidden(x.to(device))  # (B, T, C)
            rows, targets, sizes = [], [], []
            for r, i in enumerate(chunk):
                cont, n = requests[i][1], len(inputs[i])
                rows.append(hidden[r, n - len(cont):n])  # the positions that predict the continuation
                targets += cont
                sizes.append(len(cont))
            logp, hit = token_logprobs(model, torch.cat(rows), torch.tensor(targets, device=device))
            for i, lp, g in zip(chunk, logp.double().split(sizes), hit.split(sizes), strict=True):
                scores[i] = Score(logprob=float(lp.sum()), greedy=bool(g.all()))
            bar.update(len(chunk))
    return scores  # type: ignore[return-value]


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: the context's trailing spaces go to the continuation, and the
    continuation's ids are those of context + continuation after the context's (an empty context
    is the end-of-text token, as lm-eval's)."""
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


# -- task files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultipleChoice:
    """One question: its context, its choices, and each choice's target score (1 = right, 0 = wrong)."""

    context: str
    choices: tuple[str, ...]
    scores: tuple[float, ...]
    delimiter: str = " "  # goes between the context and each choice


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TaskFormatError(f"{path}:{line}: not UTF-8 (byte {e.start}); convert the file to UTF-8") from None
    if not text:
        raise TaskFormatError(f"{path} is empty: there is nothing to score")
    return text


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file."""
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFormatError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TaskFormatError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def read_lambada(path: Path) -> list[tuple[str, str]]:
    """(context, " " + last word) for each line of OpenAI's LAMBADA jsonl ({"text": ...})."""
    examples = []
    for n, obj in read_jsonl(path):
        text = obj.get("text")
        if not isinstance(text, str):
            raise TaskFormatError(f"{path}:{n}: expected a string field 'text' (OpenAI's LAMBADA jsonl)")
        context, _, word = text.rpartition(" ")
        if not context or not word:
            raise TaskFormatError(f"{path}:{n}: the text needs context, a space and a last word; got {text[:60]!r}")
        examples.append((context, " " + word))
    return examples


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: WikiHow's bracketed artifacts out, double spaces single."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[MultipleChoice]:
    """HellaSwag's jsonl (ctx_a, ctx_b, activity_label, endings, label), preprocessed as lm-eval does."""
    examples = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        for key in ("activity_label", "ctx_a", "ctx_b"):
            if not isinstance(obj.get(key), str):
                raise TaskFormatError(f"{where}: expected a string field {key!r} (HellaSwag's jsonl)")
        endings = obj.get("endings")
        if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)):
            raise TaskFormatError(f"{where}: 'endings' must be a list of at least two strings")
        label = obj.get("label")
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if label == "" or label is None:
            raise TaskFormatError(f"{where}: no label (HellaSwag's test split is unlabeled; use the validation split)")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
            raise TaskFormatError(f"{where}: label {label!r} is not an index into the {len(endings)} endings")
        ctx = obj["ctx_a"] + " " + obj["ctx_b"].capitalize()
        examples.append(MultipleChoice(
            context=_hellaswag_clean(obj["activity_label"] + ": " + ctx),
            choices=tuple(_hellaswag_clean(e) for e in endings),
            scores=tuple(float(i == label) for i in range(len(endings))),
        ))
    return examples


def bigbench_path(spec: str) -> Path:
    """A BIG-bench task file: a path, or bigbench:TASK[/SUBTASK] from the bigbench sdist (fetched once).

    TASK is checked against BIGBENCH_TASKS first, so a wrong name costs no download.
    """
    if not spec.startswith("bigbench:"):
        return Path(spec)
    name = spec.removeprefix("bigbench:").strip("/")
    task, _, subtask = name.partition("/")
    if not name or ".." in Path(name).parts:
        raise TaskFormatError(f"{spec!r} names no BIG-bench task: give bigbench:TASK[/SUBTASK], "
                              "e.g. bigbench:riddle_sense")
    if task not in BIGBENCH_TASKS:
        raise TaskFormatError(f"BIG-bench has no JSON task {task!r} ({_suggest(task, BIGBENCH_TASKS, 'JSON tasks')}); "
                              "programmatic tasks are not supported")
    tasks_dir = bigbench_task_files()[0].parent.parent  # .../bigbench/benchmark_tasks
    path = tasks_dir / name / "task.json"
    # A task split into subtasks keeps its examples in them (its own task.json, if any, has none).
    subtasks = sorted(p.parent.name for p in (tasks_dir / task).glob("*/task.json"))
    if not subtask and subtasks:
        raise TaskFormatError(f"BIG-bench task {task!r} is split into subtasks ({', '.join(subtasks)}); "
                              f"name one, e.g. bigbench:{task}/{subtasks[0]}")
    if not path.is_file():
        known = _suggest(subtask, subtasks, f"subtasks of {task}") if subtasks else f"it has none: name bigbench:{task}"
        raise TaskFormatError(f"BIG-bench task {task!r} has no subtask {subtask!r} ({known})")
    return path


def bigbench_task_files() -> list[Path]:
    """The task.json files of the pinned bigbench sdist, fetched on first use (pip download, sha256-checked, cached)."""
    root = fetch_package(BIGBENCH_PACKAGE)
    files = sorted(root.glob(BIGBENCH_FILES))
    if not files:
        raise TaskFormatError(f"{root} holds no {BIGBENCH_FILES}; delete that folder so it is fetched again")
    return files


def _suggest(name: str, known: Sequence[str], what: str) -> str:
    """`did you mean ...?` with up to five names close to `name`, else how many `what` there are."""
    close = [k for k in known if name and name in k] + difflib.get_close_matches(name, known)
    close = list(dict.fromkeys(close))[:5]
    if close:
        return f"did you mean {', '.join(close)}?"
    return f"the {len(known)} {what} are {', '.join(known[:3])}{', ...' if len(known) > 3 else ''}"


def read_bigbench(path: Path) -> tuple[list[MultipleChoice], dict[str, Any]]:
    """The multiple-choice examples of a BIG-bench JSON task, formatted for zero-shot scoring as
    BIG-bench's JsonTask does, and the prompt settings it used.

    prompt = task_prefix + example_input_prefix + input
             [+ choice_prefix + choice_prefix.join(choices in a fixed shuffled order)]  (append_choices_to_input)
             + example_output_prefix
    with BIG-bench's defaults ("", "\\nQ: ", "\\n  choice: ", true, "\\nA: ") where the task sets none.
    Duplicate examples are dropped and examples without target_scores (generative ones) skipped, as BIG-bench does.
    """
    text = read_text_file(path)
    try:
        task = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        subtasks = sorted(p.parent.name for p in path.parent.glob("*/task.json"))
        hint = f"; its examples are in its subtasks' task.json ({', '.join(subtasks)})" if subtasks else ""
        raise TaskFormatError(f"{path}: expected a BIG-bench task, a JSON object with an 'examples' list{hint}")
    settings = {
        "task_prefix": task.get("task_prefix", ""),
        "example_input_prefix": task.get("example_input_prefix", "\nQ: "),
        "example_output_prefix": task.get("example_output_prefix", "\nA: "),
        "choice_prefix": task.get("choice_prefix", "\n  choice: "),
        "append_choices_to_input": task.get("append_choices_to_input", True),
    }
    # BIG-bench tests this flag for truth, so the "false" (a string) that some tasks write appends the choices.
    settings["append_choices_to_input"] = bool(settings["append_choices_to_input"])
    for key, value in settings.items():
        if not isinstance(value, bool | str):
            raise TaskFormatError(f"{path}: {key!r} must be a string, got {json.dumps(value)[:40]}")
    lines = _example_lines(text, len(task["examples"]))
    examples, seen = [], set()
    for k, ex in enumerate(task["examples"]):
        where = f"{path}:{lines[k]} (examples[{k}])" if lines else f"{path}: examples[{k}]"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise TaskFormatError(f"{where}: an example needs a string 'input'")
        if "target_scores" not in ex:
            continue
        key = json.dumps(ex, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        targets = ex["target_scores"]
        if not (isinstance(targets, dict) and len(targets) >= 2 and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in targets.values())):
            raise TaskFormatError(f"{where}: 'target_scores' must map at least two choices to numbers")
        prompt = settings["example_input_prefix"] + ex["input"]
        if settings["append_choices_to_input"]:
            shown = np.random.RandomState(BIGBENCH_SEED).permutation(sorted(targets))
            prompt += settings["choice_prefix"] + settings["choice_prefix"].join(shown)
        examples.append(MultipleChoice(
            context=settings["task_prefix"] + prompt + settings["example_output_prefix"],
            choices=tuple(targets), scores=tuple(float(v) for v in targets.values()), delimiter="",
        ))
    if not examples:
        raise TaskFormatError(f"{path}: no example has 'target_scores'; it is a generative task, which "
                              "--task multiple-choice cannot score")
    return examples, settings


def _example_lines(text: str, count: int) -> list[int]:
    """The line on which each element of the task's "examples" list starts, or [] if not found."""
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    for match in re.finditer(r'"examples"\s*:\s*\[', text):
        i, line, lines = match.end(), text.count("\n", 0, match.end()) + 1, []
        try:
            while True:
                start = space.match(text, i).end()
                line += text.count("\n", i, start)
                if text[start] == "]":
                    break
                lines.append(line)
                _, i = decoder.raw_decode(text, start)
                line += text.count("\n", start, i)
                i = space.match(text, i).end()
                if text[i] == ",":
                    i += 1
        except (json.JSONDecodeError, IndexError):
            continue
        if len(lines) == count:
            return lines
    return []


# -- tasks -----------------------------------------------------------------------------------------


def perplexity(model: GPT, tokenizer: Tokenizer, text: str, *, stride: int | None = None, batch_size: int = 4,
               limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Sliding-window perplexity of `text` (see the module docstring), in nats/token and bits per byte.

    Bits per byte divide the total by the UTF-8 bytes of the text the windows cover (all of it,
    unless `limit` windows stop earlier), which makes models with different tokenizers comparable.
    """
    n_ctx = model.config.n_ctx
    stride = n_ctx // 2 if stride is None else stride
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise TaskFormatError(f"the text is {len(ids)} token long; perplexity needs at least two tokens")
    windows = sliding_windows(len(ids), n_ctx, stride)[:limit]
    nlls = score_windows(model, ids, windows, batch_size=batch_size, progress=progress)
    covered = windows[-1].end
    n_bytes = len(text.encode("utf-8")) if covered == len(ids) else len(tokenizer.decode_bytes(ids[:covered]))
    n_scored = sum(w.end - w.first for w in windows)
    nll = sum(nlls)
    metrics = {"perplexity": _exp(nll / n_scored), "nats_per_token": nll / n_scored,
               "bits_per_byte": nll / math.log(2) / n_bytes}
    return {
        "metrics": metrics,
        "tokens": len(ids), "tokens_scored": n_scored, "bytes": n_bytes, "windows": len(windows),
        "n_ctx": n_ctx, "stride": stride,
        "scoring": (f"Hugging Face's sliding window: windows of up to {n_ctx} tokens every {stride} tokens, each "
                    "scoring the tokens the previous one did not reach, with at least n_ctx - stride tokens of "
                    "context" + ("" if stride < n_ctx else "; a window's first token is not scored")),
        "examples": [{"begin": w.begin, "end": w.end, "scored_from": w.first, "nll": x}
                     for w, x in zip(windows, nlls, strict=True)],
    }


def lambada(model: GPT, tokenizer: Tokenizer, examples: Sequence[tuple[str, str]], *, batch_size: int = 16,
            progress: bool = False) -> dict[str, Any]:
    """Last-word accuracy (greedy, every token of the word) and last-word perplexity, as lm-eval's lambada_openai."""
    requests = [encode_pair(tokenizer, ctx, word) for ctx, word in examples]
    labels = [f"example {i}'s last word {word.strip()!r}" for i, (_, word) in enumerate(examples)]
    scores = score_continuations(model, requests, batch_size=batch_size, progress=progress, labels=labels)
    logprobs = [s.logprob for s in scores]
    metrics = {"acc": float(np.mean([s.greedy for s in scores])), "perplexity": _exp(-float(np.mean(logprobs)))}
    return {
        "metrics": metrics,
        "scoring": ("lm-eval lambada_openai: context = the text up to its last space, target = ' ' + last word; "
                    "acc = every target token is the greedy choice; perplexity = exp(-mean target log-likelihood)"),
        "examples": [{"target": word, "logprob": s.logprob, "greedy": s.greedy, "tokens": len(req[1])}
                     for (_, word), s, req in zip(examples, scores, requests, strict=True)],
    }


def _exp(x: float) -> float:
    """exp(x), inf where it overflows: a perplexity past 1e308 is still an answer, not a crash."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def multiple_choice(model: GPT, tokenizer: Tokenizer, examples: Sequence[MultipleChoice], *, batch_size: int = 16,
                    progress: bool = False) -> dict[str, Any]:
    """Log-likelihood of each choice; `grade` takes the argmax's target score, `grade_norm` the argmax of
    log-likelihood / len(choice in characters) (lm-eval's acc_norm), `chance` a uniformly random pick's."""
    requests = [encode_pair(tokenizer, ex.context, ex.delimiter + choice) for ex in examples for choice in ex.choices]
    labels = [f"example {k}'s choice {choice!r}" for k, ex in enumerate(examples) for choice in ex.choices]
    flat = iter(score_continuations(model, requests, batch_size=batch_size, progress=progress, labels=labels))
    per_example = []
    for ex in examples:
        lls = np.array([next(flat).logprob for _ in ex.choices])
        lengths = np.array([max(len(c), 1) for c in ex.choices], dtype=float)
        scores = np.array(ex.scores)
        per_example.append({
            "logprobs": lls.tolist(), "scores": ex.scores, "pred": int(lls.argmax()),
            "grade": float(scores[lls.argmax()]), "grade_norm": float(scores[(lls / lengths).argmax()]),
            "chance": float(scores.mean()),
        })
    metrics = {key: float(np.mean([e[key] for e in per_example])) for key in ("grade", "grade_norm", "chance")}
    return {"metrics": metrics, "examples": per_example}


def evaluate_model(model: GPT, tokenizer: Tokenizer, *, task: Task, data: str | Path, stride: int | None = None,
                   batch_size: int = 8, limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Run `task` on the file `data` (for multiple-choice also bigbench:TASK); return the results."""
    _check_options(task, stride, batch_size, limit)
    path = _data_file(task, data)
    started = time.perf_counter()
    if task == "perplexity":
        result = perplexity(model, tokenizer, read_text_file(path), stride=stride, batch_size=batch_size,
                            limit=limit, progress=progress)
    elif task == "lambada":
        result = lambada(model, tokenizer, _some(read_lambada(path), limit, path), batch_size=batch_size,
                         progress=progress)
    elif task == "hellaswag":
        result = multiple_choice(model, tokenizer, _some(read_hellaswag(path), limit, path), batch_size=batch_size,
                                 progress=progress)
        grade = result["metrics"]
        result["metrics"] = {"acc": grade["grade"], "acc_norm": grade["grade_norm"], "chance": grade["chance"]}
        result["scoring"] = ("lm-eval hellaswag: log-likelihood of ' ' + ending given the preprocessed context; "
                             "acc ranks the sums, acc_norm ranks sum / len(ending in characters)")
    elif task == "multiple-choice":
        examples, settings = read_bigbench(path)
        result = multiple_choice(model, tokenizer, _some(examples, limit, path), batch_size=batch_size,
                                 progress=progress)
        grade = result["metrics"]
        result["metrics"] = {"multiple_choice_grade": grade["grade"], "chance": grade["chance"]}
        result["prompt"] = settings
        result["scoring"] = ("BIG-bench multiple_choice_grade, zero-shot: the target score of the choice with the "
                             "highest log-likelihood given BIG-bench's prompt (see 'prompt')")
    seconds = time.perf_counter() - started
    n = result.get("windows", len(result["examples"]))
    return {"task": task, "data": str(path), "n_examples": n, **result, "seconds": seconds}


def _check_options(task: str, stride: int | None, batch_size: int, limit: int | None) -> None:
    if task not in get_args(Task):
        raise ConfigError(f"unknown task {task!r}; choose {', '.join(get_args(Task))}")
    if stride is not None and stride < 1:
        raise ConfigError(f"--stride must be a positive number of tokens, got {stride}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be a positive number of examples, got {limit}")


def _data_file(task: str, data: str | Path) -> Path:
    """The task's data file (bigbench:TASK fetched for multiple-choice), which must exist."""
    path = bigbench_path(str(data)) if task == "multiple-choice" else Path(data)
    if not path.is_file():
        raise TaskFormatError(f"{path} is not a file: give the {task} data file")
    return path


def _some(examples: list[Any], limit: int | None, path: Path) -> list[Any]:
    if not examples:
        raise TaskFormatError(f"{path} holds no examples")
    return examples[:limit]
