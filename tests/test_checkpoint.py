import json

import pytest
import torch
from conftest import ODD_CONFIGS, hf_model

from gpt2lab import load_model, save_checkpoint
from gpt2lab.checkpoint import export_hf, info, load_config
from gpt2lab.cli import main
from gpt2lab.config import preset
from gpt2lab.errors import CheckpointError
from gpt2lab.model import GPT


def batches(vocab_size, n_ctx):
    g = torch.Generator().manual_seed(1)
    for B, T in [(1, 1), (2, 7), (3, n_ctx)]:
        yield torch.randint(0, vocab_size, (B, T), generator=g)


def assert_same_logits(ours, theirs, vocab_size, n_ctx):
    for idx in batches(vocab_size, n_ctx):
        with torch.no_grad():
            torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", ODD_CONFIGS, ids=lambda c: "x".join(map(str, c.values())))
@pytest.mark.parametrize("form", ["safetensors", "sharded", "bin"])
def test_hf_checkpoint_loads_with_identical_logits(tmp_path, cfg, form):
    hf = hf_model(**cfg)
    if form == "safetensors":
        hf.save_pretrained(tmp_path)
    elif form == "sharded":
        hf.save_pretrained(tmp_path, max_shard_size="2KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    else:  # as older transformers wrote it: a pickled state dict with the causal-mask buffers
        hf.config.save_pretrained(tmp_path)
        sd = hf.state_dict()
        for i in range(cfg["n_layer"]):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(cfg["n_ctx"], cfg["n_ctx"]))[None, None]
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = load_model(tmp_path)
    assert not ours.training
    assert_same_logits(ours, hf, cfg["vocab_size"], cfg["n_ctx"])


@pytest.mark.parametrize("cfg", ODD_CONFIGS[:2], ids=["3x3x48", "2x4x32"])
def test_export_loads_in_transformers_with_identical_logits(tmp_path, cfg):
    from transformers import GPT2LMHeadModel

    ours = GPT(preset("gpt2-nano", **cfg)).eval()
    export_hf(ours, tmp_path / "hf")
    theirs, loading_info = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(loading_info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert_same_logits(ours, theirs.eval(), cfg["vocab_size"], cfg["n_ctx"])


@pytest.mark.slow
def test_gpt2_124m_round_trips_through_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    cfg = dict(n_layer=12, n_head=12, n_embd=768, n_ctx=1024, vocab_size=50257)
    hf = hf_model(**cfg)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.num_params() == 124_439_808
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
    export_hf(ours, tmp_path / "back")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_own_format_round_trip_is_exact(tmp_path):
    model = GPT(preset("gpt2-nano", vocab_size=101)).eval()
    save_checkpoint(model, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ck")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_run_folder_loads_its_newest_complete_checkpoint(tmp_path):
    old, new = (GPT(preset("gpt2-nano", vocab_size=50)) for _ in range(2))
    save_checkpoint(old, tmp_path / "run" / "checkpoints" / "step-00000010")
    save_checkpoint(new, tmp_path / "run" / "checkpoints" / "step-00000020")
    (tmp_path / "run" / "checkpoints" / "step-00000030").mkdir()  # incomplete: no files
    loaded = load_model(tmp_path / "run")
    assert torch.equal(loaded.transformer.wte.weight, new.transformer.wte.weight)


def test_overwriting_a_checkpoint_is_atomic(tmp_path, monkeypatch):
    first = GPT(preset("gpt2-nano", vocab_size=50))
    save_checkpoint(first, tmp_path / "ck")

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("gpt2lab.checkpoint.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(GPT(preset("gpt2-nano", vocab_size=50)), tmp_path / "ck")
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folders left behind
    assert torch.equal(load_model(tmp_path / "ck").transformer.wte.weight, first.transformer.wte.weight)


def test_convert_and_info_cli(tmp_path, capsys):
    hf_model(**ODD_CONFIGS[0]).save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--to", "gpt2lab"]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ours")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["format"] == "gpt2lab"
    assert shown["parameters"] == load_model(tmp_path / "ours").num_params()
    assert shown["config"]["n_ctx"] == 37
    assert load_config(tmp_path / "hf2").n_embd == 48
    assert info(str(tmp_path / "hf2"))["format"] == "hf"


# -- bad input: one clear error each -----------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a GPT-2 checkpoint"):
        load_model(tmp_path)


def test_config_of_another_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        load_model(tmp_path)


def test_missing_weights_file(tmp_path):
    save_checkpoint(GPT(preset("gpt2-nano", vocab_size=50)), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path / "ck")


def test_missing_shard(tmp_path):
    hf_model(**ODD_CONFIGS[0]).save_pretrained(tmp_path, max_shard_size="2KB")
    next(tmp_path.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_model(tmp_path)


def test_config_shape_mismatch_names_the_tensor(tmp_path):
    save_checkpoint(GPT(preset("gpt2-nano", vocab_size=50)), tmp_path / "ck")
    cfg_path = tmp_path / "ck" / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["model"]["n_embd"] = 60
    meta["model"]["n_head"] = 3
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tensor 'transformer\.\S+' has shape"):
        load_model(tmp_path / "ck")


def test_missing_tensor_is_named(tmp_path):
    save_checkpoint(GPT(preset("gpt2-nano", vocab_size=50)), tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["model"]["n_layer"] = 4
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tensor 'transformer\.h\.3\.\S+' is missing"):
        load_model(tmp_path / "ck")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, damage):
    save_checkpoint(GPT(preset("gpt2-nano", vocab_size=50)), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors.*(truncated or corrupt)"):
        load_model(tmp_path / "ck")


def test_corrupt_config_json(tmp_path):
    save_checkpoint(GPT(preset("gpt2-nano", vocab_size=50)), tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path / "ck")


def test_cli_prints_one_line_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    hf_model(**ODD_CONFIGS[2]).config.save_pretrained(tmp_path)
    torch.save({"transformer.wte.weight": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(tmp_path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors"])
def test_a_shard_index_may_name_only_files_inside_the_checkpoint(tmp_path, name):
    hf_model(**ODD_CONFIGS[0]).save_pretrained(tmp_path / "hf", max_shard_size="2KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    first = next(iter(meta["weight_map"]))
    (tmp_path / "outside.safetensors").write_bytes((tmp_path / "hf" / meta["weight_map"][first]).read_bytes())
    meta["weight_map"][first] = name
    index.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not inside"):
        load_model(tmp_path / "hf")


# -- destinations: nothing the user wrote is ever replaced -----------------------------------------


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(capsys, *argv):
    capsys.readouterr()  # what came before is not this command's
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(GPT(preset("gpt2-nano", vocab_size=50)), tmp_path / "ck")


@pytest.mark.parametrize("to", ["hf", "gpt2lab"])
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_convert_never_replaces_user_files(tmp_path, capsys, ckpt, to, force):
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "thesis.txt").write_text("x")
    (tmp_path / "somefile").write_text("mine")
    hf_model(**ODD_CONFIGS[0]).save_pretrained(tmp_path / "theirs")  # an HF folder gpt2lab did not write
    before = snapshot(tmp_path)
    for dst, why in [("u", "did not write"), ("somefile", "is a file"), ("theirs", "did not write")]:
        code, err = cli(capsys, "convert", str(ckpt), str(tmp_path / dst), "--to", to, *force)
        assert code == 2 and why in err and len(err.splitlines()) == 1, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("dst", ["par", "par/ck", ".", "link"])
def test_convert_never_replaces_the_source_or_a_folder_holding_it(tmp_path, capsys, monkeypatch, dst):
    monkeypatch.chdir(tmp_path)
    save_checkpoint(GPT(preset("gpt2-nano", vocab_size=50)), tmp_path / "par" / "ck")
    (tmp_path / "link").symlink_to(tmp_path / "par" / "ck")
    before = snapshot(tmp_path)
    for to in ("hf", "gpt2lab"):
        code, err = cli(capsys, "convert", "par/ck", dst, "--to", to, "--force")
        assert code == 2 and "source" in err, err
    assert snapshot(tmp_path) == before


def test_convert_never_replaces_a_run(tmp_path, capsys):
    from test_train import config
    from test_train import run as fit_run

    fit_run(tmp_path, "run", config(max_steps=2, ckpt_interval=1))
    fit_run(tmp_path, "other", config(max_steps=2, ckpt_interval=1))
    before = snapshot(tmp_path)
    for src, dst in [("run", "run"), ("other", "run"), ("run/checkpoints/step-00000001", "run"),
                     ("run/checkpoints/step-00000001", "run/checkpoints/step-00000002"),
                     ("other", "run/checkpoints/step-00000001"), ("other", "run/exported")]:
        code, err = cli(capsys, "convert", str(tmp_path / src), str(tmp_path / dst), "--force")
        assert code == 2 and ("run folder" in err or "source" in err or "inside the training run" in err), err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("to, other", [("hf", "gpt2lab"), ("gpt2lab", "hf")])
def test_convert_replaces_its_own_output_of_the_same_kind_only_with_force(tmp_path, capsys, ckpt, to, other):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert cli(capsys, "convert", str(ckpt), str(out), "--to", to)[0] == 0
    assert cli(capsys, "convert", str(ckpt), str(elsewhere), "--to", other)[0] == 0
    code, err = cli(capsys, "convert", str(ckpt), str(out), "--to", to)
    assert code == 2 and "--force" in err
    code, err = cli(capsys, "convert", str(ckpt), str(elsewhere), "--to", to, "--force")  # another kind
    assert code == 2 and "did not write" in err
    newer = save_checkpoint(GPT(preset("gpt2-nano", vocab_size=50)), tmp_path / "newer")
    assert cli(capsys, "convert", str(newer), str(out), "--to", to, "--force")[0] == 0
    torch.testing.assert_close(load_model(out).state_dict(), load_model(newer).state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "elsewhere", "newer", "out"]


def test_convert_to_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, ckpt):
    mnt = tmp_path / "small"
    mnt.mkdir()
    import subprocess

    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        for to in ("hf", "gpt2lab"):
            code, err = cli(capsys, "convert", str(ckpt), str(mnt / "out"), "--to", to)
            assert code == 2 and "no space left" in err and str(mnt / "out") in err and len(err.splitlines()) == 1
            assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_convert_with_a_failing_write_leaves_the_old_output(tmp_path, capsys, ckpt, monkeypatch):
    import errno

    assert cli(capsys, "convert", str(ckpt), str(tmp_path / "out"))[0] == 0
    before = snapshot(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("gpt2lab.checkpoint.save_file", full)
    code, err = cli(capsys, "convert", str(ckpt), str(tmp_path / "out"), "--force")
    assert code == 2 and "no space left on the device while writing" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("field, value", [("n_embd", 10**20), ("n_layer", 10**9), ("vocab_size", -1),
                                          ("n_ctx", "1024"), ("layer_norm_epsilon", 5.0)])
def test_an_absurd_config_is_a_one_line_error_before_any_allocation(tmp_path, capsys, ckpt, field, value):
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"][field] = value
    (ckpt / "config.json").write_text(json.dumps(meta))
    for argv in (["info", str(ckpt)], ["generate", str(ckpt), "--prompt", "a"]):
        code, err = cli(capsys, *argv)
        assert code == 2 and field in err and len(err.splitlines()) == 1, err
