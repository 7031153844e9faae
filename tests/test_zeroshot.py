"""The GPT-2 paper's generative tasks: prompts in the paper's format, decoding through the Generator, and
metrics that equal the reference libraries (rouge-score, sacrebleu, CoQA's F1) called on the same outputs."""

import json
import re
import sys

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from gpt2lab import GPT, Tokenizer, preset, save_checkpoint
from gpt2lab import zeroshot as zs
from gpt2lab.checkpoint import load_model, load_tokenizer
from gpt2lab.cli import main
from gpt2lab.errors import TaskFormatError
from gpt2lab.generate import GenerationConfig, Generator

ARTICLES = [
    {"article": "The council met on Monday. It voted to build a new bridge over the river.",
     "highlights": "Council votes for a new bridge.\nWork starts next year."},
    {"article": "A storm hit the coast. Thousands lost power for two days.", "summary": "Storm cuts power."},
]
PAIRS = [{"en": "The cat is black.", "fr": "Le chat est noir."}, {"en": "I like bread.", "fr": "J'aime le pain."},
         {"en": "Good morning.", "fr": "Bonjour."}, {"en": "The house is big.", "fr": "La maison est grande."},
         {"en": "Thank you very much.", "fr": "Merci beaucoup."}]
STORIES = [
    {"story": "Anna had a red kite. She flew it on the hill with her brother Tom.",
     "questions": ["What did Anna have?", "What colour was it?", "Who was with her?"],
     "answers": ["a kite", "red", "her brother Tom"]},
    {"story": "The shop opened at nine.", "questions": [{"input_text": "When did the shop open?", "turn_id": 1}],
     "answers": [{"input_text": "at nine", "span_start": 17}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's own tokenizer, saved as a checkpoint, and loaded back."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("zeroshot") / "ckpt"
    save_checkpoint(GPT(preset("gpt2-nano", vocab_size=50257, n_ctx=256)), folder, tokenizer=Tokenizer.gpt2())
    tok = load_tokenizer(folder)
    return folder, load_model(folder, tokenizer=tok), tok


# -- prompts -------------------------------------------------------------------------------------------------------


def test_prompts_are_the_papers_formats():
    assert zs.summarization_prompt("An article.") == "An article.\nTL;DR:"
    shots = [("The cat is black.", "Le chat est noir."), ("Good morning.", "Bonjour.")]
    assert zs.translation_prompt(shots, "Thank you.") == \
        "The cat is black. = Le chat est noir.\nGood morning. = Bonjour.\nThank you. ="
    assert zs.translation_prompt([], "Thank you.") == "Thank you. ="
    assert zs.qa_prompt("A story.", [("Who?", "Anna"), ("What?", "a kite")], "Where?") == \
        "A story.\n\nQ: Who?\nA: Anna\nQ: What?\nA: a kite\nQ: Where?\nA:"
    assert zs.qa_prompt("A story.", [], "Who?") == "A story.\n\nQ: Who?\nA:"


def test_a_summary_is_the_first_three_sentences():
    assert zs.first_sentences("One. Two!  Three?\nFour. Five") == "One. Two! Three?"
    assert zs.first_sentences("no full stop at all") == "no full stop at all"
    assert zs.first_sentences("") == ""


# -- CoQA's F1 -----------------------------------------------------------------------------------------------------


def test_coqa_normalisation():
    assert zs.coqa_normalize("The  Cat, sat!") == "cat sat"
    assert zs.coqa_normalize("An apple a day") == "apple day"
    assert zs.coqa_normalize("theatre") == "theatre"  # articles only as whole words


def test_coqa_f1_on_worked_examples():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: P = 2/2, R = 2/3, F1 = 0.8.
    assert zs.coqa_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert zs.coqa_f1("The cat sat.", "cat sat") == 1.0
    assert zs.coqa_f1("dog", "cat") == 0.0
    assert zs.coqa_f1("the", "") == 1.0 and zs.coqa_f1("a", "cat") == 0.0  # empty after normalising
    assert zs.coqa_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets
    assert zs.coqa_f1("red", ["blue", "red kite", "red"]) == 1.0  # the best gold answer


# -- the tasks, against the libraries --------------------------------------------------------------------------


def test_summarization_matches_rouge_score_and_the_generator(checkpoint, tmp_path):
    _, model, tok = checkpoint
    data = write_jsonl(tmp_path / "cnn.jsonl", ARTICLES)
    result = zs.evaluate_zeroshot(model, tok, task="summarization", data=data, batch_size=2, seed=7)
    examples = result["examples"]
    assert result["task"] == "summarization" and result["n_examples"] == 2
    assert [e["prompt"] for e in examples] == [a["article"] + "\nTL;DR:" for a in ARTICLES]
    assert [e["reference"] for e in examples] == [ARTICLES[0]["highlights"], ARTICLES[1]["summary"]]
    # The paper's decoding, through the Generator: top-k 2, 100 tokens, seeded; each prompt alone gives the same.
    config = GenerationConfig(max_new_tokens=100, top_k=2, temperature=1.0, seed=7, truncate_prompt=True)
    for e in examples:
        assert Generator(model, tok).generate(e["prompt"], config)[0].text == e["generated"]
        assert e["output"] == zs.first_sentences(e["generated"])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(e["reference"], e["output"]) for e in examples]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert result["metrics"][key] == pytest.approx(sum(s[key].fmeasure for s in scores) / 2)
    # Reproducible: the same seed gives the same summaries, another seed others.
    again = zs.evaluate_zeroshot(model, tok, task="summarization", data=data, batch_size=1, seed=7)
    assert [e["generated"] for e in again["examples"]] == [e["generated"] for e in examples]
    other = zs.evaluate_zeroshot(model, tok, task="summarization", data=data, seed=8)
    assert [e["generated"] for e in other["examples"]] != [e["generated"] for e in examples]


def test_summarization_scores_a_known_output_as_rouge_score_does(checkpoint, tmp_path, monkeypatch):
    """With the generation fixed, the metric is rouge-score's on the first three sentences."""
    _, model, tok = checkpoint
    data = write_jsonl(tmp_path / "cnn.jsonl", ARTICLES[:1])
    monkeypatch.setattr(zs, "_generate", lambda *a, **k: [" The council voted. A bridge! It is new. Fourth."])
    result = zs.evaluate_zeroshot(model, tok, task="summarization", data=data)
    assert result["examples"][0]["output"] == "The council voted. A bridge! It is new."
    expected = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True).score(
        ARTICLES[0]["highlights"], "The council voted. A bridge! It is new.")["rouge2"].fmeasure
    assert result["metrics"]["rouge2"] == pytest.approx(expected) and expected > 0


def test_translation_matches_sacrebleu_and_uses_the_first_rows_as_examples(checkpoint, tmp_path):
    _, model, tok = checkpoint
    data = write_jsonl(tmp_path / "wmt.jsonl", PAIRS)
    result = zs.evaluate_zeroshot(model, tok, task="translation", data=data, shots=2, batch_size=2)
    examples = result["examples"]
    assert result["n_examples"] == 3 and [e["line"] for e in examples] == [3, 4, 5]
    context = "The cat is black. = Le chat est noir.\nI like bread. = J'aime le pain.\n"
    assert [e["prompt"] for e in examples] == [context + p["en"] + " =" for p in PAIRS[2:]]
    for e in examples:  # greedy, cut at the first newline
        greedy = Generator(model, tok).generate(e["prompt"], max_new_tokens=64, greedy=True, truncate_prompt=True)
        assert e["generated"] == greedy[0].text.split("\n")[0]
        assert e["output"] == e["generated"].strip()
    refs = [p["fr"] for p in PAIRS[2:]]
    assert result["metrics"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu([e["output"] for e in examples],
                                                                            [refs]).score)
    assert zs.evaluate_zeroshot(model, tok, task="translation", data=data, shots=2, limit=1)["n_examples"] == 1


def test_translation_bleu_of_known_outputs(checkpoint, tmp_path, monkeypatch):
    _, model, tok = checkpoint
    data = write_jsonl(tmp_path / "wmt.jsonl", PAIRS)
    outputs = [" Bonjour.", " La maison est grande.", " Merci."]
    monkeypatch.setattr(zs, "_generate", lambda *a, **k: outputs)
    result = zs.evaluate_zeroshot(model, tok, task="translation", data=data, shots=2)
    expected = sacrebleu.corpus_bleu([o.strip() for o in outputs], [[p["fr"] for p in PAIRS[2:]]]).score
    assert result["metrics"]["bleu"] == pytest.approx(expected) and 0 < expected < 100


def test_qa_scores_every_turn_with_coqa_f1(checkpoint, tmp_path, monkeypatch):
    _, model, tok = checkpoint
    data = write_jsonl(tmp_path / "coqa.jsonl", STORIES)
    result = zs.evaluate_zeroshot(model, tok, task="qa", data=data, batch_size=3)
    examples = result["examples"]
    assert result["n_examples"] == 4 and [(e["line"], e["turn"]) for e in examples] == [(1, 0), (1, 1), (1, 2), (2, 0)]
    story = STORIES[0]["story"]
    assert examples[2]["prompt"] == (f"{story}\n\nQ: What did Anna have?\nA: a kite\nQ: What colour was it?\nA: red\n"
                                     "Q: Who was with her?\nA:")
    assert examples[3]["prompt"] == "The shop opened at nine.\n\nQ: When did the shop open?\nA:"
    for e in examples:
        greedy = Generator(model, tok).generate(e["prompt"], max_new_tokens=64, greedy=True, truncate_prompt=True)
        assert e["generated"] == greedy[0].text.split("\n")[0]
        assert e["f1"] == zs.coqa_f1(e["output"], e["reference"])
    assert result["metrics"]["f1"] == pytest.approx(sum(e["f1"] for e in examples) / 4)
    assert zs.evaluate_zeroshot(model, tok, task="qa", data=data, limit=2)["n_examples"] == 2
    # Known answers: exact but for punctuation and case, wrong, a superset (P 3/5, R 1), a subset (P 1, R 1/2).
    monkeypatch.setattr(zs, "_generate", lambda *a, **k: [" A kite.", " blue", " Tom and her brother here", " nine"])
    known = zs.evaluate_zeroshot(model, tok, task="qa", data=data)
    f1s = [e["f1"] for e in known["examples"]]
    assert f1s == pytest.approx([1.0, 0.0, 2 * (3 / 5) * 1 / (3 / 5 + 1), 2 * 1 * 0.5 / 1.5])
    assert known["metrics"]["f1"] == pytest.approx(sum(f1s) / 4)


def test_the_command_runs_each_task_and_writes_per_example_results(checkpoint, tmp_path, capsys):
    folder = checkpoint[0]
    files = {"summarization": write_jsonl(tmp_path / "cnn.jsonl", ARTICLES),
             "translation": write_jsonl(tmp_path / "wmt.jsonl", PAIRS),
             "qa": write_jsonl(tmp_path / "coqa.jsonl", STORIES)}
    metrics = {"summarization": {"rouge1", "rouge2", "rougeL"}, "translation": {"bleu"}, "qa": {"f1"}}
    for task, data in files.items():
        out = tmp_path / f"{task}.json"
        assert main(["eval", str(folder), "--task", task, "--data", str(data), "--out", str(out), "--per-example",
                     "--limit", "2", "--shots", "3", "--seed", "1"]) == 0
        assert capsys.readouterr().out.startswith(f"{task} on {data}: ")
        saved = json.loads(out.read_text())
        assert set(saved["metrics"]) == metrics[task] and len(saved["examples"]) == 2


# -- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, rows, message", [
    ("qa", [STORIES[0], {"story": "s", "questions": ["q"]}], r"coqa\.jsonl:2: 'questions' and 'answers' must be"),
    ("qa", [{"story": "s", "questions": ["q", "r"], "answers": ["a"]}], r"coqa\.jsonl:1: 2 questions but 1 answers"),
    ("qa", [{"story": "s", "questions": [{"text": "q"}], "answers": ["a"]}], r"coqa\.jsonl:1: turn 0: questions"),
    ("qa", [{"questions": ["q"], "answers": ["a"]}], r"coqa\.jsonl:1: expected a non-empty string field 'story'"),
    ("summarization", [{"article": "a"}], r"coqa\.jsonl:1: .*'summary'"),
    ("translation", [{"en": "a", "fr": "b"}, {"en": "c"}], r"coqa\.jsonl:2: .*'fr'"),
    ("translation", PAIRS[:3], r"has 3 rows: --shots 3 takes the first 3"),
], ids=["no-answers", "lengths", "turn-shape", "no-story", "no-summary", "no-fr", "all-shots"])
def test_bad_rows_give_one_line_errors(checkpoint, tmp_path, capsys, task, rows, message):
    folder, model, tok = checkpoint
    data = write_jsonl(tmp_path / "coqa.jsonl", rows)
    with pytest.raises(TaskFormatError, match=message):
        zs.evaluate_zeroshot(model, tok, task=task, data=data)
    assert main(["eval", str(folder), "--task", task, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2lab: error:") and err.count("\n") == 1 and re.search(message, err)


def test_bad_options_are_refused(checkpoint, tmp_path, capsys):
    folder = checkpoint[0]
    data = write_jsonl(tmp_path / "wmt.jsonl", PAIRS)
    for option in (["--shots", "-1"], ["--seed", "-1"], ["--batch-size", "0"], ["--limit", "0"]):
        assert main(["eval", str(folder), "--task", "translation", "--data", str(data), *option]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and option[0] in err


def test_a_missing_metric_library_says_what_to_install(monkeypatch, checkpoint, tmp_path):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # what an uninstalled module looks like to import
    message = r"^the zero-shot tasks need sacrebleu: pip install 'gpt2lab\[eval\]'$"
    with pytest.raises(zs.MissingDependency, match=message):
        zs.evaluate_zeroshot(checkpoint[1], checkpoint[2], task="translation",
                             data=write_jsonl(tmp_path / "wmt.jsonl", PAIRS))
