import warnings

import pytest
import torch

from gpt2lab import gemv
from gpt2lab.config import preset
from gpt2lab.model import GPT
from gpt2lab.quantize import Int8Linear, prepare, quantize_rows

pytestmark = pytest.mark.skipif(gemv.kernels() is None, reason="needs AVX-512 and a C++ compiler")

WEIGHTS = [torch.float32, torch.bfloat16, torch.int8]


def weight(n, k, dtype):
    if dtype == torch.int8:
        return torch.randint(-127, 128, (n, k), dtype=torch.int8)
    return torch.randn(n, k).to(dtype)


@pytest.mark.parametrize("dtype", WEIGHTS)
@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 4), (1, 100, 37), (3, 1600, 9), (5, 48, 130), (9, 33, 7)])
def test_linear_equals_a_float64_matmul(dtype, m, k, n):
    torch.manual_seed(m * k + n)
    w, x = weight(n, k, dtype), torch.randn(m, k)
    scale, bias = torch.rand(n) + 0.5, torch.randn(n)
    want = x.double() @ (w.double() * scale.double()[:, None]).T + bias.double()
    got = gemv.linear(x, gemv.pack(w), n, k, scale, bias)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got.double(), want, atol=1e-4 * k ** 0.5, rtol=1e-5)
    plain = gemv.linear(x, gemv.pack(w), n, k)
    torch.testing.assert_close(plain.double(), x.double() @ w.double().T, atol=1e-4 * k ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("dtype", WEIGHTS)
def test_bf16_activations_come_back_in_bf16(dtype):
    """bf16 weights with bf16 activations take AVX512-BF16's dot products where the CPU has them."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 70).bfloat16(), weight(11, 70, dtype)
    bias = torch.randn(11)
    got = gemv.linear(x, gemv.pack(w), 11, 70, None, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 11)
    want = x.double() @ w.double().T + bias.double()
    torch.testing.assert_close(got.double(), want, atol=0.02 * want.abs().max().item(), rtol=0.01)


@pytest.mark.parametrize(("dtype", "xtype"), [(w, torch.float32) for w in WEIGHTS] + [(torch.bfloat16,) * 2])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(dtype, xtype, threads):
    n = max(2, torch.get_num_threads())  # at least two threads to share the work
    threads(n)
    torch.manual_seed(0)
    w, x = weight(203, 3072, dtype), (torch.randn(13, 3072) * 3).to(xtype)  # GPT-2's MLP output width
    packed = gemv.pack(w)
    for scale, bias in [(None, None), (torch.rand(203) + 0.5, torch.randn(203))]:  # int8's: both
        def run(rows, scale=scale, bias=bias):
            return gemv.linear(rows, packed, 203, 3072, scale, bias)

        whole = run(x)
        for lo, hi in [(0, 1), (5, 6), (2, 9), (4, 13)]:
            assert torch.equal(run(x[lo:hi]), whole[lo:hi])
        threads(1)
        assert torch.equal(run(x), whole)  # nor on how many threads share the work
        threads(n)


@pytest.mark.parametrize("dtype", WEIGHTS)
def test_pack_keeps_every_weight(dtype):
    w = weight(37, 100, dtype)
    packed = gemv.pack(w)
    assert packed.shape == (10, 100 * w.element_size() // 64 + 1, 4, 64 // w.element_size())
    assert torch.equal(gemv.unpack(packed, 37, 100), w)
    idx = torch.tensor([[0, 36], [5, 3]])
    assert torch.equal(gemv.rows(packed, idx, 37, 100), w[idx])


def test_int8_linear_uses_the_kernel_and_matches_its_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 50)
    q8 = Int8Linear.from_linear(linear)
    assert q8.packed and q8.scales.dtype == torch.float32
    q, scales = quantize_rows(linear.weight)
    assert torch.equal(q8.dequantized(), q.float() * scales[:, None])
    x = torch.randn(4, 96).bfloat16()
    want = x.double() @ q8.dequantized().double().T + linear.bias.double()
    torch.testing.assert_close(q8(x).double(), want, atol=0.05, rtol=0.01)  # the output is bf16


def test_without_the_kernels_int8_falls_back_to_pytorch(monkeypatch):
    torch.manual_seed(0)
    cfg = preset("gpt2-nano", vocab_size=97)
    ref = GPT(cfg).eval()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        fast = GPT(cfg)
        fast.load_state_dict(ref.state_dict())
        kernel = prepare(fast, "int8")(idx).float()
        monkeypatch.setenv("GPT2LAB_KERNELS", "0")
        gemv._kernels.cache_clear()
        try:
            slow = GPT(cfg)
            slow.load_state_dict(ref.state_dict())
            slow = prepare(slow, "int8")
            assert not slow.lm_head.packed and slow.lm_head.scales.dtype == torch.bfloat16
            torch.testing.assert_close(slow(idx).float(), kernel, atol=0.1, rtol=0.05)
        finally:
            gemv._kernels.cache_clear()


def test_a_kernel_that_cannot_be_built_warns_once_and_returns_none(monkeypatch, tmp_path):
    bad = tmp_path / "gemv.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(gemv, "SOURCE", bad)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gemv._kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built .*using PyTorch's"):
            assert gemv.kernels() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert gemv.kernels() is None  # asked again: no second build, no second warning
    finally:
        gemv._kernels.cache_clear()


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_fp32_and_bf16_modes_hold_the_tied_matrix_once_on_the_kernel(mode):
    from gpt2lab.device import native_bf16
    from gpt2lab.quantize import KernelLinear, PackedLinear, TiedEmbedding

    model = prepare(GPT(preset("gpt2-nano", vocab_size=97)), mode)
    if mode == "bf16" and not native_bf16():  # widened bf16 trails oneDNN in batches: not used there
        assert isinstance(model.lm_head, PackedLinear)
        return
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    assert all(isinstance(m, KernelLinear) and m.weight.dtype == dtype
               for m in [model.lm_head, *(b.mlp.c_fc for b in model.transformer.h)])
    assert isinstance(model.transformer.wte, TiedEmbedding) and model.transformer.wte.head[0] is model.lm_head
    idx = torch.tensor([[0, 5, 96]])
    assert torch.equal(model.transformer.wte(idx), gemv.rows(model.lm_head.weight, idx, 97, 48))


def test_bad_inputs_are_refused_not_misread():
    w = torch.randn(10, 40)
    packed = gemv.pack(w)
    with pytest.raises(RuntimeError, match="x has 39 features where the weight takes 40"):
        gemv.linear(torch.randn(2, 39), packed, 10, 40)
    with pytest.raises(RuntimeError, match="not in pack\\(\\)'s layout"):
        gemv.linear(torch.randn(2, 40).bfloat16(), packed.bfloat16(), 10, 40)  # converted after packing
    with pytest.raises(RuntimeError, match="float32 CPU tensors of 10 contiguous values"):
        gemv.linear(torch.randn(2, 40), packed, 10, 40, torch.rand(1))
    with pytest.raises(RuntimeError, match="float32 CPU tensors of 10 contiguous values"):
        gemv.linear(torch.randn(2, 40), packed, 10, 40, None, torch.randn(20)[::2])
    with pytest.raises(IndexError, match="index out of range"):
        gemv.rows(packed, torch.tensor([10]), 10, 40)  # a padding row
    with pytest.raises(IndexError, match="index out of range"):
        gemv.rows(packed, torch.tensor([-1]), 10, 40)


def test_a_killed_build_leaves_nothing_to_wait_on(tmp_path):
    """A build killed mid-way (timeout, the OOM killer) must not make later runs hang on its lock."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    code = "from gpt2lab import gemv; print(gemv.kernels() is not None)"
    first = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    assert b"compiling" in first.stderr.readline()  # it is building now
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert done.stdout.decode().strip() == "True", done.stderr.decode()
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert again.stdout.decode().strip() == "True" and b"compiling" not in again.stderr  # built once, reused
    kernels = tmp_path / "gpt2lab" / "kernels"
    assert [p.name.startswith("gemv-") for p in kernels.iterdir()] == [True]  # the killed build's folder is gone
