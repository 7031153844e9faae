import pytest
import torch
import torch.nn.functional as F

from gpt2lab import gemv
from gpt2lab.config import preset
from gpt2lab.errors import GenerationError
from gpt2lab.generate import Generator
from gpt2lab.model import GPT
from gpt2lab.quantize import Int8Linear, KernelLinear, PackedLinear, TiedEmbedding, prepare, quantize_rows


def test_quantize_rows_rounds_to_the_nearest_step_of_each_row():
    torch.manual_seed(0)
    w = torch.randn(7, 33) * torch.logspace(-3, 1, 7)[:, None]  # rows of very different sizes
    w[3] = 0  # an all-zero row must not divide by zero
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    nonzero = [r for r in range(7) if r != 3]
    assert (q[nonzero].abs().amax(1) == 127).all()  # each row's largest weight uses the full range
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()
    assert (q[3] == 0).all()


def test_int8_linear_multiplies_by_the_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    q8 = Int8Linear.from_linear(linear)
    x = torch.randn(2, 5, 48)
    want = F.linear(x, q8.dequantized(), linear.bias.detach())
    got = q8(x.bfloat16()).float()
    assert got.shape == (2, 5, 40)
    torch.testing.assert_close(got, want, atol=0.03, rtol=0.02)  # bf16 activations


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 0.02)])
def test_packed_linear_equals_plain_linear(dtype, tol):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40).to(dtype)
    packed = PackedLinear(linear.weight, linear.bias)
    x = torch.randn(3, 7, 48).to(dtype)
    torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), atol=tol, rtol=tol)
    torch.testing.assert_close(packed(x[0, :1]), F.linear(x[0, :1], linear.weight, linear.bias), atol=tol, rtol=tol)


@pytest.mark.parametrize("kernel", [True, False])
def test_packed_fp32_model_equals_the_plain_model(kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(gemv, "kernels", lambda: None)  # a machine where gemv.cpp cannot be built
    elif gemv.kernels() is None:
        pytest.skip("needs AVX-512 and a C++ compiler")
    torch.manual_seed(0)
    ref = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    packed = GPT(ref.config)
    packed.load_state_dict(ref.state_dict())
    prepare(packed, "fp32")
    if kernel:  # the head is packed once and the embedding reads its rows: no second copy
        assert isinstance(packed.lm_head, KernelLinear) and isinstance(packed.transformer.wte, TiedEmbedding)
        assert packed.transformer.wte.head[0] is packed.lm_head
        assert not any(t.shape == (97, 48) for t in [*packed.parameters(), *packed.buffers()])
    else:  # oneDNN uses fp32 weights in place: the head is the embedding's storage, not a copy.
        assert isinstance(packed.lm_head, PackedLinear)
        assert packed.lm_head.weight.data_ptr() == packed.transformer.wte.weight.data_ptr()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(packed(idx), ref(idx), atol=1e-5, rtol=1e-5)
    plain = prepare(GPT(ref.config), "fp32", pack=False)
    assert isinstance(plain.lm_head, torch.nn.Linear)


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_modes_stay_close_to_fp32(mode):
    torch.manual_seed(0)
    cfg = preset("gpt2-nano", vocab_size=211)
    ref = GPT(cfg).eval()
    with torch.no_grad():
        ref.transformer.ln_f.weight.mul_(20)  # peaked predictions, so a distortion would show
        fast = GPT(cfg)
        fast.load_state_dict(ref.state_dict())
        prepare(fast, mode)
        idx = torch.randint(0, 211, (2, 40))
        p = ref(idx).log_softmax(-1)
        q = fast(idx).float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl < 1e-3, kl  # measured: 5e-5 (bf16), 8e-5 (int8)
    assert (p.argmax(-1) == q.argmax(-1)).float().mean() > 0.9
    # And generation runs through the same Generator, with the cache in the mode's dtype.
    out = Generator(fast, eot_id=210).generate_ids([[1, 2, 3], [4]], max_new_tokens=6, seed=0)
    assert all(len(c.token_ids) == 6 or c.finish_reason == "eot" for c in out)


def test_int8_quantizes_the_tied_embedding_once():
    model = prepare(GPT(preset("gpt2-nano", vocab_size=97)), "int8")
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.transformer.wte, TiedEmbedding)
    assert model.transformer.wte.head[0] is model.lm_head
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    weights = 97 * 48 + 3 * (48 * 144 + 48 * 48 + 48 * 192 + 192 * 48)
    assert sum(m.in_features * m.out_features for m in linears) == weights
    assert len([b for b in model.buffers() if b.dtype == torch.int8]) == len(linears)  # no second copy
    biases = {id(m.bias) for m in linears}  # float32 for gpt2lab's kernel, as its scales
    assert not any(p.dtype == torch.float32 for p in model.parameters() if id(p) not in biases)


def test_unknown_mode_is_rejected():
    with pytest.raises(GenerationError, match="unknown mode 'fp8'; choose one of fp32, bf16, int8"):
        prepare(GPT(preset("gpt2-nano", vocab_size=97)), "fp8")


@pytest.mark.parametrize("first", ["fp32", "bf16", "int8"])
def test_a_prepared_model_is_not_prepared_again(first):
    model = prepare(GPT(preset("gpt2-nano", vocab_size=97)), first)
    for mode in ("fp32", "int8"):
        with pytest.raises(GenerationError, match="already prepared for a speed mode"):
            prepare(model, mode)


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_modes_work_on_weights_loaded_from_a_transformers_folder(mode, tmp_path):
    from conftest import hf_model

    from gpt2lab import load_model

    hf_model(n_layer=2, n_head=4, n_embd=32, n_ctx=64, vocab_size=257).save_pretrained(tmp_path)
    ref = load_model(tmp_path)  # Conv1D weights arrive as transposed (non-contiguous) views
    fresh = GPT(ref.config)
    fresh.load_state_dict(ref.state_dict())  # the same weights, contiguous
    idx = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        got = prepare(load_model(tmp_path), mode)(idx)
        want = prepare(fresh, mode)(idx)
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8"])
def test_a_packed_model_cannot_be_compiled_but_an_unpacked_one_can_be_set_up(mode, tmp_path):
    from gpt2lab import quantize, save_checkpoint

    model = prepare(GPT(preset("gpt2-nano", vocab_size=97)), mode)
    if any(isinstance(m, PackedLinear | KernelLinear) or getattr(m, "packed", False) for m in model.modules()):
        with pytest.raises(GenerationError, match="pack=False"):
            Generator(model, eot_id=96, compile=True)
    Generator(prepare(GPT(preset("gpt2-nano", vocab_size=97)), mode, pack=False), eot_id=96, compile=True)
    save_checkpoint(GPT(preset("gpt2-nano", vocab_size=97)), tmp_path / "ckpt")
    Generator(quantize.load(tmp_path / "ckpt", mode, pack=False), eot_id=96, compile=True)  # what --compile loads


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("fmt", ["gpt2lab", "hf"])
def test_load_converts_tensor_by_tensor_to_the_model_prepare_gives(mode, fmt, tmp_path, monkeypatch):
    """quantize.load is prepare(load_model(...)) bit for bit, but holds each weight once: in bf16 and
    int8 each float32 tensor it reads is gone before the next is read, and in fp32 every weight is
    contiguous memory of its own (an HF folder's transposed weights are not kept beside a copy)."""
    import gc
    import weakref

    from gpt2lab import checkpoint, export_hf, load_model, quantize, save_checkpoint

    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", vocab_size=301))
    (save_checkpoint if fmt == "gpt2lab" else export_hf)(model, tmp_path / "ckpt")
    alive: list[weakref.ref] = []
    read: list[str] = []
    real = checkpoint.read_tensors

    def spy(*args, **kwargs):
        for name, t in real(*args, **kwargs):
            gc.collect()
            if mode != "fp32":
                assert all(ref() is None for ref in alive), f"a float32 tensor was still held when {name} was read"
            assert t.dtype == torch.float32 and t.untyped_storage().nbytes() == t.numel() * 4  # its own memory
            read.append(name)
            if not (mode == "int8" and name.endswith(".bias")):  # int8 keeps Linear biases in float32
                alive.append(weakref.ref(t))
            yield name, t

    monkeypatch.setattr(checkpoint, "read_tensors", spy)
    loaded = quantize.load(tmp_path / "ckpt", mode)
    # every tensor read once; the tied head is not stored
    assert len(read) == len(set(read)) == len(model.state_dict()) - 1
    held = [*loaded.parameters(), *loaded.buffers()]
    assert all(t.is_contiguous() or t.is_mkldnn for t in held)
    if mode == "fp32":
        assert all(t.untyped_storage().nbytes() == t.numel() * 4 for t in held)
    monkeypatch.undo()
    idx = torch.randint(0, 301, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx), prepare(load_model(tmp_path / "ckpt"), mode)(idx))


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8"])
def test_a_prepared_model_scores_continuations_like_the_plain_one(mode):
    """evaluate's scoring runs on a model in any speed mode (the tied embedding may be the head's rows)."""
    from gpt2lab.evaluate import score_continuations

    torch.manual_seed(0)
    ref = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    fast = GPT(ref.config)
    fast.load_state_dict(ref.state_dict())
    prepare(fast, mode)
    requests = [([1, 2, 3], [4, 5]), ([7], [8, 9, 10])]
    want = [s.logprob for s in score_continuations(ref, requests)]
    got = [s.logprob for s in score_continuations(fast, requests)]
    assert got == pytest.approx(want, abs=0.05)
