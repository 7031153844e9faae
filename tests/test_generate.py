import json
import math

import pytest
import torch
from conftest import ODD_CONFIGS, hf_model

from gpt2lab import load_model
from gpt2lab.config import preset
from gpt2lab.errors import GenerationError, GPT2LabError
from gpt2lab.generate import (
    GenerationConfig,
    Generator,
    StopText,
    apply_repetition_penalty,
    apply_temperature,
    next_tokens,
    top_k_filter,
    top_p_filter,
)
from gpt2lab.model import GPT

# -- models with peaked next-token distributions -------------------------------------------------
# Random weights give nearly flat distributions, where float noise could flip an argmax, and with
# the tied head a random model mostly repeats its input token. Larger block weights and positions
# make the continuation depend on the context; a larger final LayerNorm makes the argmax clear.


def peaked_hf(cfg, block=4.0, positions=10.0, head=15.0):
    hf = hf_model(**cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")):
                p.mul_(block)
        hf.transformer.wpe.weight.mul_(positions)
        hf.transformer.ln_f.weight.mul_(head)
    return hf


@pytest.fixture(scope="module", params=range(len(ODD_CONFIGS)), ids=lambda i: f"cfg{i}")
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained folder, config)."""
    torch.manual_seed(request.param)
    cfg = ODD_CONFIGS[request.param]
    hf = peaked_hf(cfg)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return hf, load_model(folder), cfg


def prompts_for(cfg, lengths=(5, 1, 9, 3)):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompts, max_new_tokens, **options):
    """transformers' greedy output for left-padded prompts: the new ids of each row."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                      min_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None, **options)
    return out[:, width:].tolist()


def greedy_margin(completions):
    """The smallest gap between the chosen and the runner-up logprob over all steps."""
    return min(top[0][1] - top[1][1] for c in completions for top in c.top_logprobs)


def test_greedy_matches_transformers_alone_and_batched(pair):
    hf, ours, cfg = pair
    prompts = prompts_for(cfg)
    n = min(12, cfg["n_ctx"] - max(map(len, prompts)))
    gen = Generator(ours)
    options = dict(greedy=True, max_new_tokens=n, stop_at_eot=False, top_logprobs=2)
    alone = [gen.generate_ids([p], **options)[0] for p in prompts]
    batched = gen.generate_ids(prompts, **options)
    assert greedy_margin(alone + batched) > 1e-3  # argmax ties cannot explain a (non-)match
    assert sum(len(set(c.token_ids)) for c in alone) >= 3 * len(alone)  # not one token repeated
    want = [hf_greedy(hf, [p], n)[0] for p in prompts]
    assert [c.token_ids for c in alone] == want
    assert [c.token_ids for c in batched] == want
    assert hf_greedy(hf, prompts, n) == want  # transformers' own batching agrees too
    assert all(c.finish_reason == "length" and len(c.token_ids) == n for c in batched)


def test_greedy_with_repetition_penalty_matches_transformers(pair):
    hf, ours, cfg = pair
    prompts = prompts_for(cfg)
    n = min(12, cfg["n_ctx"] - max(map(len, prompts)))
    gen = Generator(ours)
    changed = 0
    for p in prompts:  # alone: transformers would also penalise the padding id in a batch
        got = gen.generate_ids([p], greedy=True, max_new_tokens=n, stop_at_eot=False, repetition_penalty=1.5)[0]
        assert got.token_ids == hf_greedy(hf, [p], n, repetition_penalty=1.5)[0]
        changed += got.token_ids != gen.generate_ids([p], greedy=True, max_new_tokens=n, stop_at_eot=False)[0].token_ids
    assert changed  # the penalty mattered somewhere


def test_logprobs_are_the_models_log_softmax(pair):
    _, ours, cfg = pair
    prompt = prompts_for(cfg)[0]
    c = Generator(ours).generate_ids([prompt], greedy=True, max_new_tokens=4, stop_at_eot=False, top_logprobs=3)[0]
    seq = torch.tensor([prompt + c.token_ids])
    logp = ours(seq).log_softmax(-1)[0, len(prompt) - 1:-1]  # (4, V): predictions for the new tokens
    want = logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=0)
    for step, top in enumerate(c.top_logprobs):
        ids, values = zip(*top, strict=True)
        assert list(ids) == logp[step].topk(3).indices.tolist()
        assert ids[0] == c.token_ids[step]  # greedy picks the most likely


def test_cached_decode_equals_uncached_forward():
    """Every step's logprobs equal a fresh full forward over prompt + tokens so far (no cache)."""
    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (7, 2, 11)]
    got = Generator(model).generate_ids(prompts, max_new_tokens=20, seed=3, stop_at_eot=False, top_logprobs=97)
    for p, c in zip(prompts, got, strict=True):
        seq = torch.tensor([p + c.token_ids])
        with torch.no_grad():
            full = model(seq).log_softmax(-1)[0, len(p) - 1:-1]  # (20, V), no cache involved
        cached = torch.tensor([[lp for _, lp in sorted(top)] for top in c.top_logprobs])
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible_and_independent_of_batching():
    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    gen = Generator(model)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    options = dict(max_new_tokens=16, temperature=1.3, top_k=50, top_p=0.95, num_samples=2, stop_at_eot=False)
    a = gen.generate_ids(prompts, seed=7, **options)
    b = gen.generate_ids(prompts, seed=7, **options)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert a[0].token_ids != a[1].token_ids  # two samples of one prompt differ
    alone = gen.generate_ids([prompts[1]], seed=7, **options)
    assert [c.token_ids for c in alone] == [c.token_ids for c in a[2:]]
    assert [c.token_ids for c in gen.generate_ids(prompts, seed=8, **options)] != [c.token_ids for c in a]
    assert [(c.prompt_index, c.sample_index) for c in a] == [(0, 0), (0, 1), (1, 0), (1, 1)]


# -- the sampling steps, against small distributions computed by hand ---------------------------


def test_top_k_keeps_the_k_largest_and_their_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 2.0]])
    inf = -math.inf
    assert top_k_filter(logits, 1).tolist() == [[inf, 3.0, inf, inf, inf]]
    assert top_k_filter(logits, 2).tolist() == [[inf, 3.0, 2.0, inf, 2.0]]  # the tie with the 2nd stays
    assert top_k_filter(logits, 4).tolist() == [[1.0, 3.0, 2.0, inf, 2.0]]
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [False, True, True, False]  # 0.5 + 0.25
    assert kept(0.75) == [False, True, True, False]
    assert kept(0.8) == [False, True, True, True]  # 0.5 + 0.25 + 0.15 = 0.9
    assert kept(0.01) == [False, True, False, False]  # always at least one
    assert kept(1.0) == [True] * 4
    # Kept logits are untouched (the renormalisation happens in the softmax that follows).
    out = top_p_filter(logits, 0.6)
    torch.testing.assert_close(out.softmax(-1), torch.tensor([[0, 0.5 / 0.75, 0.25 / 0.75, 0]]))


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[math.log(0.2), math.log(0.8)]])
    # softmax(log p / T) is p^(1/T) renormalised: T = 0.5 squares the probabilities.
    torch.testing.assert_close(apply_temperature(logits, 0.5).softmax(-1), torch.tensor([[0.04, 0.64]]) / 0.68)
    torch.testing.assert_close(apply_temperature(logits, 1e6).softmax(-1), torch.tensor([[0.5, 0.5]]), atol=1e-5,
                               rtol=0)


def test_repetition_penalty_has_hfs_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    # Seen tokens: positive logits divided, negative ones multiplied; unseen ones untouched.
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_filters_agree_with_transformers_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    ids = torch.randint(0, 300, (4, 12))
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter(1, ids, True)
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.7),
                               RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone()))
    torch.testing.assert_close(apply_temperature(logits, 0.7), TemperatureLogitsWarper(0.7)(ids, logits.clone()))
    assert torch.equal(top_k_filter(logits, 17), TopKLogitsWarper(17)(ids, logits.clone()))
    for p in (0.3, 0.9, 0.99):
        assert torch.equal(torch.isfinite(top_p_filter(logits, p)),
                           torch.isfinite(TopPLogitsWarper(p)(ids, logits.clone())))


def test_next_tokens_applies_the_steps_in_order():
    logits = torch.tensor([[3.0, 2.9, -5.0, 0.0]])
    seen = torch.tensor([[True, False, False, False]])
    greedy = GenerationConfig(greedy=True, repetition_penalty=1.5)
    assert next_tokens(logits, seen, greedy, [None]).tolist() == [1]  # 3.0 / 1.5 = 2.0 < 2.9
    assert next_tokens(logits, seen, GenerationConfig(temperature=0), [None]).tolist() == [0]  # no penalty set
    g = torch.Generator().manual_seed(0)
    one = GenerationConfig(top_k=1, temperature=5.0)
    assert {next_tokens(logits, None, one, [g]).item() for _ in range(20)} == {0}


# -- bad parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be a non-negative integer"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(num_samples=0), "num_samples must be a positive integer"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(temperature=float("inf")), "temperature must be >= 0 and finite"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be > 0 and finite"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be > 0 and finite"),
    (dict(top_k=1.5), "top_k must be a non-negative integer"),
    (dict(top_logprobs=-1), "top_logprobs must be a non-negative integer"),
    (dict(stop=("",)), "stop strings must be non-empty"),
    (dict(stop=("a\ud800",)), "holds a lone surrogate"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=-1), r"seed must be an integer from 0 to 18446744073709551615 \(2\*\*64 - num_samples"),
    (dict(seed=10**23), "seed must be an integer from 0 to 18446744073709551615"),
    (dict(seed=2**64), "seed must be an integer from 0 to 18446744073709551615"),
    (dict(seed=2**64 - 2, num_samples=3), "seed must be an integer from 0 to 18446744073709551613"),
])
def test_bad_parameters_are_rejected_with_one_line(options, message):
    with pytest.raises(GenerationError, match=message) as e:
        GenerationConfig(**options)
    assert isinstance(e.value, GPT2LabError) and "\n" not in str(e.value)


def test_the_largest_seeds_work_and_match_the_same_seed_alone():
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    gen = Generator(model, eot_id=96)
    options = dict(max_new_tokens=5, stop_at_eot=False)
    top = gen.generate_ids([[1, 2]], seed=2**64 - 2, num_samples=2, **options)
    assert top[1].token_ids == gen.generate_ids([[1, 2]], seed=2**64 - 1, **options)[0].token_ids
    assert len(gen.generate_ids([[1, 2]], seed=0, **options)[0].token_ids) == 5


@pytest.mark.parametrize("temperature", [1e-8, 1e-40, 1e-300, 5e-324])
def test_a_tiny_temperature_samples_the_argmax(temperature):
    logits = torch.tensor([[3.0, 2.9, -5.0, 0.0], [-80.0, 40.0, 39.5, 40.0 - 1e-5]])
    config = GenerationConfig(temperature=temperature)
    for seed in range(5):
        gens = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)]
        assert next_tokens(logits, None, config, gens).tolist() == [0, 1]
    # A whole generation: the same tokens as greedy, never a NaN probability.
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    gen = Generator(model, eot_id=96)
    options = dict(max_new_tokens=12, stop_at_eot=False, top_k=5, top_p=0.9)
    greedy = gen.generate_ids([[1, 2, 3], [4]], greedy=True, **options)
    for seed in (0, 1):
        tiny = gen.generate_ids([[1, 2, 3], [4]], temperature=temperature, seed=seed, **options)
        assert [c.token_ids for c in tiny] == [c.token_ids for c in greedy]


@pytest.mark.parametrize("penalty", [5e-324, 1e-300, 1e-30, 1e30, 1e300])
def test_an_extreme_repetition_penalty_keeps_the_logits_finite(penalty):
    logits = torch.tensor([[2.0, -2.0, 0.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, penalty)
    assert torch.isfinite(out).all() and out.dtype == logits.dtype
    assert out[0, 2] == 0 and out[0, 3:].tolist() == [1.0, -1.0]  # zero stays zero; unseen tokens untouched
    # < 1 favours seen tokens: the positive one wins; > 1 pushes them down: an unseen one wins.
    greedy = GenerationConfig(greedy=True, repetition_penalty=penalty)
    assert next_tokens(logits, seen, greedy, [None]).tolist() == ([0] if penalty < 1 else [3])
    config = GenerationConfig(repetition_penalty=penalty, temperature=0.7, top_p=0.95)
    g = torch.Generator().manual_seed(0)
    assert all(0 <= next_tokens(logits, seen, config, [g]).item() < 5 for _ in range(20))
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    out = Generator(model, eot_id=96).generate_ids([[1, 2, 3]], repetition_penalty=penalty, seed=0,
                                                   max_new_tokens=10, stop_at_eot=False)
    assert len(out[0].token_ids) == 10


def test_a_batch_too_big_for_memory_is_refused_before_it_is_built(monkeypatch):
    from gpt2lab import generate as gm

    assert gm._memory(torch.device("cpu")) > 2**28  # this machine's RAM is known
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    gen = Generator(model, eot_id=96)
    monkeypatch.setattr(gm, "_memory", lambda device: 2**20)  # a machine with 1 MiB
    with pytest.raises(GenerationError, match=r"2 prompt\(s\) x 64 sample\(s\) need about .* GiB .*more than the "
                                              r"0\.0 GiB of memory on cpu: ask for fewer samples") as e:
        gen.generate_ids([[1, 2], [3]], num_samples=64, max_new_tokens=8)
    assert "\n" not in str(e.value)
    assert len(gen.generate_ids([[1, 2]], max_new_tokens=2, stop_at_eot=False)[0].token_ids) == 2  # one row fits


def test_bad_prompts_are_rejected_with_one_line():
    model = GPT(preset("gpt2-nano", vocab_size=97, n_ctx=16)).eval()
    gen = Generator(model, eot_id=96)
    cases = [
        ([[]], "prompt 0 is empty: .*add_bos"),
        ([[1, 2], []], "prompt 1 is empty"),
        ([[1, 200]], "token id 200 outside the vocabulary 0..96"),
        ([list(range(17))], "prompt 0 has 17 tokens but the model's context is 16: .*truncate_prompt"),
        ([], "non-empty list"),
    ]
    for prompts, message in cases:
        with pytest.raises(GenerationError, match=message) as e:
            gen.generate_ids(prompts)
        assert "\n" not in str(e.value)
    with pytest.raises(GenerationError, match="stop strings need a tokenizer"):
        gen.generate_ids([[1]], stop=("x",))
    with pytest.raises(GenerationError, match="no tokenizer"):
        gen.generate("hello")
    with pytest.raises(GenerationError, match="stop_at_eot needs"):
        Generator(model).generate_ids([[1]])


def test_empty_prompt_with_bos_policy_starts_from_endoftext():
    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    gen = Generator(model, eot_id=96)
    c = gen.generate_ids([[]], add_bos=True, greedy=True, max_new_tokens=5, stop_at_eot=False)[0]
    assert c.prompt_tokens == 1
    assert c.token_ids == gen.generate_ids([[96]], greedy=True, max_new_tokens=5, stop_at_eot=False)[0].token_ids


# -- context window ------------------------------------------------------------------------------------


def test_too_long_prompt_can_keep_its_last_tokens():
    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", vocab_size=97, n_ctx=16)).eval()
    gen = Generator(model, eot_id=96)
    prompt = torch.randint(0, 96, (40,)).tolist()
    c = gen.generate_ids([prompt], truncate_prompt=True, greedy=True, max_new_tokens=4, stop_at_eot=False)[0]
    assert c.prompt_tokens == 12  # room left for the 4 new tokens
    assert c.token_ids == gen.generate_ids([prompt[-12:]], greedy=True, max_new_tokens=4,
                                           stop_at_eot=False)[0].token_ids
    assert c.finish_reason == "length"


def test_generation_stops_at_the_context_window_with_a_reason():
    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", vocab_size=97, n_ctx=16)).eval()
    gen = Generator(model, eot_id=96)
    c = gen.generate_ids([[1, 2, 3, 4, 5, 6]], max_new_tokens=50, stop_at_eot=False, seed=0)[0]
    # 6 prompt tokens + 10 new ones fill the window; the 11th is predicted from the last position.
    assert (len(c.token_ids), c.finish_reason) == (11, "context")
    batch = gen.generate_ids([[1, 2, 3, 4, 5, 6], [1, 2]], max_new_tokens=50, stop_at_eot=False, seed=0)
    assert [len(x.token_ids) for x in batch] == [11, 15]  # each row has its own window
    assert batch[0].token_ids == c.token_ids


def test_sliding_window_goes_on_past_the_context():
    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", vocab_size=97, n_ctx=16)).eval()
    gen = Generator(model, eot_id=96)
    prompt = [1, 2, 3, 4, 5, 6]
    c = gen.generate_ids([prompt], greedy=True, max_new_tokens=40, stop_at_eot=False, slide_window=True)[0]
    assert (len(c.token_ids), c.finish_reason) == (40, "length")
    first = gen.generate_ids([prompt], greedy=True, max_new_tokens=11, stop_at_eot=False)[0]
    assert c.token_ids[:11] == first.token_ids
    # After the slide the model reads the last 12 tokens (3/4 of 16) from position 0.
    seq = prompt + c.token_ids[:11]
    again = gen.generate_ids([seq[-12:]], greedy=True, max_new_tokens=1, stop_at_eot=False)[0]
    assert c.token_ids[11] == again.token_ids[0]


# -- end of text ----------------------------------------------------------------------------------------


def test_stops_at_endoftext_by_default_and_leaves_it_out():
    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    free = Generator(model, eot_id=96).generate_ids([[1, 2, 3]], greedy=True, max_new_tokens=8, stop_at_eot=False)
    eot = free[0].token_ids[3]  # pretend the 4th greedy token is <|endoftext|>
    gen = Generator(model, eot_id=eot)
    stopped = gen.generate_ids([[1, 2, 3]], greedy=True, max_new_tokens=8)[0]
    first = free[0].token_ids.index(eot)
    assert stopped.token_ids == free[0].token_ids[:first]
    assert stopped.finish_reason == "eot"


# -- text: stop strings and streaming -------------------------------------------------------------------


class ByteTokenizer:
    """Ids 0..255 are bytes; 256 is <|endoftext|>. Multi-byte characters span several tokens."""

    eot_id = 256
    vocab_size = 257

    def encode(self, text, allowed_special=frozenset()):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def stream_decoder(self):
        import codecs

        class Decoder:
            def __init__(self):
                self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

            def add(self, ids):
                return self.utf8.decode(bytes(i for i in ids if i < 256))

            def flush(self):
                return self.utf8.decode(b"", final=True)

        return Decoder()


def feed(stops, pieces):
    tok = ByteTokenizer()
    st = StopText(tok.stream_decoder(), stops)
    out = []
    for piece in pieces:
        for b in piece.encode():
            out.append(st.add(b))
            if st.stopped:
                return out, st
    out.append(st.flush())
    return out, st


def test_stop_string_spanning_tokens_is_found_and_left_out():
    out, st = feed(["END"], ["abc E", "N", "D more"])
    assert "".join(out) == "abc " and st.stopped and st.stop_at == 4
    # Held-back text that turns out not to be a stop string is released.
    out, st = feed(["END"], ["a EN x"])
    assert "".join(out) == "a EN x" and not st.stopped
    assert out[2] == "" and out[3] == ""  # "E" and "N" were held back until " " settled them
    out, st = feed(["\n\n", "###"], ["one\ntwo##x\n\nthree"])
    assert "".join(out) == "one\ntwo##x"


def test_stop_string_inside_a_multibyte_character_stream():
    out, st = feed(["é!"], ["caf", "é", "!", "tail"])
    assert "".join(out) == "caf"
    assert all("\ufffd" not in piece for piece in out)


def test_streaming_never_splits_a_character_and_joins_to_the_text():
    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", vocab_size=257)).eval()
    gen = Generator(model, ByteTokenizer())
    # Random weights over a byte vocabulary: plenty of multi-byte starts and invalid sequences.
    for seed in range(3):
        events = list(gen.stream("héllo wörld", max_new_tokens=40, seed=seed, stop_at_eot=False))
        pieces = [e.text for e in events]
        completion = gen.generate("héllo wörld", max_new_tokens=40, seed=seed, stop_at_eot=False)[0]
        assert "".join(pieces) == completion.text == ByteTokenizer().decode(completion.token_ids)
        for piece in pieces[:-1]:
            piece.encode("utf-8")  # whole characters only (a lone surrogate would raise)
        assert events[-1].finish_reason == "length"
        assert [e.token_id for e in events] == completion.token_ids


def test_generation_stops_at_a_stop_string_spanning_tokens():
    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", vocab_size=257)).eval()
    gen = Generator(model, ByteTokenizer())
    options = dict(seed=1, temperature=0.7, max_new_tokens=40, stop_at_eot=False)
    free = gen.generate("go", **options)[0]
    text = free.text
    # Three ASCII characters (three byte tokens) from inside the continuation.
    start = next(i for i in range(4, len(text)) if text[i:i + 3].isascii() and len(text[i:i + 3]) == 3)
    stop = text[start:start + 3]
    got = gen.generate("go", stop=(stop,), **options)[0]
    assert got.finish_reason == "stop"
    assert got.text == text[:text.index(stop)]
    assert stop not in got.text
    assert ByteTokenizer().decode(got.token_ids) == got.text  # the stop string's tokens are left out
    n = len(got.token_ids)
    assert got.token_ids == free.token_ids[:n] and len(got.logprobs) == n
    assert free.token_ids[n:n + 3] == list(stop.encode())  # the next three tokens are the stop string
    streamed = "".join(e.text for e in gen.stream("go", stop=(stop,), **options))
    assert streamed == got.text


# -- GPT-2's tokenizer and the command line ---------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small random model with GPT-2's vocabulary, saved with its tokenizer."""
    from gpt2lab import save_checkpoint
    from gpt2lab.tokenizer import Tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "ck"
    save_checkpoint(GPT(preset("gpt2-nano", vocab_size=50257)), path, tokenizer=Tokenizer.gpt2())
    return path


def test_real_tokenizer_streams_whole_characters_only(checkpoint):
    gen = Generator.load(checkpoint)
    tok = gen.tokenizer
    ids = tok.encode("a 😀 é 中文")
    assert len(ids) > len("a 😀 é 中文".split())  # some characters take several tokens
    st = StopText(tok.stream_decoder(), ["中"])
    pieces = [st.add(i) for i in ids]
    assert "".join(pieces) == "a 😀 é " and st.stopped
    assert all("\ufffd" not in p for p in pieces)


def run_cli(capsys, *args):
    from gpt2lab.cli import main

    rc = main(["generate", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json_prints_one_object_per_sample(checkpoint, capsys):
    import json

    rc, out, _ = run_cli(capsys, checkpoint, "--prompt", "Hello", "Two words", "--num-samples", "2",
                         "--max-new-tokens", "6", "--seed", "3", "--json", "--no-stop-at-eot")
    assert rc == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 4
    gen = Generator.load(checkpoint)
    want = gen.generate(["Hello", "Two words"], num_samples=2, max_new_tokens=6, seed=3, stop_at_eot=False)
    for row, c in zip(rows, want, strict=True):
        assert row["token_ids"] == c.token_ids and row["text"] == c.text == gen.tokenizer.decode(c.token_ids)
        assert len(row["logprobs"]) == 6 and all(lp <= 0 for lp in row["logprobs"])
        assert row["finish_reason"] == "length"


def test_cli_stream_prints_what_the_batch_gives(checkpoint, capsys, monkeypatch):
    import io

    args = [checkpoint, "--max-new-tokens", "8", "--seed", "5", "--num-samples", "2", "--no-stop-at-eot"]
    monkeypatch.setattr("sys.stdin", io.StringIO("From stdin"))
    rc, streamed, _ = run_cli(capsys, *args, "--stream")
    assert rc == 0
    rc, batched, _ = run_cli(capsys, *args, "--prompt", "From stdin")
    assert streamed.strip() == batched.strip()
    assert streamed.count("From stdin") == 2 and "sample 1" in streamed


def test_cli_stop_takes_backslash_escapes(checkpoint, capsys):
    import json

    gen = Generator.load(checkpoint)
    free = gen.generate("x", max_new_tokens=40, seed=0, stop_at_eot=False)[0].text
    stop = free[10:12]
    escaped = stop.encode("unicode_escape").decode()  # as a user would type a newline: \n
    rc, out, _ = run_cli(capsys, checkpoint, "--prompt", "x", "--max-new-tokens", "40", "--seed", "0", "--json",
                         "--no-stop-at-eot", "--stop", escaped)
    row = json.loads(out)
    assert row["finish_reason"] == "stop" and row["text"] == free[:free.index(stop)]


def assert_one_line_error(rc, err, message):
    assert rc == 2 and err.startswith("gpt2lab: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err and message in err, err


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "x", "--temperature", "inf"], "temperature must be >= 0 and finite"),
    (["--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", "x", "--top-p", "nan"], "top_p must be in (0, 1]"),
    (["--prompt", "x", "--top-k", "-2"], "top_k must be a non-negative integer"),
    (["--prompt", "x", "--repetition-penalty", "0"], "repetition_penalty must be > 0"),
    (["--prompt", "x", "--repetition-penalty", "inf"], "repetition_penalty must be > 0 and finite"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--prompt", "x", "--num-samples", "0"], "num_samples must be a positive integer"),
    (["--prompt", "x", "--top-logprobs", "-1"], "top_logprobs must be a non-negative integer"),
    (["--prompt", "x", "--seed", str(10**23)], "seed must be an integer from 0 to 18446744073709551615"),
    (["--prompt", "x", "--seed", "-1"], "seed must be an integer from 0 to"),
    (["--prompt", "x", "--seed", str(2**64)], "seed must be an integer from 0 to"),
    (["--prompt", "x", "--seed", str(2**64 - 1), "--num-samples", "2"],
     "seed must be an integer from 0 to 18446744073709551614"),
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "x", "--prompt-file", "nope.txt"], "not both"),
])
def test_cli_errors_are_one_line(checkpoint, capsys, args, message):
    assert_one_line_error(*run_cli(capsys, checkpoint, *args)[::2], message)


@pytest.mark.parametrize("temperature", ["1e-40", "1e-300", "5e-324"])
def test_cli_tiny_temperature_gives_the_greedy_text(checkpoint, capsys, temperature):
    args = [checkpoint, "--prompt", "Hello", "--max-new-tokens", "8", "--no-stop-at-eot", "--json"]
    rc, greedy, _ = run_cli(capsys, *args, "--greedy")
    assert rc == 0
    rc, tiny, err = run_cli(capsys, *args, "--temperature", temperature, "--seed", "1")
    assert rc == 0 and "Traceback" not in err
    assert json.loads(tiny)["token_ids"] == json.loads(greedy)["token_ids"]


@pytest.mark.parametrize(("stop", "why"), [
    ("\\", "\\ at end of string"),
    ("ab\\", "\\ at end of string"),
    ("\\x4", "truncated \\xXX escape"),
    ("\\u12", "truncated \\uXXXX escape"),
    ("\\N{NO SUCH CHARACTER}", "unknown Unicode character name"),
    ("\\U00110000", "illegal Unicode character"),
    ("\\q", "invalid escape sequence '\\q'"),
])
def test_cli_a_bad_stop_escape_is_one_line_naming_the_stop(checkpoint, capsys, stop, why):
    rc, _, err = run_cli(capsys, checkpoint, "--prompt", "x", "--stop", "\\n", "--stop", stop)
    assert_one_line_error(rc, err, f"--stop {stop!r} has a bad backslash escape ({why})")


def test_stop_escapes_name_the_characters_they_stand_for(checkpoint, capsys):
    from gpt2lab.commands.generate import _unescape

    cases = {"\\n": "\n", "a\\tb": "a\tb", "\\u00e9": "é", "\\U0001F600": "😀", "\\x41": "A", "\\\\": "\\",
             "\\N{BULLET}": "•", "é中😀": "é中😀", "plain": "plain", "\\'": "'"}
    for typed, meant in cases.items():
        assert _unescape(typed) == meant
    rc, _, err = run_cli(capsys, checkpoint, "--prompt", "x", "--stop", "\\ud800")
    assert_one_line_error(rc, err, "names a lone surrogate")


def test_cli_interactive_reports_a_line_that_is_not_utf8_and_goes_on(checkpoint, capsys, monkeypatch):
    import io

    lines = b"first prompt\n\xff\xfe not text\ncaf\xc3\n\nsecond prompt\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    rc, out, err = run_cli(capsys, checkpoint, "--interactive", "--max-new-tokens", "4", "--greedy")
    assert rc == 0
    gen = Generator.load(checkpoint)
    replies = [gen.generate(p, greedy=True, max_new_tokens=4)[0].text for p in ("first prompt", "second prompt")]
    assert out == ">>> " + replies[0] + "\n>>> >>> >>> >>> " + replies[1] + "\n>>> "
    errors = [line for line in err.splitlines() if line.startswith("gpt2lab: error:")]
    assert errors == ["gpt2lab: error: input line 2 is not UTF-8 (0xff at byte 0): give UTF-8 text, "
                      "e.g. convert it with iconv -t UTF-8",
                      "gpt2lab: error: input line 3 is not UTF-8 (0xc3 at byte 3): give UTF-8 text, "
                      "e.g. convert it with iconv -t UTF-8"]
    assert "Traceback" not in err


def test_cli_prompts_that_are_not_utf8_name_their_source(checkpoint, capsys, monkeypatch, tmp_path):
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"ok line\nbad \xe9 line\n"), encoding="utf-8"))
    assert_one_line_error(*run_cli(capsys, checkpoint, "--max-new-tokens", "2")[::2],
                          "the prompt on stdin is not UTF-8 (0xe9 at byte 12, line 2)")
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"\x80abc")
    assert_one_line_error(*run_cli(capsys, checkpoint, "--prompt-file", bad)[::2],
                          f"--prompt-file {bad} is not UTF-8 (0x80 at byte 0)")
    assert_one_line_error(*run_cli(capsys, checkpoint, "--prompt-file", tmp_path)[::2],
                          f"cannot read --prompt-file {tmp_path}: Is a directory")
    # A command-line argument that is not UTF-8 reaches Python as lone surrogates (surrogateescape).
    arg = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert_one_line_error(*run_cli(capsys, checkpoint, "--prompt", "fine", arg)[::2],
                          "--prompt 1 is not UTF-8 (0xe9 at byte 3)")
    # Good text from each source still works.
    good = tmp_path / "good.txt"
    good.write_text("café 中文", encoding="utf-8")
    rc, out, _ = run_cli(capsys, checkpoint, "--prompt-file", good, "--max-new-tokens", "2", "--greedy")
    assert rc == 0 and out.startswith("café 中文")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("naïve\n".encode()), encoding="utf-8"))
    rc, out, _ = run_cli(capsys, checkpoint, "--max-new-tokens", "2", "--greedy")
    assert rc == 0 and out.startswith("naïve\n")


@pytest.mark.parametrize(("device", "message"), [
    ("banana", "unknown device 'banana': use auto, cpu, cuda or cuda:N"),
    ("cuda:99", "cuda:99"),
    ("tpu", "'tpu'"),
])
def test_cli_device_is_resolved_first_and_a_bad_one_is_one_line(checkpoint, capsys, tmp_path, device, message):
    for model in (checkpoint, tmp_path / "no-such-model"):  # refused before the model is read
        assert_one_line_error(*run_cli(capsys, model, "--prompt", "x", "--device", device)[::2], message)


def test_cli_device_cpu_generates_on_the_cpu(checkpoint, capsys):
    args = [checkpoint, "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "2", "--json", "--no-stop-at-eot"]
    rc, out, _ = run_cli(capsys, *args, "--device", "cpu")
    assert rc == 0
    gen = Generator.load(checkpoint, device="cpu")
    assert gen.model.transformer.ln_f.weight.device.type == "cpu"
    want = gen.generate("Hello", max_new_tokens=5, seed=2, stop_at_eot=False)[0]
    assert json.loads(out)["token_ids"] == want.token_ids


def test_cli_interactive_answers_each_line(checkpoint, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("first prompt\n\nsecond prompt\n"))
    rc, out, _ = run_cli(capsys, checkpoint, "--interactive", "--max-new-tokens", "4", "--greedy")
    assert rc == 0
    gen = Generator.load(checkpoint)
    replies = [gen.generate(p, greedy=True, max_new_tokens=4)[0].text for p in ("first prompt", "second prompt")]
    assert out == ">>> " + replies[0] + "\n>>> >>> " + replies[1] + "\n>>> "


@pytest.mark.parametrize("stdin", ["none", "closed"])
@pytest.mark.parametrize(("args", "message"), [
    ([], "standard input is closed, so there is no prompt to read: give --prompt TEXT or --prompt-file PATH"),
    (["--stream"], "standard input is closed, so there is no prompt to read"),
    (["--json"], "standard input is closed, so there is no prompt to read"),
    (["--interactive"], "standard input is closed, so --interactive has no prompts to read"),
], ids=["batch", "stream", "json", "interactive"])
def test_cli_closed_stdin_is_one_line_before_the_model_loads(checkpoint, capsys, monkeypatch, tmp_path, stdin,
                                                            args, message):
    import io

    # Python makes sys.stdin None when descriptor 0 is closed at start; a stream can also be closed later.
    closed = io.TextIOWrapper(io.BytesIO(b"a prompt"))
    closed.close()
    monkeypatch.setattr("sys.stdin", None if stdin == "none" else closed)
    for model in (checkpoint, tmp_path / "no-such-model"):  # refused before the model is read
        assert_one_line_error(*run_cli(capsys, model, *args)[::2], message)
    # A prompt from the command line needs no stdin.
    rc, out, _ = run_cli(capsys, checkpoint, "--prompt", "Hello", "--max-new-tokens", "2", "--greedy")
    assert rc == 0 and out.startswith("Hello")


def test_cli_a_terminal_on_stdin_is_no_prompt_before_the_model_loads(capsys, monkeypatch, tmp_path):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal("typed"))
    assert_one_line_error(*run_cli(capsys, tmp_path / "no-such-model")[::2], "no prompt: give --prompt TEXT")


def test_cli_closed_stdin_in_a_real_process(checkpoint):
    import subprocess
    import sys

    # `exec 0<&-` closes descriptor 0 itself; stdin=subprocess.DEVNULL would leave it open on /dev/null.
    for args in ([], ["--interactive"]):
        done = subprocess.run(["sh", "-c", 'exec 0<&-; exec "$0" -m gpt2lab generate "$@"', sys.executable,
                               str(checkpoint), *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("gpt2lab: error: standard input is closed") and done.stderr.count("\n") == 1
        assert done.stdout == ""


@pytest.mark.slow
def test_compiled_generation_equals_eager():
    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]  # padded: the compiled graphs take masks and positions
    options = dict(max_new_tokens=6, stop_at_eot=False, top_logprobs=1, seed=0)
    eager = Generator(model, eot_id=96).generate_ids(prompts, **options)
    compiled = Generator(model, eot_id=96, compile=True).generate_ids(prompts, **options)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    torch.testing.assert_close([c.logprobs for c in compiled], [c.logprobs for c in eager], atol=1e-4, rtol=0)


def test_generation_runs_eagerly_where_torch_compile_cannot_build_cpu_kernels(monkeypatch):
    torch.manual_seed(0)
    model = GPT(preset("gpt2-nano", vocab_size=97)).eval()
    options = dict(max_new_tokens=4, stop_at_eot=False, seed=0)
    eager = Generator(model, eot_id=96).generate_ids([[1, 2, 3]], **options)
    monkeypatch.setattr("gpt2lab.device.cpu_compiler", lambda: "no C++ compiler found")
    with pytest.warns(UserWarning, match=r"cannot build CPU kernels here \(no C\+\+ compiler found\); generation runs"):
        fallback = Generator(model, eot_id=96, compile=True)
    assert fallback._hidden == model.hidden  # not a compiled wrapper
    assert [c.token_ids for c in fallback.generate_ids([[1, 2, 3]], **options)] == [c.token_ids for c in eager]
