"""The optimizers: which parameters Muon takes, and MuonAdamW against torch's two optimizers run apart."""

import copy

import pytest
import torch

from gpt2lab.config import GPTConfig, TrainConfig
from gpt2lab.errors import ConfigError, TrainingError
from gpt2lab.model import GPT
from gpt2lab.optim import MUON_MOMENTUM, MuonAdamW, build_optimizer, muon_matrices, param_groups

CPU = torch.device("cpu")


def small_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, n_ctx=8, vocab_size=37))


def backward(model: GPT, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 37, (3, 8), generator=g), torch.randint(0, 37, (3, 8), generator=g)
    model(x, targets=y).backward()


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else():
    model = small_model()
    opt = build_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.1), CPU)
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in opt._muon.param_groups[0]["params"]}
    adamw = {names[id(p)] for g in opt._adamw.param_groups for p in g["params"]}
    assert muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.bias",
            "transformer.h.0.attn.c_attn.bias"} <= adamw
    assert muon.isdisjoint(adamw) and len(muon | adamw) == len(list(model.parameters()))
    # AdamW keeps decay on the embeddings only, Muon decays its matrices.
    decayed = {names[id(p)] for g in opt._adamw.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert opt._muon.param_groups[0]["weight_decay"] == 0.1
    assert build_optimizer(model, TrainConfig(), CPU).__class__ is torch.optim.AdamW


def test_muon_adamw_steps_exactly_as_torch_muon_and_adamw_side_by_side():
    ours, ref = small_model(), small_model()
    cfg = TrainConfig(optimizer="muon", lr=3e-3, weight_decay=0.1, beta1=0.8, beta2=0.9, eps=1e-7)
    opt = build_optimizer(ours, cfg, CPU)
    matrices = muon_matrices(ref)
    taken = {id(p) for p in matrices}
    muon = torch.optim.Muon(matrices, lr=3e-3, weight_decay=0.1, momentum=MUON_MOMENTUM, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([dict(g, params=[p for p in g["params"] if id(p) not in taken])
                               for g in param_groups(ref, 0.1)], lr=3e-3, betas=(0.8, 0.9), eps=1e-7)
    for step in range(3):
        for model in (ours, ref):
            backward(model, step)
        for group in opt.param_groups:  # the schedule sets every group's lr, as fit() does
            group["lr"] = 3e-3 * (step + 1) / 3
        for group in muon.param_groups + adamw.param_groups:
            group["lr"] = 3e-3 * (step + 1) / 3
        opt.step()
        muon.step()
        adamw.step()
        for o in (opt, muon, adamw):
            o.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(ours.transformer.h[0].attn.c_attn.weight, small_model().transformer.h[0].attn.c_attn.weight)


def test_muon_adamw_state_survives_a_state_dict_round_trip():
    model = small_model()
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    backward(model, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    loaded = build_optimizer(twin, TrainConfig(optimizer="muon"), CPU)
    loaded.load_state_dict(saved)
    # After a load both halves step from the loaded state: the next steps agree bit for bit.
    for m, o in ((model, opt), (twin, loaded)):
        o.zero_grad()
        backward(m, 1)
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    assert loaded._muon.state is loaded.state and loaded._adamw.param_groups[0] is loaded.param_groups[1]


def test_muon_needs_block_matrices_that_train():
    model = small_model()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("transformer.h."))
    with pytest.raises(TrainingError, match="no trainable matrices"):
        build_optimizer(model, TrainConfig(optimizer="muon"), CPU)


def test_muon_leaves_lora_factors_to_adamw_and_lora_fine_tuning_refuses_it():
    from gpt2lab.finetune import FinetuneConfig
    from gpt2lab.lora import LoRAConfig, apply_lora

    model = small_model()
    apply_lora(model, LoRAConfig(rank=2))
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(True)  # one base matrix trains too
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in opt._muon.param_groups[0]["params"]] == ["transformer.h.0.mlp.c_fc.weight"]
    adamw = {names[id(p)] for g in opt._adamw.param_groups for p in g["params"]}
    assert adamw and all(n.endswith(("lora_A", "lora_B")) for n in adamw)
    with pytest.raises(ConfigError, match="LoRA trains low-rank adapters"):
        FinetuneConfig(method="lora", optimizer="muon", lr=1e-3)
    assert FinetuneConfig(method="full", optimizer="muon", lr=1e-4).optimizer == "muon"


def test_a_built_muon_adamw_takes_no_new_parameters():
    opt = build_optimizer(small_model(), TrainConfig(optimizer="muon"), CPU)
    with pytest.raises(ValueError, match="build a new one"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 4))]})


def test_the_optimizer_setting_is_checked(monkeypatch):
    with pytest.raises(ConfigError, match="adamw or muon"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="--fsdp"):
        TrainConfig(optimizer="muon", fsdp=True)
    monkeypatch.delattr(torch.optim, "Muon")  # a torch from before 2.9
    with pytest.raises(ConfigError, match=r"needs torch 2\.9 or later .* use --optimizer adamw"):
        TrainConfig(optimizer="muon")
    assert TrainConfig().optimizer == "adamw"
