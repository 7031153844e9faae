"""LoRA: exact at initialisation, merges to the same function, trains only its own tensors, and
adapter folders load through load_model onto the base they name (and only that base)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from conftest import ODD_CONFIGS, hf_model

from gpt2lab import GPTConfig, export_hf, load_model, save_checkpoint
from gpt2lab.checkpoint import base_reference, info, latest_checkpoint, load_tokenizer, resolve
from gpt2lab.errors import CheckpointError
from gpt2lab.lora import (
    ADAPTER_CONFIG,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from gpt2lab.model import GPT
from gpt2lab.tokenizer import EOT, Tokenizer, Vocabulary


def tiny(cfg=ODD_CONFIGS[0]) -> GPT:
    return GPT(GPTConfig(**cfg)).eval()


def randomize_adapter(model: nn.Module, seed: int = 1) -> None:
    """What training would do: give every B (zero at init) a non-zero value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def ids(cfg, T=None, B=2):
    return torch.randint(0, cfg["vocab_size"], (B, T or cfg["n_ctx"]))


@pytest.mark.parametrize("cfg", ODD_CONFIGS, ids=lambda c: f"L{c['n_layer']}d{c['n_embd']}")
def test_lora_at_init_gives_exactly_the_base_logits(cfg):
    base = tiny(cfg)
    adapted = tiny(cfg)
    adapted.load_state_dict(base.state_dict())
    apply_lora(adapted, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    x = ids(cfg)
    with torch.no_grad():
        assert torch.equal(adapted.eval()(x), base(x))


def test_targets_select_the_named_layers_and_freeze_the_rest():
    cfg = ODD_CONFIGS[1]
    model = tiny(cfg)
    names = apply_lora(model, LoRAConfig(rank=2, targets=("c_attn", "mlp.c_proj")))
    assert names == [f"transformer.h.{i}.{m}" for i in range(cfg["n_layer"]) for m in ("attn.c_attn", "mlp.c_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}" for n in names for ab in ("lora_A", "lora_B")}
    d = cfg["n_embd"]
    assert trainable_parameters(model) == cfg["n_layer"] * 2 * ((d + 3 * d) + (4 * d + d))
    # The base's names are untouched: its state dict is a subset of the adapted one's.
    assert set(tiny(cfg).state_dict()) <= set(model.state_dict())
    all_names = apply_lora(tiny(cfg), LoRAConfig(rank=2))  # default: every linear layer of every block
    assert len(all_names) == 4 * cfg["n_layer"]


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoRAConfig(targets=("lm_head",))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    model = tiny()
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())


def test_merged_layer_computes_what_the_adapted_layer_computes():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 40), LoRAConfig(rank=3, alpha=5.0))
    randomize_adapter(layer)
    x = torch.randn(7, 24)
    expected = x @ layer.weight.T + layer.bias + (5.0 / 3) * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merged()(x), expected)


@pytest.mark.parametrize("cfg", ODD_CONFIGS, ids=lambda c: f"L{c['n_layer']}d{c['n_embd']}")
def test_merge_keeps_the_logits(cfg):
    model = tiny(cfg)
    apply_lora(model, LoRAConfig(rank=3, alpha=6))
    randomize_adapter(model)
    x = ids(cfg)
    with torch.no_grad():
        adapted = model(x)
        merged = merge_lora(model)(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny(cfg).state_dict())
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_only_lora_tensors_get_gradients():
    model = tiny()
    apply_lora(model, LoRAConfig(rank=2))
    model.train()
    x = ids(ODD_CONFIGS[0], T=16)
    model(x).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


# -- adapter folders ---------------------------------------------------------------------------


def byte_tokenizer() -> Tokenizer:
    return Tokenizer(Vocabulary(tokens=(*(bytes([b]) for b in range(256)), EOT), merges=()))


@pytest.fixture
def adapted(tmp_path):
    """(base folder, adapter folder, the adapted model in memory)."""
    base = tiny()
    save_checkpoint(base, tmp_path / "base", tokenizer=byte_tokenizer())
    model = load_model(tmp_path / "base")
    config = LoRAConfig(rank=4, alpha=4, targets=("c_attn", "c_fc"))
    apply_lora(model, config)
    randomize_adapter(model)
    (tmp_path / "adapter").mkdir()
    save_adapter(model, tmp_path / "adapter", config=config, base=base_reference(tmp_path / "base"))
    return tmp_path / "base", tmp_path / "adapter", model


def test_adapter_folder_is_small_and_names_its_base(adapted):
    base, adapter, model = adapted
    described = info(str(adapter))
    assert described["format"] == "gpt2lab-lora" and described["base"] == str(base.resolve())
    assert described["adapter_parameters"] == sum(t.numel() for t in lora_state_dict(model).values())
    meta = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert meta["base"]["path"] == str(base.resolve()) and meta["base"]["format"] == "gpt2lab"
    assert meta["rank"] == 4 and meta["targets"] == ["c_attn", "c_fc"]
    assert len(meta["modules"]) == 2 * ODD_CONFIGS[0]["n_layer"]
    assert (adapter / "adapter.safetensors").stat().st_size < (base / "model.safetensors").stat().st_size / 3


def test_load_model_on_an_adapter_gives_base_plus_adapter(adapted):
    base, adapter, model = adapted
    x = ids(ODD_CONFIGS[0])
    loaded = load_model(adapter)
    assert type(loaded) is GPT and not any(isinstance(m, LoRALinear) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(loaded(x), load_model(base)(x))
    # Unmerged, on a freshly loaded base: the same adapter, the same function.
    fresh = load_model(base)
    load_adapter(fresh, adapter)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert load_tokenizer(adapter) == byte_tokenizer()


def test_adapter_refuses_a_changed_or_missing_base(adapted):
    base, adapter, _ = adapted
    other = tiny()
    save_checkpoint(other, base)  # same shapes, other weights
    with pytest.raises(CheckpointError, match="now holds other weights"):
        load_model(adapter)
    import shutil

    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match="no longer exists"):
        load_model(adapter)


def test_adapter_is_not_mistaken_for_a_full_checkpoint(adapted):
    _, adapter, _ = adapted
    with pytest.raises(CheckpointError, match="LoRA adapter"):
        resolve(adapter)
    run = adapter.parent / "run" / "checkpoints" / "step-00000004"
    run.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(adapter, run)
    assert latest_checkpoint(adapter.parent / "run") == run
    torch.testing.assert_close(load_model(adapter.parent / "run").state_dict(), load_model(adapter).state_dict())


def test_adapter_on_a_hugging_face_base_merges_and_exports_back(tmp_path):
    from transformers import GPT2LMHeadModel

    cfg = ODD_CONFIGS[1]
    hf_model(**cfg).save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    config = LoRAConfig(rank=2)
    apply_lora(model, config)
    randomize_adapter(model)
    (tmp_path / "adapter").mkdir()
    save_adapter(model, tmp_path / "adapter", config=config, base=base_reference(tmp_path / "hf"))
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["base"]["format"] == "hf"
    export_hf(load_model(tmp_path / "adapter"), tmp_path / "merged-hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged-hf").eval()
    x = ids(cfg)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.eval()(x), rtol=1e-4, atol=1e-4)


def test_lora_state_dict_holds_only_the_adapter():
    model = tiny()
    apply_lora(model, LoRAConfig(rank=2, targets=("c_proj",)))
    sd = lora_state_dict(model)
    assert sd and all(k.endswith(("lora_A", "lora_B")) for k in sd)
    assert len(sd) == 2 * 2 * ODD_CONFIGS[0]["n_layer"]  # attention's and the MLP's c_proj, A and B


def test_lora_trains_under_bf16_autocast():
    model = tiny()
    apply_lora(model, LoRAConfig(rank=2, dropout=0.1))
    randomize_adapter(model)
    model.train()
    x = ids(ODD_CONFIGS[0], T=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
