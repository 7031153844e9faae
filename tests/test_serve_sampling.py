"""The engine's batched sampler against generate.py's filters, one row at a time."""

from __future__ import annotations

import torch

from gpt2lab.generate import apply_temperature, top_k_filter, top_p_filter
from gpt2lab.serve.engine import Sampling, Seq
from gpt2lab.serve.sampling import choose


def seqs(samplings: list[Sampling]) -> list[Seq]:
    return [Seq([1, 2, 3], s, lambda event: None) for s in samplings]


def allowed(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The probabilities generate.py's steps give each token, for one row."""
    x = apply_temperature(logits - logits.max(), s.temperature)[None]
    if s.top_k:
        x = top_k_filter(x, s.top_k)
    return top_p_filter(x, s.top_p).softmax(-1)[0]


def test_every_draw_is_one_generate_would_allow_and_all_of_them_occur():
    torch.manual_seed(0)
    logits = torch.randn(4, 60) * 3
    samplings = [Sampling(temperature=1.0, top_k=5, seed=1), Sampling(temperature=0.7, top_p=0.6, seed=2),
                 Sampling(temperature=1.3, top_k=8, top_p=0.8, seed=3), Sampling(temperature=1.0, seed=4)]
    batch = seqs(samplings)
    seen: list[set[int]] = [set() for _ in batch]
    for _ in range(400):
        for r, (token, _, _) in enumerate(choose(batch, logits)):
            seen[r].add(token)
    for r, s in enumerate(samplings):
        probs = allowed(logits[r], s)
        assert all(probs[t] > 0 for t in seen[r]), r  # never a token generate's filters remove
        likely = set(torch.nonzero(probs > 0.03).flatten().tolist())
        assert likely <= seen[r], r  # and each likely one occurs in 400 draws


def test_greedy_rows_logprobs_and_the_top_alternatives():
    logits = torch.randn(3, 50)
    batch = seqs([Sampling(temperature=0, logprobs=3), Sampling(temperature=1.0, logprobs=0, seed=5),
                  Sampling(temperature=0)])
    out = choose(batch, logits)
    logp = logits.log_softmax(-1)
    token, lp, top = out[0]
    assert token == int(logits[0].argmax()) and lp == top[0][1]
    assert [t for t, _ in top] == logp[0].topk(3).indices.tolist()
    assert out[1][2] == [] and out[1][1] == logp[1, out[1][0]].item()
    assert out[2] == (int(logits[2].argmax()), None, None)


def test_a_seeded_row_draws_the_same_whatever_its_neighbours():
    logits = torch.randn(5, 40)
    alone = [choose(seqs([Sampling(temperature=1.0, seed=9)]), logits[2:3])[0][0] for _ in range(1)]
    mixed = choose(seqs([Sampling(temperature=0.5, seed=1), Sampling(temperature=0),
                         Sampling(temperature=1.0, seed=9), Sampling(temperature=1.0, top_k=3, seed=2),
                         Sampling(temperature=2.0, top_p=0.5)]), logits)
    assert mixed[2][0] == alone[0]


def test_bias_and_penalties_move_the_choice():
    logits = torch.full((1, 30), 0.5)
    logits[0, 7] = 1.0
    (token, _, _), = choose(seqs([Sampling(temperature=0, logit_bias=((3, 5.0),))]), logits)
    assert token == 3
    seq = seqs([Sampling(temperature=0, presence_penalty=2.0)])[0]
    seq.counts[7] += 1
    (token, _, _), = choose([seq], logits)
    assert token != 7
    seq = seqs([Sampling(temperature=0, repetition_penalty=100.0)])[0]
    seq.generated.append(7)
    (token, _, _), = choose([seq], logits)
    assert token != 7
