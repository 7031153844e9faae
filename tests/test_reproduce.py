"""benchmarks/reproduce/reproduce.py on a random tiny GPT-2 and tiny dataset repos, all served by a local Hub.

The dataset repos hold the same paths and file formats as the real ones (parquet written with pyarrow,
OpenAI's LAMBADA jsonl), so the script runs exactly as it would against huggingface.co. Each figure
it reports is checked against gpt2lab's evaluator called directly on files the test writes itself in
the evaluator's formats: a conversion that drops, swaps or mangles a field changes a figure.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from localhub import LocalHub, folder_files, one_commit, point_at

from gpt2lab.checkpoint import export_hf, load_model, load_tokenizer
from gpt2lab.config import GPTConfig
from gpt2lab.evaluate import evaluate_model
from gpt2lab.model import GPT
from gpt2lab.tokenizer import Tokenizer
from gpt2lab.zeroshot import evaluate_zeroshot

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce" / "reproduce.py"
LIMIT = 3
N_CTX = 64

WIKI_ROWS = ["", " = Valkyria Chronicles III = \n", "",
             " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n",
             " The game began development in 2010 , carrying over a large portion of the work . \n", ""]
LAMBADA = ["she looked at the door and waited for him to open the door",
           "the cat sat on the mat and then the cat slept",
           "he drank his coffee black , as he always drank his coffee",
           "they walked to the river and sat down by the river"]
HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
     "ctx_b": "then", "ctx": "Then, the man writes over the snow. then",
     "endings": [", the man adds wax to the windshield.", ", a person board a ski lift.",
                 ", the man puts on a christmas coat.", ", the man continues removing the snow on his car."],
     "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "val", "split_type": "zeroshot", "label": "3"},
    {"ind": 9, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow a garden [title] Dig.",
     "ctx_b": "", "ctx": "[header] How to grow a garden [title] Dig.",
     "endings": ["Plant the seeds [step] deep.", "Water them.", "Eat a sandwich.", "Sing loudly."],
     "source_id": "wikihow~1", "split": "val", "split_type": "indomain", "label": "1"},
]
ARTICLES = [("The council met on Tuesday. It approved the budget. Residents were pleased. The mayor spoke.",
             "Council approves budget.\nResidents pleased."),
            ("A storm hit the coast overnight. Trees fell. Power was cut to thousands of homes.",
             "Storm cuts power to thousands.")]
PAIRS = [("The house is red.", "La maison est rouge."), ("I like cheese.", "J'aime le fromage."),
         ("Where is the station?", "Où est la gare ?"), ("The sky is blue.", "Le ciel est bleu."),
         ("We are tired.", "Nous sommes fatigués.")]


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def parquet(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """owner/tiny and (the same weights) openai-community/gpt2, and every dataset repo but CoQA's."""
    root = tmp_path_factory.mktemp("reproduce")
    gpt2 = Tokenizer.gpt2()
    torch.manual_seed(5)
    export_hf(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=N_CTX, vocab_size=gpt2.vocab_size)),
              root / "tiny", tokenizer=gpt2)
    models = {"owner/tiny": one_commit(folder_files(root / "tiny"), "tiny"),
              "openai-community/gpt2": one_commit(folder_files(root / "tiny"), "gpt2")}
    wiki = parquet([{"text": t} for t in WIKI_ROWS])
    datasets = {
        "Salesforce/wikitext": one_commit({
            "wikitext-2-raw-v1/test-00000-of-00001.parquet": wiki,
            "wikitext-103-raw-v1/test-00000-of-00001.parquet": parquet([{"text": t} for t in WIKI_ROWS[:4]]),
            "wikitext-2-raw-v1/train-00000-of-00001.parquet": b"never fetched",
        }, "wikitext"),
        "EleutherAI/lambada_openai": one_commit({
            "data/lambada_test.jsonl": jsonl([{"text": t} for t in LAMBADA]).encode(),
            "data/lambada_test_de.jsonl": b"never fetched"}, "lambada"),
        "Rowan/hellaswag": one_commit({"data/validation-00000-of-00001.parquet": parquet(HELLASWAG)}, "hellaswag"),
        "abisee/cnn_dailymail": one_commit({"3.0.0/test-00000-of-00001.parquet": parquet(
            [{"article": a, "highlights": h, "id": str(i)} for i, (a, h) in enumerate(ARTICLES)])}, "cnn"),
        "wmt/wmt14": one_commit({"fr-en/test-00000-of-00001.parquet": parquet(
            [{"translation": {"fr": fr, "en": en}} for en, fr in PAIRS])}, "wmt"),
    }
    # What the evaluator reads, written here by hand in its documented formats.
    expected = root / "expected"
    expected.mkdir()
    (expected / "wikitext-2.txt").write_text("\n\n".join(WIKI_ROWS), encoding="utf-8")
    (expected / "wikitext-103.txt").write_text("\n\n".join(WIKI_ROWS[:4]), encoding="utf-8")
    (expected / "lambada.jsonl").write_text(jsonl([{"text": t} for t in LAMBADA]), encoding="utf-8")
    (expected / "hellaswag.jsonl").write_text(jsonl(HELLASWAG), encoding="utf-8")
    (expected / "summarization.jsonl").write_text(jsonl([{"article": a, "highlights": h} for a, h in ARTICLES]),
                                                  encoding="utf-8")
    (expected / "translation-en-fr.jsonl").write_text(jsonl([{"en": en, "fr": fr} for en, fr in PAIRS]),
                                                      encoding="utf-8")
    (expected / "translation-fr-en.jsonl").write_text(jsonl([{"en": fr, "fr": en} for en, fr in PAIRS]),
                                                      encoding="utf-8")
    return {"models": models, "datasets": datasets, "tiny": root / "tiny", "expected": expected}


@pytest.fixture
def local_hub(served, tmp_path, monkeypatch):
    server = LocalHub(served["models"], served["datasets"])
    point_at(monkeypatch, server.url, tmp_path / "hf" / "hub")
    yield server
    server.stop()


def direct(task: str, path: Path, model, tokenizer) -> dict[str, float]:
    """Our evaluator on the hand-written file, in the units the script reports."""
    if task.startswith("wikitext"):
        text, figures = path.read_text(encoding="utf-8"), {}
        for stride in (N_CTX // 2, N_CTX):
            r = evaluate_model(model, tokenizer, task="perplexity", data=path, stride=stride, limit=LIMIT)
            assert r["examples"][-1]["end"] == r["tokens"]  # the windows cover the text: words = all of its words
            figures[f"token ppl (stride {stride})"] = r["metrics"]["perplexity"]
            figures[f"word ppl (stride {stride})"] = math.exp(r["metrics"]["nats_per_token"] * r["tokens_scored"]
                                                              / len(text.split()))
        return figures
    if task == "lambada":
        m = evaluate_model(model, tokenizer, task="lambada", data=path, limit=LIMIT)["metrics"]
        return {"acc": 100 * m["acc"], "ppl": m["perplexity"]}
    if task == "hellaswag":
        m = evaluate_model(model, tokenizer, task="hellaswag", data=path, limit=LIMIT)["metrics"]
        return {"acc": 100 * m["acc"], "acc_norm": 100 * m["acc_norm"]}
    kind = "summarization" if task == "summarization" else "translation"
    m = evaluate_zeroshot(model, tokenizer, task=kind, data=path, limit=LIMIT)["metrics"]
    if kind == "summarization":
        return {"ROUGE-1": 100 * m["rouge1"], "ROUGE-2": 100 * m["rouge2"], "ROUGE-L": 100 * m["rougeL"]}
    return {"BLEU": m["bleu"]}


def test_the_figures_are_our_evaluators_on_the_hubs_data(local_hub, served, tmp_path, capsys):
    reproduce = load_script()
    out = tmp_path / "results.json"
    argv = ["--models", "owner/tiny", "gpt2", "--limit", str(LIMIT), "--device", "cpu", "--out", str(out)]
    assert reproduce.main(argv) == 0
    printed = capsys.readouterr()

    # CoQA's repo is not served: one line says so, and every other task ran.
    skipped = [line for line in printed.err.splitlines() if line.startswith("reproduce: skipping")]
    assert skipped == [f"reproduce: skipping coqa: the Hub ({local_hub.url}) has no dataset repo stanfordnlp/coqa "
                       "(if it is gated or private: log in, or set HF_TOKEN)"], printed.err
    results = json.loads(out.read_text())
    assert results["skipped"] == [skipped[0].removeprefix("reproduce: ")]
    ran = {r["task"] for r in results["rows"]}
    assert ran == set(reproduce.TASKS) - {"coqa"}

    tokenizer = load_tokenizer(served["tiny"])
    model = load_model(served["tiny"], tokenizer=tokenizer)
    for task in sorted(ran):
        figures = direct(task, served["expected"] / f"{task}.{'txt' if task.startswith('wiki') else 'jsonl'}",
                         model, tokenizer)
        for name in ("owner/tiny", "gpt2"):
            ours = {r["metric"]: r["ours"] for r in results["rows"] if r["task"] == task and r["model"] == name}
            assert ours == pytest.approx(figures, rel=1e-9, abs=1e-12), (task, name)

    # Only the files the tasks read were fetched from the dataset repos.
    assert not any(p.endswith(("train-00000-of-00001.parquet", "lambada_test_de.jsonl")) for _, p in local_hub.requests)

    # The published figures sit beside OpenAI's names only, each with its source.
    rows = {(r["task"], r["metric"], r["model"]): r for r in results["rows"]}
    assert all(not r["published"] for (_, _, model_name), r in rows.items() if model_name == "owner/tiny")
    lambada = rows[("lambada", "acc", "gpt2")]["published"]
    assert {(p["value"], p["url"]) for p in lambada} == {(45.99, reproduce.PAPER),
                                                         (32.56, reproduce.LM_EVAL_GPT2_LAMBADA)}
    assert "45.99 (paper, Table 3) [1]" in printed.out and f"[1] {reproduce.PAPER}" in printed.out


def test_a_converted_file_is_what_the_evaluator_reads(local_hub, served, tmp_path):
    reproduce = load_script()
    for name, task in reproduce.TASKS.items():
        if name == "coqa":
            with pytest.raises(reproduce.Unavailable, match="stanfordnlp/coqa"):
                reproduce.prepare(name, task, tmp_path)
            continue
        made = reproduce.prepare(name, task, tmp_path)
        assert made.read_text(encoding="utf-8") == (served["expected"] / made.name).read_text(encoding="utf-8"), name


def test_coqa_columns_become_turns(tmp_path):
    reproduce = load_script()
    row = {"source": "mctest", "story": "Anna had a dog. It was brown.", "questions": ["Who had a dog?", "What color?"],
           "answers": {"input_text": ["Anna", "brown"], "answer_start": [0, 21], "answer_end": [4, 26]}}
    (tmp_path / "v.parquet").write_bytes(parquet([row]))
    reproduce.coqa_file([tmp_path / "v.parquet"], tmp_path / "coqa.jsonl")
    assert json.loads((tmp_path / "coqa.jsonl").read_text()) == {
        "story": row["story"], "questions": row["questions"], "answers": ["Anna", "brown"]}


def test_published_figures_have_sources(capsys):
    reproduce = load_script()
    assert reproduce.main(["--published"]) == 0
    out = capsys.readouterr().out
    for p in reproduce.PUBLISHED:
        assert p.url in out
        assert all(size in reproduce.MODELS for size in p.figures)
        assert all((p.task, p.metric) != (q.task, q.metric) or p.who != q.who or p is q for q in reproduce.PUBLISHED)
    assert "18.34 (paper, Table 3)" in out and "16.44 (HF perplexity doc)" in out
    assert reproduce.model_size("openai-community/gpt2-xl@main") == "gpt2-xl"
    assert reproduce.model_size("owner/tiny") is None
