"""Every command, given bad arguments, says what is wrong in one line and exits 2: never a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lab import save_checkpoint
from gpt2lab.cli import COMMANDS, UsageError, main, parse
from gpt2lab.config import GPTConfig
from gpt2lab.data import prepare
from gpt2lab.model import GPT
from gpt2lab.tokenizer import EOT, Tokenizer, Vocabulary


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict[str, str]:
    """A checkpoint, a prepared data folder, a text file, an empty folder and a user folder."""
    root = tmp_path_factory.mktemp("cli")
    tok = Tokenizer(Vocabulary(tokens=tuple([bytes([b]) for b in range(256)] + [EOT]), merges=()))
    torch.manual_seed(0)
    save_checkpoint(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=32, vocab_size=tok.vocab_size)),
                    root / "ckpt", tokenizer=tok)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"text number {i}. " * 30)
    prepare(str(corpus), out=root / "data", tokenizer=tok, val_fraction=0.2, progress=False)
    (root / "file.txt").write_text("hello world\n")
    (root / "empty").mkdir()
    (root / "user").mkdir()
    (root / "user" / "thesis.txt").write_text("years of work")
    return {"ckpt": str(root / "ckpt"), "data": str(root / "data"), "file": str(root / "file.txt"),
            "empty": str(root / "empty"), "user": str(root / "user"), "missing": str(root / "missing"),
            "root": str(root)}


BAD = {
    "convert": [
        "{missing} {root}/c1", "{file} {root}/c1", "{empty} {root}/c1", "{ckpt} {file}", "{ckpt} {user}",
        "{ckpt} {root}/c1 --to banana", "{ckpt} {ckpt} --force", "{ckpt} {root} --force", "{ckpt}",
    ],
    "info": ["{missing}", "{file}", "{empty}", "{data}", ""],
    "generate": [
        "{missing} --prompt hi", "{ckpt} --prompt hi --temperature -1", "{ckpt} --prompt hi --temperature nan",
        "{ckpt} --prompt hi --top-p 2", "{ckpt} --prompt hi --top-k -3",
        "{ckpt} --prompt hi --seed 100000000000000000000000",
        "{ckpt} --prompt hi --seed -1", "{ckpt} --prompt hi --device banana", "{ckpt} --prompt hi --max-new-tokens -5",
        "{ckpt} --prompt hi --stop \\", "{ckpt} --prompt-file {missing}", "{ckpt} --prompt hi --mode int4",
        "{ckpt} --prompt hi --repetition-penalty 0", "{ckpt} --prompt hi --temperature inf",
    ],
    "prepare": [
        "{missing}", "{file} --out {root}/p1 --val-fraction 0.9", "{file} --out {root}/p1 --shard-tokens 0",
        "{file} --out {file} --val-fraction 0", "{file} --out {user} --val-fraction 0", "{file} --tokenizer {missing}",
        "{file} --out {root}/p1 --workers 0 --val-fraction 0", "{file} --out {root} --val-fraction 0",
    ],
    "train": [
        "--data {data} --out {root}/t1 --device banana", "--data {data} --out {file}",
        "--data {missing} --out {root}/t1",
        "--data {data} --out {root}/t1 --max-steps -1", "--data {data} --out {root}/t1 --lr nan",
        "--data {data} --out {root}/t1 --batch-size 0", "--data {data} --out {root}/t1 --model bogus",
        "--data {data} --out {user}", "--data {data} --out {root}/t1 --resume", "--data {file} --out {root}/t1",
        "--data {data} --out {root}/t1 --block-size 100000", "--data {data}", "--data {data} --out {root}/t1 --seed x",
        "--data {data} --out {root}/t1 --precision fp8", "--data {data} --out {root}/t1 --eps nan",
        "--data {data} --out {root}/t1 --max-minutes nan", "--data {data} --out {root}/t1 --max-minutes inf",
        "--data {data} --out {root}/t1 --seed 99999999999999999999999", "--data {data} --out {root}/t1 --min-lr nan",
        "--data {data} --out {root}/t1 --peak-tflops nan", "--data {data} --out {root}/t1 --lr inf",
        "--data {data} --out {root}/t1 --weight-decay 1e309", "--data {data} --out {data}/run",
        "--data {data} --out {ckpt}/run",
    ],
    "demo": ["--vocab-size -3", "--threads 0", "--data {missing}", "--max-steps 0", "--threads 100000",
             "--threads 99999999999999999999", "--eps nan"],
    "tokenizer encode": ["{missing}", "{file} --tokenizer {missing}", "{empty}"],
    "tokenizer decode": ["{file}", "{missing}", "{file} --output {empty}"],
    "tokenizer count": ["{missing}", "{empty}", "{file} --tokenizer {file}"],
    "tokenizer train": [
        "{file} --min-frequency -1 --out {root}/k1", "{file} --out {file}", "{file} --vocab-size 10 --out {root}/k1",
        "{missing} --out {root}/k1", "{file} --out {user}",
    ],
    "eval": [
        "{ckpt} --task banana", "{ckpt} --task perplexity --data {file} --out {empty}", "{missing} --task perplexity",
        "{ckpt} --task perplexity --data {file} --limit -1", "{ckpt} --task perplexity --data {missing}",
        "{ckpt} --task bigbench:not_a_task", "{ckpt} --task perplexity --data {file} --device banana",
        "{ckpt} --task qa --data {file}", "{ckpt} --task translation --data {missing}",
        "{ckpt} --task summarization --data {file} --seed -1",
    ],
    "finetune": [
        "{ckpt} --data {file} --out {root}/f1 --method banana", "{missing} --data {file} --out {root}/f1",
        "{ckpt} --data {file} --out {file}", "{ckpt} --data {file} --out {root}/f1 --lr -1",
        "{ckpt} --data {missing} --out {root}/f1", "{ckpt} --data {file} --out {user}",
        "{ckpt} --data {file} --out {root}/f1 --device banana", "{ckpt} --data {file} --out {data}/ft",
        "{ckpt} --data {file} --out {root}/f1 --method lora --lora.rank 999999999999999999",
        "{ckpt} --data {file} --out {root}/f1 --method lora --lora.alpha inf",
        "{ckpt} --data {file} --out {root}/f1 --lora.targets banana",
        "{ckpt} --data {file} --out {root}/f1 --lora.rank",
        "{ckpt} --data {file} --out {root}/f1 --config {missing}",
        "{ckpt} --data {file} --out {root}/f1 --config {file}",
        "{ckpt} --data {file} --out {root}/f1 --seed 18446744073709551616",
    ],
    "estimate": ["banana", "gpt2 --batch-size 0", "gpt2 --block-size -1", "gpt2 --batch-size 3 --devices 2",
                 "gpt2 --block-size 2048", "gpt2 --device banana", "gpt2 --device-memory lots", "gpt2 --mfu 2",
                 "gpt2 --method lora --devices 2", "{missing}", "{file}"],
    "lora merge": ["{ckpt} --out {root}/m1", "{missing} --out {root}/m1", "{empty} --out {root}/m1"],
    "serve": ["{missing} --port 0", "{ckpt} --port 99999", "{ckpt} --mode int4", "{ckpt} --max-batch 0 --port 0",
              "{ckpt} --chat-template {missing} --port 0", "{ckpt} --max-tokens 100000 --port 0",
              "{ckpt} --grace nan --port 0", "{ckpt} --host no-such-host.invalid --port 0",
              "{ckpt} --chat-template {ckpt}/config.json --max-prompt-tokens 0 --port 0"],
    "": ["", "banana", "train --banana", "--version-banana", "tokenizer", "lora", "--config {file}",
         "tokenizer banana"],
}


def test_every_command_has_bad_arguments_here():
    assert set(COMMANDS) <= set(BAD)


CASES = [(command, args) for command, cases in BAD.items() for args in cases]


@pytest.mark.parametrize("command, args", CASES, ids=[f"{c or 'gpt2lab'}: {a}" for c, a in CASES])
def test_bad_arguments_give_one_line_and_exit_2(place, capsys, monkeypatch, command, args):
    monkeypatch.chdir(place["root"])  # whatever a command writes by default lands where the test looks
    argv = command.split() + [a.format(**place) for a in args.split()]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("gpt2lab"), err
    assert "Traceback" not in err
    left = {p.name for p in Path(place["root"]).iterdir()}  # and nothing was written for the refused commands
    assert left == {"ckpt", "data", "corpus", "file.txt", "empty", "user"}, left
    assert [p.name for p in (Path(place["data"])).iterdir() if p.name in ("run", "ft")] == []


@pytest.mark.slow
def test_output_the_reader_stops_reading_or_a_full_disk(place):
    cmd = f"{sys.executable} -m gpt2lab info {place['ckpt']}"
    full = subprocess.run(f"{cmd} > /dev/full", shell=True, capture_output=True, text=True, timeout=120)
    assert full.returncode == 2 and full.stderr.strip().splitlines() == [
        "gpt2lab: error: No space left on device (standard output)"], full.stderr
    head = subprocess.run(f"set -o pipefail; {cmd} | head -c 10 >/dev/null", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=120)
    assert head.returncode in (0, 141) and head.stderr == "", head.stderr  # quiet, as after a SIGPIPE


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["train", "--data", "{data}", "--out", "{root}/x", "--device", "banana"],
    ["generate", "{ckpt}", "--prompt", "hi", "--temperature", "1e-40", "--max-new-tokens", "2", "--seed", "1e23"],
    ["convert", "{ckpt}", "{user}", "--to", "hf", "--force"],
    ["tokenizer", "decode", "--output", "{empty}"],
])
def test_the_real_command_prints_one_line(place, argv):
    argv = [a.format(**place) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "gpt2lab", *argv], capture_output=True, text=True, timeout=120,
                          input="1 2 3")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_gpt2labs_own_warnings_print_as_one_line(monkeypatch, capsys):
    import warnings

    import gpt2lab.cli as cli

    def command():
        warnings.warn("gpt2lab: the kernels could not be built\n  (no compiler)", stacklevel=1)
        warnings.warn("a library's own", UserWarning, stacklevel=1)

    others = []
    monkeypatch.setattr(cli, "parse", lambda argv: command)
    monkeypatch.setattr(warnings, "showwarning", lambda message, *rest: others.append(str(message)))
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["anything"]) == 0
    assert capsys.readouterr().err == "gpt2lab: warning: the kernels could not be built (no compiler)\n"
    assert others == ["a library's own"]  # shown as it was before
    assert warnings.showwarning is before  # put back when the command ends


def test_a_repeated_list_option_keeps_every_value_and_replaces_the_default():
    def targets(*extra):
        return parse(["finetune", "m", "--data", "d", "--out", "o", *extra]).keywords["config"].lora.targets

    assert len(targets()) == 3  # the default
    assert targets("--lora.targets", "c_fc") == ("c_fc",)
    assert targets("--lora.targets", "c_fc", "--lora.targets", "c_attn") == ("c_fc", "c_attn")
    assert targets("--lora.targets", "c_fc", "c_attn") == ("c_fc", "c_attn")
    assert targets("--lora.targets=c_fc", "--lora.targets", "c_attn") == ("c_fc", "c_attn")
    call = parse(["generate", "m", "--prompt", "a", "--stop", "x", "--prompt", "b", "c", "--stop=y"])
    assert call.keywords["prompt"] == ["a", "b", "c"] and call.keywords["config"].stop == ("x", "y")
    # Values may start with a dash; a value ends at the next option the command knows.
    call = parse(["generate", "m", "--prompt", "a", "--prompt", "-1", "-x", "--stop=--", "--stop", "-5", "--greedy"])
    assert call.keywords["prompt"] == ["a", "-1", "-x"] and call.keywords["config"].stop == ("--", "-5")
    assert call.keywords["config"].greedy is True
    with pytest.raises(UsageError, match="--prompt needs a value"):
        parse(["generate", "m", "--prompt", "--greedy"])


def test_nested_options_and_a_config_file_with_the_command_line_winning(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("lr: 0.003\nmax_steps: 7\ncompile: true\nmethod: lora\nlora:\n  rank: 4\n  targets: [c_fc, c_attn]\n"
                   "merge: true\n")
    call = parse(["finetune", "m", "--data", "d", "--out", "o", "--config", str(run), "--max-steps", "9",
                  "--no-merge", "--lora.alpha", "2"])
    cfg = call.keywords["config"]
    assert (cfg.lr, cfg.max_steps, cfg.compile, cfg.method) == (0.003, 9, True, "lora")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (4, 2.0, ("c_fc", "c_attn"))
    assert call.keywords["merge"] is False and call.args == ("m",)
    generation = tmp_path / "gen.yaml"
    generation.write_text("temperature: 0\nprompt: [a, b]\nstop: ['\\n']\njson: true\n")
    run.write_text("# nothing but a comment\n")
    empty = parse(["finetune", "m", "--data", "d", "--out", "o", "--config", str(run)])
    assert empty.keywords["config"].max_steps == 200
    call = parse(["generate", "m", f"--config={generation}", "--prompt", "c"])
    assert call.keywords["prompt"] == ["c"] and call.keywords["as_json"] is True
    assert call.keywords["config"].temperature == 0 and call.keywords["config"].stop == ("\\n",)
    for bad, message in [("- a\n", "mapping"), ("bogus: 1\n", "--bogus"), ("lr: [\n", "YAML"),
                         ("lora: {rank: x}\n", "--lora.rank"), ("prompt: []\n", "empty list"),
                         ("no_merge: true\n", "merge: false"), ("max_steps: x\n", f"--config {run}")]:
        run.write_text(bad)
        with pytest.raises(UsageError, match=re.escape(message)):
            parse(["finetune", "m", "--data", "d", "--out", "o", "--config", str(run)])


def test_repeated_prompts_are_all_generated(place, capsys):
    code = main(["generate", place["ckpt"], "--prompt", "ab", "--prompt", "cd", "--max-new-tokens", "2",
                 "--json", "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 0
    import json

    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [r["prompt_index"] for r in rows] == [0, 1], out  # one per --prompt, none dropped


# The command-line surface users and scripts rely on: (positional arguments, --flags). Renaming a
# Python parameter must not silently rename or drop a flag; new flags may be added freely.
SURFACE = {
    "convert": (["SRC", "DST"], "force to"),
    "info": (["PATH"], ""),
    "estimate": (["MODEL"], "batch-size block-size device device-memory devices fsdp gradient-checkpointing json "
                 "lora.rank lora.targets method mfu micro-batch peak-tflops precision"),
    "generate": (["MODEL"], "add-bos compile device greedy interactive json max-new-tokens mode num-samples prompt "
                 "prompt-file repetition-penalty seed slide-window stop stop-at-eot stream temperature template "
                 "top-k top-logprobs top-p truncate-prompt"),
    "prepare": (["SOURCE"], "decode-errors field force out progress shard-tokens tokenizer val-fraction workers"),
    "train": ([], "batch-size beta1 beta2 block-size ckpt-interval compile data decay-steps device dropout eps "
              "eval-batches eval-interval fsdp grad-clip gradient-checkpointing keep-best keep-last log-interval lr "
              "max-minutes max-steps micro-batch min-lr model optimizer out patience peak-tflops precision resume "
              "seed tensorboard warmup-steps weight-decay"),
    "demo": ([], "batch-size block-size compile data device eval-batches eval-interval lr max-minutes max-steps "
             "min-lr model optimizer out seed threads vocab-size warmup-steps"),
    "tokenizer encode": ([], "allow-special input json-lists tokenizer"),
    "tokenizer decode": ([], "force input output tokenizer"),
    "tokenizer count": ([], "input tokenizer"),
    "tokenizer train": ([], "force input min-frequency out vocab-size"),
    "eval": (["MODEL"], "batch-size data device limit out per-example seed shots stride task tokenizer"),
    "finetune": (["MODEL"], "batch-size block-size data data-format device eval-batches eval-interval field "
                 "gradient-checkpointing keep-best keep-last lora.alpha lora.dropout lora.rank lora.targets lr "
                 "max-minutes max-steps merge method optimizer out patience resume seed template too-long val-data "
                 "val-fraction warmup-steps"),
    "lora merge": (["ADAPTER"], "force hf out"),
    "serve": (["MODEL"], "api-key chat-template cors-origins device grace host max-batch max-body-bytes max-n "
              "max-prompt-tokens max-queue max-streams max-tokens mode model-name port"),
}


def help_text(capsys, monkeypatch, *words: str) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # one option per line
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def test_the_command_line_surface_keeps_every_documented_argument(capsys, monkeypatch):
    """What each command's --help shows, as users see it: a lost or renamed flag fails here."""
    listed = help_text(capsys, monkeypatch)
    for name in {c.split()[0] for c in COMMANDS}:
        assert re.search(rf"• {name}\b", listed), name
    for name, (positional, flags) in SURFACE.items():
        text = help_text(capsys, monkeypatch, *name.split())
        assert text.startswith(f"usage: gpt2lab {name} "), text
        rows = [line.strip("│ ") for line in text.splitlines()]
        shown = {m.group(1) for row in rows if (m := re.match(r"--([\w.-]+)", row))}
        # The section "positional arguments" (a box on a terminal, a ruled heading when piped) lists them.
        section = text.partition("positional arguments")[2].partition("options")[0]
        seen_positional = [m.group(1) for row in section.splitlines()
                           if (m := re.match(r"([A-Z][A-Z_]*)\s", row.strip("│ ")))]
        assert seen_positional == positional, name
        missing = set(flags.split()) - shown
        assert not missing, f"gpt2lab {name} lost --{', --'.join(sorted(missing))}"
