import pytest
import torch

from gpt2lab.config import PRESETS, GPTConfig, preset
from gpt2lab.model import GPT


@pytest.mark.parametrize(("name", "count"), [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
])
def test_preset_parameter_counts(name, count):
    assert PRESETS[name].num_params() == count
    with torch.device("meta"):
        assert GPT(PRESETS[name]).num_params() == count


def test_head_is_tied_and_init_follows_gpt2():
    torch.manual_seed(0)
    cfg = preset("gpt2-micro", vocab_size=5000, n_layer=8)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    assert proj_std == pytest.approx(0.02 / (2 * cfg.n_layer) ** 0.5, rel=0.05)
    assert all(float(b.detach().abs().max()) == 0 for n, b in model.named_parameters() if n.endswith(".bias")
               and ".ln_" not in n and "ln_f" not in n)


@pytest.mark.parametrize("bad", [dict(n_head=5), dict(n_layer=0), dict(dropout=1.0), dict(vocab_size=-1)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=32), **bad})


def test_cached_decode_equals_full_forward():
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    idx = torch.randint(0, 97, (3, 40))
    full = model(idx)
    model.setup_cache(3, 48)
    pieces = [model(idx[:, :17])]  # prefill
    for t in range(17, 40):  # then one token at a time
        pieces.append(model(idx[:, t:t + 1], start=t))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_with_cache_equals_full_forward():
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    idx = torch.randint(0, 97, (2, 30))
    full = model(idx)
    model.setup_cache(2, 30)
    got = torch.cat([model(idx[:, :10]), model(idx[:, 10:25], start=10), model(idx[:, 25:], start=25)], 1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_left_padding_with_key_mask_matches_unpadded():
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    seq = torch.randint(0, 97, (1, 9))
    pad = 4
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), seq], 1)
    key_mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)], 1)
    position_ids = (key_mask.cumsum(1) - 1).clamp(min=0)
    got = model(padded, position_ids=position_ids, key_mask=key_mask)[:, pad:]
    torch.testing.assert_close(got, model(seq), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(model(padded, position_ids=position_ids, key_mask=key_mask)).all()


def test_too_long_input_is_rejected():
    model = GPT(preset("gpt2-nano", vocab_size=97))
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_gradient_checkpointing_gives_same_gradients():
    model = GPT(preset("gpt2-nano", vocab_size=97)).train()
    idx = torch.randint(0, 97, (2, 16))

    def grads():
        model.zero_grad()
        model(idx).logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)
