"""Evaluation against an oracle: every metric recomputed with transformers' GPT2LMHeadModel and plain torch
on the same random weights, which gpt2lab reads through load_model from the folder HF wrote."""

import errno
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model
from hypothesis import given
from hypothesis import strategies as st

from gpt2lab import evaluate as ev
from gpt2lab.checkpoint import load_model, load_tokenizer
from gpt2lab.cli import main
from gpt2lab.errors import ConfigError, TaskFormatError
from gpt2lab.fetch import cache_dir
from gpt2lab.model import GPT
from gpt2lab.tokenizer import EOT, Tokenizer, Vocabulary

# A real byte-level BPE (the 256 bytes, a few merges, <|endoftext|>), so pairs tokenize as BPE pairs do.
MERGES = ((b" ", b"t"), (b"h", b"e"), (b" t", b"he"), (b"i", b"n"), (b"e", b"r"))
N_CTX = 37  # odd, and shorter than some test texts, so windows and left-truncation are exercised


def tiny_tokenizer() -> Tokenizer:
    tokens = [bytes([b]) for b in range(256)] + [a + b for a, b in MERGES] + [EOT]
    return Tokenizer(Vocabulary(tokens=tuple(tokens), merges=MERGES))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(HF model, the folder it was saved to with its tokenizer, our model loaded from that folder)."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    folder = tmp_path_factory.mktemp("hf")
    hf = hf_model(n_layer=2, n_head=3, n_embd=48, n_ctx=N_CTX, vocab_size=tok.vocab_size)
    hf.save_pretrained(folder)
    tok.save_hf(folder)
    tok = load_tokenizer(folder)
    return hf, folder, load_model(folder, tokenizer=tok), tok


# -- the oracle: Hugging Face's code paths and lm-eval's / BIG-bench's definitions, written out plainly ------------


def hf_sliding_window_nll(hf, ids, stride):
    """HF's documented loop (labels masked with -100), summing each window's token losses exactly."""
    encodings = torch.tensor([ids])
    max_length, seq_len = hf.config.n_positions, encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        n_valid = int((target_ids[:, 1:] != -100).sum())  # the labels the shifted loss averaged over
        nll_sum += loss.item() * n_valid
        n_tokens += n_valid
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


def lm_eval_pair(tok, context, continuation):
    if context == "":
        return [tok.eot_id], tok.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = tok.encode(context + continuation)
    context_enc = tok.encode(context)
    return context_enc, whole_enc[len(context_enc):]


def hf_loglikelihood(hf, context_enc, continuation_enc):
    inp = (context_enc + continuation_enc)[-(hf.config.n_positions + 1):][:-1]
    with torch.no_grad():
        logits = hf(torch.tensor([inp])).logits[0]
    logp = F.log_softmax(logits[len(inp) - len(continuation_enc):], dim=-1)
    target = torch.tensor(continuation_enc)
    return logp[torch.arange(len(target)), target].sum().item(), bool((logp.argmax(-1) == target).all())


def hellaswag_preprocess(text):  # lm-eval tasks/hellaswag/utils.py
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def bigbench_prompt(task, example):  # lm-eval's BIG-bench JSON port, zero-shot
    res = task.get("example_input_prefix", "\nQ: ") + example["input"]
    if task.get("append_choices_to_input", True):
        rng = np.random.RandomState(seed=42)
        choice_prefix = task.get("choice_prefix", "\n  choice: ")
        res += choice_prefix + choice_prefix.join(rng.permutation(sorted(example["target_scores"])))
    return task.get("task_prefix", "") + res + task.get("example_output_prefix", "\nA: ")


# -- sliding windows ---------------------------------------------------------------------------------------------


@given(n=st.integers(1, 300), n_ctx=st.integers(1, 64), data=st.data())
def test_windows_score_every_token_once_with_enough_context(n, n_ctx, data):
    stride = data.draw(st.integers(1, n_ctx))
    windows = ev.sliding_windows(n, n_ctx, stride)
    scored = [t for w in windows for t in range(w.first, w.end)]
    if stride < n_ctx:
        assert scored == list(range(1, n))
    else:  # disjoint windows: each one's first token has no context and is skipped, as in HF's loop
        assert scored == [t for t in range(1, n) if t % n_ctx]
    assert windows[-1].end == n
    for w in windows:
        assert 0 < w.end - w.begin <= n_ctx
        for t in range(w.first, w.end):
            assert t - w.begin >= max(1, min(t, n_ctx - stride))


def test_stride_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match="stride"):
        ev.sliding_windows(100, 16, 17)


# -- perplexity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 7, 18, N_CTX])
def test_perplexity_matches_hf_sliding_window_recipe(models, stride):
    hf, _, ours, tok = models
    text = "the thin tern in the rain thereafter, thé 🌧 " * 4  # 180 ids, so several windows
    ids = tok.encode(text)
    result = ev.perplexity(ours, tok, text, stride=stride, batch_size=3)
    nll, count = hf_sliding_window_nll(hf, ids, stride)
    assert result["tokens_scored"] == count == len(ids) - (1 if stride < N_CTX else result["windows"])
    m = result["metrics"]
    assert m["nats_per_token"] == pytest.approx(nll / count, rel=1e-4)
    assert m["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-4)


def test_perplexity_of_a_text_shorter_than_the_context(models):
    hf, _, ours, tok = models
    ids = tok.encode("in the heather")
    nll, count = hf_sliding_window_nll(hf, ids, 5)
    result = ev.perplexity(ours, tok, "in the heather", stride=5)
    assert (result["windows"], result["tokens_scored"]) == (1, count)
    assert result["metrics"]["nats_per_token"] == pytest.approx(nll / count, rel=1e-4)


def test_perplexity_limit_scores_the_first_windows_and_their_bytes(models):
    _, _, ours, tok = models
    text = "abcdefghij" * 20
    full = ev.perplexity(ours, tok, text, stride=10)
    part = ev.perplexity(ours, tok, text, stride=10, limit=3)
    assert part["windows"] == 3 and part["examples"] == full["examples"][:3]
    assert part["bytes"] == part["examples"][-1]["end"]  # one byte per token here
    assert part["tokens_scored"] == part["examples"][-1]["end"] - 1
    assert part["metrics"]["nats_per_token"] == pytest.approx(
        sum(w["nll"] for w in full["examples"][:3]) / part["tokens_scored"])


# -- log-likelihood requests -----------------------------------------------------------------------------------


def test_continuation_scores_and_greedy_flags_match_hf(models):
    hf, _, ours, tok = models
    g = torch.Generator().manual_seed(3)
    requests = []
    for n_context, n_cont in [(5, 1), (12, 4), (60, 3), (1, 9), (30, N_CTX)]:  # 60 + 3 > n_ctx: truncated left
        ctx = torch.randint(0, tok.vocab_size, (n_context,), generator=g).tolist()
        requests.append((ctx, torch.randint(0, tok.vocab_size, (n_cont,), generator=g).tolist()))
    # Continuations that greedy decoding does produce, so that the flag is seen True as well as False.
    for ctx, _ in requests[:3]:
        greedy = []
        for _ in range(3):
            with torch.no_grad():
                greedy.append(int(hf(torch.tensor([(ctx + greedy)[-N_CTX:]])).logits[0, -1].argmax()))
        requests.append((ctx, greedy))
    scores = ev.score_continuations(ours, requests, batch_size=3)
    for (ctx, cont), s in zip(requests, scores, strict=True):
        logprob, greedy = hf_loglikelihood(hf, ctx, cont)
        assert s.logprob == pytest.approx(logprob, rel=1e-4, abs=1e-4)
        assert s.greedy == greedy
    assert [s.greedy for s in scores[-3:]] == [True, True, True]


def test_a_continuation_longer_than_the_context_is_refused(models):
    _, _, ours, _ = models
    with pytest.raises(ValueError, match="more than the model's context"):
        ev.score_continuations(ours, [([1], [2] * (N_CTX + 1))])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lambada_matches_hf(models, tmp_path):
    hf, _, ours, tok = models
    texts = ["the cat sat on the mat", "in the heather, there", "x y", "a  double space then word",
             "long context " * 8 + "ending"]  # the last one is truncated on the left to fit n_ctx
    data = write_jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in texts])
    result = ev.evaluate_model(ours, tok, task="lambada", data=data, batch_size=2)
    oracle = []
    for t in texts:  # lm-eval lambada_openai: doc_to_text / doc_to_target
        context, target = " ".join(t.split(" ")[:-1]), " " + t.split(" ")[-1]
        oracle.append(hf_loglikelihood(hf, *lm_eval_pair(tok, context, target)))
    assert [e["logprob"] for e in result["examples"]] == pytest.approx([o[0] for o in oracle], rel=1e-4)
    assert [e["greedy"] for e in result["examples"]] == [o[1] for o in oracle]
    assert result["metrics"]["acc"] == np.mean([o[1] for o in oracle])
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(-np.mean([o[0] for o in oracle])), rel=1e-4)


HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
     "ctx_b": "then", "endings": [", the man continues removing the snow.", ", the man stops.",
                                  ", the man [step] runs.", ", he sits in the car."], "label": 3},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to water plants [title] Fill a can.",
     "ctx_b": "", "endings": ["Pour water.", "Dance  twice.", "[substeps] Wait."], "label": "0"},
    {"activity_label": "Baking", "ctx_a": "A woman mixes the dough.", "ctx_b": "she",
     "endings": ["bakes it.", "throws it up in the air.", "eats it."], "label": 2},
]


def test_hellaswag_matches_hf_with_lm_eval_preprocessing(models, tmp_path):
    hf, _, ours, tok = models
    data = write_jsonl(tmp_path / "hellaswag.jsonl", HELLASWAG)
    result = ev.evaluate_model(ours, tok, task="hellaswag", data=data, batch_size=5)
    acc, acc_norm = [], []
    for doc, got in zip(HELLASWAG, result["examples"], strict=True):
        query = hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        choices = [hellaswag_preprocess(e) for e in doc["endings"]]
        lls = np.array([hf_loglikelihood(hf, *lm_eval_pair(tok, query, " " + c))[0] for c in choices])
        assert got["logprobs"] == pytest.approx(lls.tolist(), rel=1e-4)
        gold = int(doc["label"])
        acc.append(float(np.argmax(lls) == gold))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in choices])) == gold))
    assert result["metrics"]["acc"] == np.mean(acc)
    assert result["metrics"]["acc_norm"] == np.mean(acc_norm)
    assert "characters" in result["scoring"]


BIGBENCH = {
    "name": "tiny", "metrics": ["multiple_choice_grade"], "task_prefix": "Answer the riddle.",
    "example_input_prefix": "\nRiddle: ", "example_output_prefix": "\nAnswer: ",
    "examples": [
        {"input": "What has keys but no locks?", "target_scores": {"a piano": 1, "a door": 0, "a map": 0}},
        {"input": "What runs but never walks?", "target_scores": {"a river": 1, "a clock": 1, "a stone": 0}},
        {"input": "What runs but never walks?", "target_scores": {"a river": 1, "a clock": 1, "a stone": 0}},
        {"input": "Say something.", "target": "hello"},
        {"input": "the then?", "target_scores": {"in": 0, "the": 0.5, "there": 1, "her": 0}},
    ],
}


@pytest.mark.parametrize("prompt", ["task's own prefixes", "BIG-bench defaults", "'false' as a string"])
def test_bigbench_multiple_choice_matches_hf(models, tmp_path, prompt):
    hf, _, ours, tok = models
    task = dict(BIGBENCH)
    if prompt == "'false' as a string":  # as some BIG-bench tasks write it; BIG-bench tests it for truth
        task["append_choices_to_input"] = "false"
    if prompt == "BIG-bench defaults":
        for key in ("task_prefix", "example_input_prefix", "example_output_prefix"):
            task.pop(key)
        task["append_choices_to_input"] = False
    data = tmp_path / "task.json"
    data.write_text(json.dumps(task, indent=2))
    result = ev.evaluate_model(ours, tok, task="multiple-choice", data=data, batch_size=4)
    kept = [task["examples"][i] for i in (0, 1, 4)]  # the duplicate and the generative example are dropped
    grades = []
    for example, got in zip(kept, result["examples"], strict=True):
        context = bigbench_prompt(task, example)
        choices = list(example["target_scores"])
        lls = [hf_loglikelihood(hf, *lm_eval_pair(tok, context, c))[0] for c in choices]
        assert got["logprobs"] == pytest.approx(lls, rel=1e-4)
        grades.append(example["target_scores"][choices[int(np.argmax(lls))]])
    assert result["metrics"]["multiple_choice_grade"] == pytest.approx(np.mean(grades))
    assert result["metrics"]["chance"] == pytest.approx(np.mean([1 / 3, 2 / 3, 1.5 / 4]))
    assert result["prompt"]["example_output_prefix"] == task.get("example_output_prefix", "\nA: ")


def test_bigbench_names_resolve_in_the_fetched_package(models, tmp_path, monkeypatch):
    _, _, ours, tok = models
    # What fetch_package leaves in the cache once bigbench==1.0.0 is downloaded (the test never downloads it),
    # in a cache of its own: a stand-in in a real cache would pass for the package there.
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    tasks = cache_dir() / "packages" / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks"
    (tasks / "riddle_sense").mkdir(parents=True, exist_ok=True)
    (tasks / "riddle_sense" / "task.json").write_text(json.dumps(BIGBENCH))
    split = tasks / "cause_and_effect"  # a real task that BIG-bench splits into subtasks
    split.mkdir(exist_ok=True)
    (split / "task.json").write_text(json.dumps({"name": "cause_and_effect", "description": "two subtasks"}))
    for sub in ("one_sentence", "two_sentences"):
        (split / sub).mkdir(parents=True, exist_ok=True)
        (split / sub / "task.json").write_text(json.dumps(BIGBENCH))
    assert ev.bigbench_path("bigbench:riddle_sense") == tasks / "riddle_sense" / "task.json"
    result = ev.evaluate_model(ours, tok, task="multiple-choice", data="bigbench:riddle_sense", limit=2)
    assert result["n_examples"] == 2
    assert ev.bigbench_path("bigbench:cause_and_effect/two_sentences") == split / "two_sentences" / "task.json"
    with pytest.raises(TaskFormatError, match="did you mean riddle_sense"):
        ev.bigbench_path("bigbench:riddle")
    with pytest.raises(TaskFormatError, match=r"subtasks \(one_sentence, two_sentences\); name one, "
                                              r"e.g. bigbench:cause_and_effect/one_sentence"):
        ev.bigbench_path("bigbench:cause_and_effect")
    # Subtasks are only known once the package is there; a wrong one still gets suggestions.
    with pytest.raises(TaskFormatError, match=r"no subtask 'two_sentence' \(did you mean two_sentences"):
        ev.bigbench_path("bigbench:cause_and_effect/two_sentence")
    with pytest.raises(TaskFormatError, match="no subtask 'x' .*name bigbench:riddle_sense"):
        ev.bigbench_path("bigbench:riddle_sense/x")


@pytest.mark.parametrize(("spec", "message"), [
    ("bigbench:riddle", r"no JSON task 'riddle' \(did you mean riddle_sense\?\)"),
    ("bigbench:arithmetc", r"no JSON task 'arithmetc' \(did you mean .*arithmetic"),
    ("bigbench:qqqqqqqq", r"no JSON task 'qqqqqqqq' \(the 167 JSON tasks are abstract_narrative_understanding"),
    ("bigbench:boolean_expressions", "programmatic tasks are not supported"),  # a task.py task
    ("bigbench:Riddle_Sense/x", "did you mean riddle_sense"),
    ("bigbench:", "names no BIG-bench task: give bigbench:TASK"),
    ("bigbench:riddle_sense/../../etc", "names no BIG-bench task"),
])
def test_a_wrong_bigbench_name_is_refused_before_any_download(models, tmp_path, monkeypatch, capsys, spec, message):
    _, folder, _, _ = models
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "empty-cache"))  # the package is not there

    def no_download(*args, **kwargs):
        pytest.fail("the bigbench package was fetched for a name that the task list rules out")

    monkeypatch.setattr(ev, "bigbench_task_files", no_download)
    monkeypatch.setattr("gpt2lab.fetch.fetch_package", no_download)
    monkeypatch.setattr("gpt2lab.fetch._download", no_download)
    with pytest.raises(TaskFormatError, match=message) as e:
        ev.bigbench_path(spec)
    assert "\n" not in str(e.value)
    # The command refuses it before it loads the model: a model path that does not exist is never read.
    for model in (folder, tmp_path / "no-such-model"):
        assert main(["eval", str(model), "--task", "multiple-choice", "--data", spec]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gpt2lab: error:") and err.count("\n") == 1 and re.search(message, err)
    assert not (tmp_path / "empty-cache").exists()


def test_the_bigbench_task_list_is_sorted_and_has_the_tasks_gpt2lab_documents():
    assert list(ev.BIGBENCH_TASKS) == sorted(set(ev.BIGBENCH_TASKS)) and len(ev.BIGBENCH_TASKS) == 167
    assert {"riddle_sense", "hhh_alignment", "cause_and_effect", "logical_deduction"} <= set(ev.BIGBENCH_TASKS)


def test_importing_evaluate_leaves_the_corpus_catalog_alone():
    from gpt2lab import data

    assert "bigbench" not in data.CATALOG  # evaluate is imported here: BIG-bench is its own, not prepare's
    # Before and after the import, in a fresh interpreter (this one imported evaluate long ago).
    code = ("import json; from gpt2lab import data; before = dict(data.CATALOG); import gpt2lab.evaluate; "
            "print(json.dumps([sorted(before), data.CATALOG == before]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [["kjv", "shakespeare"], True]


# -- ranking: a model taught the answers beats chance, a random one does not -----------------------------------


def ranking_task(n=48, seed=0):
    rng = random.Random(seed)
    words = ["one", "two", "six", "ten"]  # equal lengths: length alone cannot pick the answer
    examples = []
    for i in range(n):
        digit = i % 4
        tag = "".join(rng.choice("abcdefgh") for _ in range(3))
        examples.append({"input": f"{tag} {digit}",
                         "target_scores": {w: int(j == digit) for j, w in enumerate(words)}})
    return {"name": "digits", "append_choices_to_input": False, "example_input_prefix": "Q: ",
            "example_output_prefix": " A: ", "examples": examples}


class AnswerBatches:
    """Every step the same batch: each question with its right answer, the loss on the answer's tokens only."""

    def __init__(self, tok, examples):
        rows = []
        for ex in examples:
            ctx, cont = ev.encode_pair(tok, ex.context, ex.choices[ex.scores.index(1.0)])
            rows.append((ctx + cont, len(ctx)))
        T = max(len(ids) for ids, _ in rows) - 1
        self.x, self.y = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
        self.mask = torch.zeros(len(rows), T)
        for r, (ids, n_ctx) in enumerate(rows):
            self.x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            self.y[r, :len(ids) - 1] = torch.tensor(ids[1:])
            self.mask[r, n_ctx - 1:len(ids) - 1] = 1

    def get(self, step, index=0):
        return self.x, self.y, self.mask


@pytest.mark.slow
def test_a_model_taught_the_answers_ranks_them_first_and_a_random_one_is_near_chance(tmp_path, capsys):
    from gpt2lab.config import preset
    from gpt2lab.train import TrainConfig, fit

    tok = tiny_tokenizer()
    data = tmp_path / "task.json"
    data.write_text(json.dumps(ranking_task()))
    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", n_layer=2, n_head=2, n_embd=32, n_ctx=32, vocab_size=tok.vocab_size))
    random_grade = ev.evaluate_model(model.eval(), tok, task="multiple-choice", data=data)["metrics"]

    # A few dozen optimizer steps of the real training loop, then the CLI scores the run folder it wrote.
    examples, _ = ev.read_bigbench(data)
    cfg = TrainConfig(model="gpt2-nano", batch_size=len(examples), max_steps=60, lr=1e-2, min_lr=1e-3,
                      warmup_steps=5, weight_decay=0.0, device="cpu", peak_tflops=1.0, ckpt_interval=60)
    fit(model, cfg, AnswerBatches(tok, examples), run_dir=tmp_path / "run", tokenizer=tok)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--task", "multiple-choice", "--data", str(data),
                 "--out", str(tmp_path / "taught.json")]) == 0
    taught_grade = json.loads((tmp_path / "taught.json").read_text())["metrics"]
    assert "multiple_choice_grade" in capsys.readouterr().out

    assert random_grade["chance"] == taught_grade["chance"] == 0.25
    assert abs(random_grade["multiple_choice_grade"] - 0.25) < 0.15
    assert taught_grade["multiple_choice_grade"] >= 0.9


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, content, message", [
    ("lambada", '{"text": "a b"}\n{"text": "broken\n', r"lambada\.jsonl:2: not valid JSON"),
    ("lambada", '{"text": "a b"}\n\n{"txt": "a b"}\n', r"lambada\.jsonl:3: expected a string field 'text'"),
    ("lambada", '{"text": "oneword"}\n', r"lambada\.jsonl:1: the text needs context"),
    ("hellaswag", json.dumps({**HELLASWAG[0], "label": 7}), r"hellaswag\.jsonl:1: label 7 is not an index"),
    ("hellaswag", json.dumps({**HELLASWAG[0], "label": ""}), r"hellaswag\.jsonl:1: no label .*validation split"),
    ("hellaswag", json.dumps({k: v for k, v in HELLASWAG[0].items() if k != "ctx_b"}), r":1: .*'ctx_b'"),
    ("multiple-choice", '{"examples": [\n  {"input": "q", "target_scores": {"a": 1, "b": 0}},\n'
                        '  {"inp": "q"}\n]}', r"task\.json:3 \(examples\[1\]\): an example needs a string 'input'"),
    ("multiple-choice", '{"examples": [\n  {"input": "q", "target_scores": {"a": "yes", "b": 0}}]}',
     r"task\.json:2 \(examples\[0\]\): 'target_scores' must map"),
    ("multiple-choice", '{"examples": [{"input": "q", "target": "a"}]}', r"generative task"),
    ("multiple-choice", '{"examples": [\n  {"input": "q",}\n]}', r"task\.json:2: not valid JSON"),
    ("perplexity", b"fine\nfine\n\xff\n", r"text\.txt:3: not UTF-8"),
], ids=["json", "field", "one-word", "label-range", "unlabeled", "missing-ctx", "bb-input", "bb-scores",
        "bb-generative", "bb-json", "utf8"])
def test_malformed_files_get_one_line_errors_naming_the_line(models, tmp_path, capsys, task, content, message):
    _, folder, ours, tok = models
    name = {"lambada": "lambada.jsonl", "hellaswag": "hellaswag.jsonl", "multiple-choice": "task.json",
            "perplexity": "text.txt"}[task]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TaskFormatError, match=message):
        ev.evaluate_model(ours, tok, task=task, data=path)
    assert main(["eval", str(folder), "--task", task, "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2lab: error:") and "\n" not in err and re.search(message, err)


# -- the command -------------------------------------------------------------------------------------------------


def test_eval_command_writes_results_and_prints_one_line(models, tmp_path, capsys):
    hf, folder, _, tok = models
    text = tmp_path / "held_out.txt"
    text.write_text("the heather in the rain, then the thin tern.\n" * 3)
    out = tmp_path / "results" / "ppl.json"
    assert main(["eval", str(folder), "--task", "perplexity", "--data", str(text), "--stride", "9",
                 "--out", str(out), "--per-example"]) == 0
    line = capsys.readouterr().out.strip()
    results = json.loads(out.read_text())
    nll, count = hf_sliding_window_nll(hf, tok.encode(text.read_text()), 9)
    assert results["metrics"]["nats_per_token"] == pytest.approx(nll / count, rel=1e-4)
    assert results["model"] == str(folder) and results["stride"] == 9 and len(results["examples"]) > 1
    assert "\n" not in line and "perplexity" in line and f"{results['metrics']['bits_per_byte']:.4f}" in line

    assert main(["eval", str(folder), "--task", "perplexity", "--data", str(text), "--out", str(out)]) == 0
    assert "examples" not in json.loads(out.read_text())  # its own results file is replaced
    assert sorted(p.name for p in out.parent.iterdir()) == ["ppl.json"]  # and nothing is left beside it


def one_line_error(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("gpt2lab: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    return captured.out


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "existing", r"--out .*existing is a folder; give the path of the results file, e\.g\. "),
    (lambda d: d / "notes.txt" / "res.json", r"notes\.txt is a file, not a folder"),
    (lambda d: d / "notes.txt" / "sub" / "res.json", r"notes\.txt is a file, not a folder"),
    (lambda d: d / "notes.txt", r"notes\.txt is a file that gpt2lab eval did not write; .*choose another path"),
    (lambda d: d / "other.json", r"other\.json is a file that gpt2lab eval did not write"),
], ids=["folder", "parent-file", "grandparent-file", "user-file", "other-json"])
def test_eval_out_is_checked_before_any_work_and_nothing_is_left(models, tmp_path, capsys, make, message):
    _, folder, _, _ = models
    work = tmp_path / "work"
    (work / "existing").mkdir(parents=True)
    (work / "existing" / "keep.txt").write_text("mine")
    (work / "notes.txt").write_text("my notes")
    (work / "other.json").write_text('{"not": "results"}')
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    text = tmp_path / "held_out.txt"
    text.write_text("the heather in the rain, then the thin tern.\n" * 3)
    out = make(work)
    # With a model that does not exist the --out error still comes first: nothing was loaded or scored.
    for model in (folder, tmp_path / "no-such-model"):
        one_line_error(capsys, ["eval", str(model), "--task", "perplexity", "--data", str(text), "--out", str(out)],
                       message)
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before  # nothing changed, nothing left


def test_a_failed_results_write_leaves_no_temporary_file(models, tmp_path, capsys, monkeypatch):
    _, folder, _, _ = models
    text = tmp_path / "held_out.txt"
    text.write_text("the heather in the rain, then the thin tern.\n" * 3)
    out = tmp_path / "results" / "corpus"
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if Path(dst) == out:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    one_line_error(capsys, ["eval", str(folder), "--task", "perplexity", "--data", str(text), "--out", str(out)],
                   "Input/output error")
    assert list(out.parent.iterdir()) == []
    # A temporary file that a killed eval left beside the results is cleaned up by the next one.
    leftover = out.parent / f".corpus.tmp-{2**22 + 12345}"  # no process has that PID
    leftover.write_text("{")
    monkeypatch.setattr(os, "replace", real_replace)
    assert main(["eval", str(folder), "--task", "perplexity", "--data", str(text), "--out", str(out)]) == 0
    assert [p.name for p in out.parent.iterdir()] == ["corpus"] and "metrics" in json.loads(out.read_text())


@pytest.mark.parametrize(("options", "message"), [
    (["--limit", "0"], "--limit must be a positive number of examples, got 0"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--stride", "-3"], "--stride must be a positive number of tokens, got -3"),
    (["--device", "banana"], "unknown device 'banana'"),
    (["--device", "cuda:99"], "cuda:99"),
])
def test_bad_eval_options_are_one_line_errors_before_the_model_loads(models, tmp_path, capsys, options, message):
    _, folder, _, _ = models
    text = tmp_path / "held_out.txt"
    text.write_text("the heather in the rain, then the thin tern.\n" * 3)
    for model in (folder, tmp_path / "no-such-model"):
        one_line_error(capsys, ["eval", str(model), "--task", "perplexity", "--data", str(text), *options],
                       re.escape(message))
    with pytest.raises(ConfigError, match="stride must be in 1..n_ctx"):  # the longest stride needs the model
        ev.evaluate_model(models[2], models[3], task="perplexity", data=text, stride=N_CTX + 1)


def test_a_lambada_word_longer_than_the_context_names_the_example(models, tmp_path, capsys):
    _, folder, _, _ = models
    path = write_jsonl(tmp_path / "lambada.jsonl", [{"text": "fine words here"}, {"text": "then " + "x" * 50}])
    one_line_error(capsys, ["eval", str(folder), "--task", "lambada", "--data", str(path)],
                   r"example 1's last word 'x{50}' has 51 tokens, more than the model's context \(37\)")


def test_a_perplexity_past_the_float_range_is_inf_not_a_crash(models, monkeypatch):
    _, _, ours, tok = models
    monkeypatch.setattr(ev, "score_windows", lambda model, ids, windows, **kw: [1e6] * len(windows))
    metrics = ev.perplexity(ours, tok, "the heather in the rain")["metrics"]
    assert metrics["perplexity"] == math.inf and metrics["nats_per_token"] > 1e4


def test_eval_scores_a_lora_adapter_as_transformers_scores_its_merged_weights(models, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    from gpt2lab.checkpoint import base_reference, export_hf
    from gpt2lab.lora import LoRAConfig, apply_lora, merge_lora, save_adapter

    hf, folder, _, tok = models
    model, config = load_model(folder), LoRAConfig(rank=2, targets=("c_attn", "c_fc"))
    apply_lora(model, config)
    with torch.no_grad():  # what training would do: a non-zero update
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.05 * torch.randn(p.shape))
    (tmp_path / "adapter").mkdir()
    save_adapter(model, tmp_path / "adapter", config=config, base=base_reference(folder))
    export_hf(merge_lora(model), tmp_path / "merged")
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()

    text = tmp_path / "held_out.txt"
    text.write_text("the heather in the rain, then the thin tern.\n" * 3)
    out = tmp_path / "lora.json"
    assert main(["eval", str(tmp_path / "adapter"), "--task", "perplexity", "--data", str(text), "--stride", "9",
                 "--out", str(out)]) == 0
    got = json.loads(out.read_text())["metrics"]["nats_per_token"]
    ids = tok.encode(text.read_text())
    nll, count = hf_sliding_window_nll(merged, ids, 9)
    base_nll, _ = hf_sliding_window_nll(hf, ids, 9)
    assert got == pytest.approx(nll / count, rel=1e-4)
    assert abs(got - base_nll / count) > 1e-3  # the adapter was applied
