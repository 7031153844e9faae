"""Fine-tuning: prompt/completion data (errors naming lines, masks, padding), full and LoRA runs
through fit(), merged == base + adapter, bit-identical resume, early stopping, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model

from gpt2lab import GPTConfig, load_model, save_checkpoint
from gpt2lab.checkpoint import latest_checkpoint, load_tokenizer, prompt_template
from gpt2lab.cli import main
from gpt2lab.errors import ConfigError, DataError, TrainingError
from gpt2lab.finetune import (
    Example,
    ExampleBatches,
    FinetuneConfig,
    detect_format,
    finetune,
    merge,
    pad_batch,
    read_examples,
    tokenize_examples,
)
from gpt2lab.lora import ADAPTER_CONFIG, LoRAConfig, LoRALinear
from gpt2lab.loss import reference_loss
from gpt2lab.model import GPT
from gpt2lab.template import PromptTemplate
from gpt2lab.tokenizer import EOT, Tokenizer, Vocabulary
from gpt2lab.train import lm_loss

MERGES = ((b" ", b"t"), (b"h", b"e"), (b" t", b"he"), (b"i", b"n"), (b"e", b"r"))
TEMPLATE = "Q: {prompt}\nA:"
PROMPT = PromptTemplate(TEMPLATE)


def tokenizer() -> Tokenizer:
    tokens = [bytes([b]) for b in range(256)] + [a + b for a, b in MERGES] + [EOT]
    return Tokenizer(Vocabulary(tokens=tuple(tokens), merges=MERGES))


TOK = tokenizer()


def tiny_cfg(**kw) -> GPTConfig:
    return GPTConfig(**(dict(n_layer=2, n_head=2, n_embd=32, n_ctx=48, vocab_size=TOK.vocab_size) | kw))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base") / "ckpt"
    save_checkpoint(GPT(tiny_cfg()), folder, tokenizer=TOK)
    return folder


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def arithmetic_rows(n: int = 40) -> list[dict]:
    return [{"prompt": f"{a} plus {b}", "completion": f" {a + b}"} for a, b in ((i % 7, i // 7) for i in range(n))]


@pytest.fixture
def pairs(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", arithmetic_rows())


def config(**kw) -> FinetuneConfig:
    base = dict(batch_size=4, micro_batch=2, max_steps=6, warmup_steps=2, eval_interval=3, eval_batches=2,
                log_interval=1, ckpt_interval=3, keep_last=5, device="cpu", peak_tflops=1.0, patience=0)
    return FinetuneConfig.for_method(**(base | kw))


def run(base, data, out, **kw):
    cfg = kw.pop("config", None) or config()
    kw.setdefault("template", TEMPLATE)
    return finetune(str(base), data=str(data), out=str(out), config=cfg, **kw)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- prompt/completion data -------------------------------------------------------------------


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": '], r"line 2 is not valid JSON"),
    (['{"prompt": "a", "completion": "b"}', "", '["a", "b"]'], r"line 3 is a JSON list"),
    (['{"prompt": "a"}'], r"line 1 has no 'completion' field"),
    (['{"completion": "b", "text": "c"}'], r"line 1 has no 'prompt' field \(its fields: completion, text\)"),
    (['{"prompt": 3, "completion": "b"}'], r"line 1: 'prompt' is a JSON int, not a string"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "\\ud800", "completion": "b"}'],
     r"line 2: 'prompt' holds a lone"),
    ([], r"holds no examples"),
    (["", "   "], r"holds no examples"),
])
def test_bad_jsonl_names_the_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message):
        list(read_examples(path))


def test_undecodable_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match="line 2: the bytes at offset 47 are not UTF-8"):
        list(read_examples(path))


def test_format_detection(tmp_path, pairs):
    assert detect_format(str(pairs)) == "prompt-completion"
    assert detect_format(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}]))) == "text"
    assert detect_format(str(tmp_path)) == "text"


def test_examples_are_prompt_completion_eot_with_too_long_ones_skipped_or_truncated():
    rows = [("x.jsonl line 1", "hi", " there"), ("x.jsonl line 2", "x" * 30, " " + "y" * 30),
            ("x.jsonl line 5", "z" * 40, "w")]
    kw = dict(template=PROMPT, max_tokens=40)
    got = tokenize_examples(iter(rows), TOK, **kw)
    assert got.skipped == ["x.jsonl line 2", "x.jsonl line 5"] and got.truncated == []
    (ex,) = got.examples
    assert ex.ids == TOK.encode("Q: hi\nA:") + TOK.encode(" there") + [TOK.eot_id]
    assert ex.n_prompt == len(TOK.encode("Q: hi\nA:"))
    got = tokenize_examples(iter(rows), TOK, too_long="truncate", **kw)
    # Line 5's prompt alone fills the context: no completion token would be left, so it is skipped.
    assert got.truncated == ["x.jsonl line 2"] and got.skipped == ["x.jsonl line 5"]
    assert [len(e.ids) for e in got.examples] == [len(ex.ids), 40]
    n = len(TOK.encode("Q: " + "x" * 30 + "\nA:")) + len(TOK.encode(" " + "y" * 30)) + 1
    with pytest.raises(DataError, match=rf"x.jsonl line 2: the example has {n} tokens, more than the 40"):
        tokenize_examples(iter(rows), TOK, too_long="error", **kw)


def test_template_braces_in_prompts_are_text():
    (ex,) = tokenize_examples(iter([("", "{x} {prompt}", "!")]), TOK, template=PROMPT, max_tokens=99).examples
    assert TOK.decode(ex.ids[:ex.n_prompt]) == "Q: {x} {prompt}\nA:"


@pytest.mark.parametrize("text", ["no placeholder", "{prompt} and {prompt}", "{Prompt}"])
def test_a_prompt_template_needs_its_placeholder_exactly_once(text):
    with pytest.raises(DataError, match="exactly once"):
        PromptTemplate(text)


def test_prompt_template_formats_by_plain_substitution():
    assert PROMPT.format("What is {x}?") == "Q: What is {x}?\nA:"
    assert PromptTemplate().format("hi").endswith("hi\n\n### Response:\n")


def test_finetune_config_defaults_per_method():
    full, lora = FinetuneConfig.for_method("full"), FinetuneConfig.for_method("lora", max_steps=50)
    assert (full.lr, lora.lr, lora.max_steps) == (1e-4, 1e-3, 50)
    assert full.keep_best and full.patience == 4 and full.batch_size == 8 and full.weight_decay == 0.0
    assert FinetuneConfig.for_method("lora", lr=3e-3).lr == 3e-3
    assert FinetuneConfig(method="lora").lr is None and FinetuneConfig(method="lora").peak_lr == 1e-3
    for bad in (dict(lr=0.0), dict(min_lr=2e-4), dict(method="prefix"), dict(lora={"rank": 4})):
        with pytest.raises(ConfigError):
            FinetuneConfig.for_method(**bad)
    with pytest.raises(ConfigError, match="rank"):
        FinetuneConfig.for_method("lora", lora=LoRAConfig(rank=0))


def test_padded_batch_masks_everything_but_completion_and_eot():
    examples = [Example([1, 2, 3, 4, 5, 6], 3), Example([7, 8, 9], 1)]
    x, y, mask = pad_batch(examples, pad_id=0)
    assert x.tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]
    assert y.tolist() == [[2, 3, 4, 5, 6], [8, 9, 0, 0, 0]]
    # Targets that count: 4, 5, 6 (completion + eot) of the first; 8, 9 of the second.
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_prompt_tokens_contribute_nothing_to_the_loss():
    torch.manual_seed(0)
    model = GPT(tiny_cfg()).eval()
    rows = [("", "3 plus 4", " 7"), ("", "a longer prompt than the other", " yes"), ("", "", " empty prompt")]
    examples = tokenize_examples(iter(rows), TOK, template=PROMPT, max_tokens=49).examples
    batch = pad_batch(examples, TOK.eot_id)
    logits = model(batch[0]).detach().requires_grad_(True)
    loss = reference_loss(logits, batch[1], batch[2])
    loss.backward()
    counted = batch[2].bool()
    assert logits.grad[~counted].abs().max() == 0  # no gradient through prompt or padding positions
    assert logits.grad[counted].abs().sum(-1).min() > 0
    # Changing what the model predicts at prompt positions leaves the loss exactly as it was.
    moved = logits.detach().clone()
    moved[~counted] += torch.randn_like(moved[~counted]) * 10
    assert reference_loss(moved, batch[1], batch[2]) == loss
    # The model's own loss (its fused head, which skips masked targets) agrees.
    assert torch.allclose(lm_loss(model, batch), loss, atol=1e-6)
    # And the batch loss is each example's completion loss computed alone, without padding.
    per_example = []
    for e in examples:
        ids = torch.tensor([e.ids])
        ce = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="none")
        per_example.append(ce[max(e.n_prompt - 1, 0):])
    torch.testing.assert_close(loss, torch.cat(per_example).mean())


def test_example_batches_are_a_function_of_seed_step_and_index():
    examples = [Example([i, i + 1, 256], 1) for i in range(10)]
    a = ExampleBatches(examples, batch_size=2, per_step=2, pad_id=0, seed=3)
    b = ExampleBatches(examples, batch_size=2, per_step=2, pad_id=0, seed=3)
    assert all(torch.equal(a.get(5, 1)[0], b.get(5, 1)[0]) for _ in range(2))
    # One epoch (10 examples = 2.5 steps of 2 x 2) reads every example once.
    firsts = [int(x[0]) for s in range(3) for i in range(2) for x in a.get(s, i)[0]][:10]
    assert sorted(firsts) == list(range(10))
    assert len(list(a.eval_batches(100))) == 5 and len(list(a.eval_batches(2))) == 2


# -- runs -------------------------------------------------------------------------------------


def test_lora_run_trains_only_the_adapter_and_merges_to_the_same_logits(base, pairs, tmp_path):
    out = tmp_path / "run"
    report = run(base, pairs, out, config=config(method="lora", lora=LoRAConfig(rank=2, targets=("c_attn", "c_fc"))))
    assert "lora fine-tuning" in report and "38 training and 2 validation examples" in report
    ckpt = latest_checkpoint(out)
    assert (ckpt / ADAPTER_CONFIG).is_file() and not (ckpt / "model.safetensors").exists()
    record = json.loads((ckpt / "finetune.json").read_text())
    assert record["method"] == "lora" and record["prompt_template"] == TEMPLATE
    assert prompt_template(out) == TEMPLATE and load_tokenizer(out) == TOK

    # Only LoRA changed: the base is untouched, every B moved from zero.
    from gpt2lab.lora import load_adapter

    original = load_model(base)
    adapted = load_model(base)
    load_adapter(adapted, ckpt)
    for name, p in adapted.state_dict().items():
        if name.endswith(("lora_A", "lora_B")):
            assert name.endswith("lora_A") or p.abs().max() > 0, name
        else:
            assert torch.equal(p, original.state_dict()[name]), name

    # A merged checkpoint gives the logits of base + adapter.
    merge(str(ckpt), out=str(tmp_path / "merged"))
    merged = load_model(tmp_path / "merged")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert prompt_template(tmp_path / "merged") == TEMPLATE
    x = torch.randint(0, TOK.vocab_size, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted.eval()(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(x), original(x))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_is_bit_identical(base, pairs, tmp_path, method):
    kw = dict(method=method, dropout=0.1, lora=LoRAConfig(dropout=0.1), max_steps=6)
    run(base, pairs, tmp_path / "straight", config=config(**kw))
    run(base, pairs, tmp_path / "stopped", config=config(**(kw | dict(max_steps=3))))
    run(base, pairs, tmp_path / "stopped", config=config(**kw), resume=True)
    straight, resumed = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "stopped")
    assert straight.name == resumed.name == "step-00000006"
    weights = "adapter.safetensors" if method == "lora" else "model.safetensors"
    assert (straight / weights).read_bytes() == (resumed / weights).read_bytes()
    drop = ("elapsed_s", "tokens_per_s", "mfu")
    rows = [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "straight")]
    assert rows == [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "stopped")]


def test_resume_refuses_other_settings(base, pairs, tmp_path):
    run(base, pairs, tmp_path / "run", config=config(method="lora", max_steps=3))
    with pytest.raises(TrainingError, match="method='lora'"):
        run(base, pairs, tmp_path / "run", config=config(method="full", max_steps=6), resume=True)
    with pytest.raises(TrainingError, match="prompt_template"):
        run(base, pairs, tmp_path / "run", config=config(method="lora", max_steps=6), resume=True,
            template="{prompt} =")


def test_full_run_on_text_lowers_held_out_loss_and_keeps_the_best(base, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i:02d}.txt").write_text("the cat sat on the mat. " * (5 + i % 3))
    out = tmp_path / "run"
    report = run(base, corpus, out, config=config(max_steps=12, lr=3e-3, eval_interval=4, block_size=32))
    rows = [r for r in metrics(out) if "val_loss" in r]
    assert rows[0]["step"] == 0 and rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5
    assert "val_bpb" in rows[-1]  # text data reports bits per byte
    best_bpb = min(r["val_bpb"] for r in rows[1:])
    assert f"held-out loss: {rows[0]['val_bpb']:.4f} bits/byte before fine-tuning -> {best_bpb:.4f}" in report
    best = json.loads((out / "best.json").read_text())
    assert (out / best["checkpoint"] / "model.safetensors").is_file()
    assert f"best checkpoint: {out / best['checkpoint']}" in report
    assert prompt_template(out) is None  # text data has no template
    assert load_model(out).config.n_ctx == 48


def test_early_stopping_stops_and_marks_the_best(base, pairs, tmp_path):
    # A learning rate this large makes validation loss climb after the first steps.
    out = tmp_path / "run"
    report = run(base, pairs, out, config=config(max_steps=40, lr=0.5, warmup_steps=0, eval_interval=1,
                                                 patience=2, ckpt_interval=100, grad_clip=0))
    assert "early stopping" in report
    best = json.loads((out / "best.json").read_text())
    rows = [r for r in metrics(out) if "val_loss" in r and r["step"] > 0]  # step 0 is the base, not a checkpoint
    assert best["val_loss"] == min(r["val_loss"] for r in rows) and rows[-1]["step"] < 40
    assert rows[-1]["step"] - best["step"] == 2  # patience: two evaluations without improvement
    assert (out / best["checkpoint"]).is_dir()


def test_gradient_checkpointing_gives_the_same_run(base, pairs, tmp_path):
    kw = dict(method="lora", max_steps=3, eval_interval=0)
    run(base, pairs, tmp_path / "plain", config=config(**kw))
    run(base, pairs, tmp_path / "ckpt", config=config(**kw, gradient_checkpointing=True))
    losses = [[r["train_loss"] for r in metrics(tmp_path / name) if "train_loss" in r] for name in ("plain", "ckpt")]
    assert losses[0] == losses[1]


def test_finetune_from_a_hugging_face_folder(tmp_path, pairs):
    hf_model(n_layer=2, n_head=2, n_embd=32, n_ctx=48, vocab_size=TOK.vocab_size).save_pretrained(tmp_path / "hf")
    TOK.save_hf(tmp_path / "hf")
    run(tmp_path / "hf", pairs, tmp_path / "full", config=config(max_steps=2))
    run(tmp_path / "hf", pairs, tmp_path / "lora", config=config(max_steps=2, method="lora"))
    adapter = json.loads((latest_checkpoint(tmp_path / "lora") / ADAPTER_CONFIG).read_text())
    assert adapter["base"]["format"] == "hf"
    assert load_model(tmp_path / "lora").config == load_model(tmp_path / "full").config


def test_refusals(base, pairs, tmp_path):
    with pytest.raises(TrainingError, match="--merge is for LoRA"):
        run(base, pairs, tmp_path / "a", merge=True)
    with pytest.raises(DataError, match="exactly once"):
        run(base, pairs, tmp_path / "b", template="no placeholder")
    with pytest.raises(DataError, match="every example is longer"):
        run(base, pairs, tmp_path / "c", config=config(block_size=4))
    run(base, pairs, tmp_path / "d", config=config(method="lora", max_steps=1))
    with pytest.raises(TrainingError, match="is a LoRA adapter: merge it first"):
        run(tmp_path / "d", pairs, tmp_path / "e", config=config(method="lora"))


def test_cli_finetune_and_lora_merge(base, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", str(base), "--data", str(pairs), "--out", str(out), "--method", "lora", "--max-steps", "2",
            "--batch-size", "2", "--eval-interval", "1", "--eval-batches", "1", "--device", "cpu", "--peak-tflops",
            "1", "--template", TEMPLATE, "--merge"]
    assert main(argv) == 0
    assert "merged" in capsys.readouterr().out
    provenance = json.loads((out / "provenance.jsonl").read_text())
    assert provenance["train_config"]["lr"] == 1e-3 and provenance["train_config"]["keep_best"]  # LoRA's defaults
    assert main(["lora", "merge", str(out), "--out", str(tmp_path / "hf"), "--hf"]) == 0
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, TOK.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, load_model(out / "merged")(x), rtol=1e-4, atol=1e-4)
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "completion": "b"}', "{oops"])
    assert main(["finetune", str(base), "--data", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "bad.jsonl line 2 is not valid JSON" in capsys.readouterr().err


def test_generate_uses_the_prompt_template_of_a_lora_run(base, pairs, tmp_path, capsys):
    from gpt2lab.generate import Generator

    out = tmp_path / "run"
    run(base, pairs, out, config=config(method="lora", max_steps=2))
    assert main(["generate", str(out), "--prompt", "3 plus 4", "--greedy", "--max-new-tokens", "6",
                 "--no-stop-at-eot"]) == 0
    printed = capsys.readouterr().out
    expected = Generator(load_model(out), TOK).generate("Q: 3 plus 4\nA:", greedy=True, max_new_tokens=6,
                                                         stop_at_eot=False)[0].text
    assert printed == "Q: 3 plus 4\nA:" + expected + "\n"
    assert main(["generate", str(out), "--prompt", "3 plus 4", "--greedy", "--max-new-tokens", "6",
                 "--no-template"]) == 0
    assert capsys.readouterr().out.startswith("3 plus 4")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_lora_merge_never_replaces_the_base_the_adapter_or_user_files(base, tmp_path, pairs, capsys):
    run(base, pairs, tmp_path / "base_run", config=config(max_steps=2))  # the adapter's base is itself a run
    run(tmp_path / "base_run", pairs, tmp_path / "lora", config=config(method="lora", max_steps=2),
        template=TEMPLATE)
    run(base, pairs, tmp_path / "other_run", config=config(max_steps=1))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    before = snapshot(tmp_path)
    for out, why in [("base_run", "source"), ("other_run", "run folder"), ("lora", "source"),
                     ("lora/checkpoints", "inside the training run"), (".", "source"), ("mine", "did not write"),
                     ("pairs.jsonl", "is a file"), ("other_run/checkpoints/step-00000001", "inside the training run"),
                     ("base_run/merged2", "inside the training run")]:
        for extra in ([], ["--force"], ["--hf", "--force"]):
            capsys.readouterr()
            assert main(["lora", "merge", str(tmp_path / "lora"), "--out", str(tmp_path / out), *extra]) == 2
            err = capsys.readouterr().err
            assert why in err and len(err.splitlines()) == 1, (out, extra, err)
    assert snapshot(tmp_path) == before
    assert main(["lora", "merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")]) == 0
    assert main(["lora", "merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")]) == 2
    assert main(["lora", "merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged"), "--force"]) == 0


@pytest.mark.parametrize("data_kind", ["text", "pairs"])
def test_finetune_into_an_existing_run_refuses_before_writing_anything(base, pairs, tmp_path, data_kind):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{i}.txt").write_text(f"{i} the quick brown fox " * 20)
    data = corpus if data_kind == "text" else pairs
    run(base, data, tmp_path / "out", config=config(max_steps=2))
    before = snapshot(tmp_path / "out")
    with pytest.raises(TrainingError, match="already holds a run"):
        run(base, corpus, tmp_path / "out", config=config(max_steps=2))
    assert snapshot(tmp_path / "out") == before


def test_lora_under_bf16_holds_the_frozen_base_in_bf16_with_the_same_losses(base, pairs, tmp_path, monkeypatch):
    """Autocast computes the frozen Linear layers from bf16 copies anyway: holding them in bf16 halves
    the base's memory and changes no loss. The adapters, embeddings and LayerNorms stay fp32."""
    import gpt2lab.finetune as finetune_module

    trained: list[GPT] = []
    real_fit = finetune_module.fit
    monkeypatch.setattr(finetune_module, "fit", lambda m, *a, **k: (trained.append(m), real_fit(m, *a, **k))[1])
    kw = dict(method="lora", precision="bf16", lora=LoRAConfig(rank=2, targets=("c_attn", "c_fc")))
    run(base, pairs, tmp_path / "bf16-base", config=config(**kw))
    dtypes = {n: p.dtype for n, p in trained[0].named_parameters()}
    assert {d for n, d in dtypes.items() if ".h." in n and "ln_" not in n and "lora_" not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n or "ln_" in n or "wte" in n or "wpe" in n} == {torch.float32}

    monkeypatch.setattr(finetune_module, "base_dtype", lambda cfg, width=None: torch.float32)  # the base stays fp32
    run(base, pairs, tmp_path / "fp32-base", config=config(**kw))
    assert {p.dtype for p in trained[1].parameters()} == {torch.float32}
    drop = ("elapsed_s", "tokens_per_s", "mfu")
    assert [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "bf16-base")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "fp32-base")]
