"""Generation on a CUDA device: the same tokens as on the CPU, and speed against transformers.

    python benchmarks/generate/gpu_check.py

Checks (asserts): greedy output of a left-padded batch on the GPU equals the CPU's token for token
(with a clear argmax margin), logprobs agree, seeded sampling repeats, the sliding window and the
repetition penalty run, bf16/int8 modes run (their CPU kernels fall back to plain matmuls). Then
times gpt2 (124M, random weights) 16 + 128 tokens greedy against transformers' generate.
"""

from __future__ import annotations

import copy
import time

import torch

from gpt2lab.config import preset
from gpt2lab.generate import Generator
from gpt2lab.model import GPT
from gpt2lab.quantize import prepare


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name())
    torch.manual_seed(0)
    cpu = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    with torch.no_grad():
        cpu.transformer.ln_f.weight.mul_(10)  # peaked: a clear argmax
    gpu = copy.deepcopy(cpu).cuda()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    opts = dict(greedy=True, max_new_tokens=40, stop_at_eot=False, top_logprobs=2)
    a = Generator(cpu, eot_id=96).generate_ids(prompts, **opts)
    b = Generator(gpu, eot_id=96).generate_ids(prompts, **opts)
    margin = min(t[0][1] - t[1][1] for c in a for t in c.top_logprobs)
    same = [x.token_ids for x in a] == [x.token_ids for x in b]
    diff = max(abs(p - q) for x, y in zip(a, b, strict=True) for p, q in zip(x.logprobs, y.logprobs, strict=True))
    print(f"greedy cpu == cuda: {same} (min margin {margin:.4f}); max logprob diff {diff:.2e}")
    assert same or margin < 1e-3
    gen = Generator(gpu, eot_id=96)
    s1 = gen.generate_ids(prompts, max_new_tokens=30, seed=3, num_samples=2, top_p=0.9, repetition_penalty=1.3)
    s2 = gen.generate_ids(prompts, max_new_tokens=30, seed=3, num_samples=2, top_p=0.9, repetition_penalty=1.3)
    assert [x.token_ids for x in s1] == [x.token_ids for x in s2]
    slid = gen.generate_ids([[1, 2, 3]], max_new_tokens=300, seed=0, slide_window=True, stop_at_eot=False)[0]
    assert len(slid.token_ids) == 300 and slid.finish_reason == "length"
    for mode in ("bf16", "int8"):
        m = prepare(copy.deepcopy(cpu).cuda(), mode)
        out = Generator(m, eot_id=96).generate_ids(prompts, **opts)
        agree = sum(p == q for x, y in zip(a, out, strict=True) for p, q in zip(x.token_ids, y.token_ids, strict=True))
        print(f"{mode} on cuda runs; greedy agreement with fp32: {agree / (3 * 40):.1%}")
    print("checks passed")
    speed()


def speed() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2lab.checkpoint import TRANSPOSED

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval().cuda()
    ours = GPT(preset("gpt2")).eval().cuda()
    sd = hf.state_dict()
    with torch.no_grad():
        for k, v in ours.state_dict().items():
            v.copy_(sd[k].t() if k.endswith(TRANSPOSED) else sd[k])
    for batch in (1, 8):
        ids = torch.randint(0, 50256, (batch, 16), device="cuda")
        gen = Generator(ours)

        def run_ours(gen=gen, ids=ids):
            return [c.token_ids for c in gen.generate_ids(ids.tolist(), greedy=True, max_new_tokens=128,
                                                          stop_at_eot=False)]

        def run_hf(ids=ids):
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=128,
                                  pad_token_id=50256, eos_token_id=None)
            return out[:, 16:].tolist()

        times = {}
        for name, fn in (("ours", run_ours), ("hf", run_hf)):
            fn()
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                tokens = fn()
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            times[name] = (batch * 128 / best, tokens)
        agree = sum(p == q for x, y in zip(times["ours"][1], times["hf"][1], strict=True)
                    for p, q in zip(x, y, strict=True)) / (batch * 128)
        print(f"cuda fp32 batch {batch}: ours {times['ours'][0]:.0f} tok/s, transformers {times['hf'][0]:.0f} tok/s "
              f"({times['ours'][0] / times['hf'][0]:.2f}x); greedy agreement {agree:.1%}")


if __name__ == "__main__":
    main()
