"""The next token for every running sequence at once, each by its own rules.

The steps are generate.py's, in its order (bias and penalties, temperature, top-k, top-p), done on
the whole batch: one argmax for the greedy rows, one sort for the rows that filter, and a draw for
each sampled row from its own generator (inverse CDF), so a seeded sequence draws the same
numbers whatever else runs beside it. Logprobs are the model's own: a log_softmax of the raw
logits, the chosen token's taken from the same tensor as the top alternatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..generate import apply_repetition_penalty

if TYPE_CHECKING:
    from .engine import Seq, Top


def choose(seqs: Sequence[Seq], logits: torch.Tensor) -> list[tuple[int, float | None, Top | None]]:
    """(token, logprob, top alternatives) for each sequence, from its last logits (one row of (B, V))."""
    raw = logits.float()
    x = raw.clone() if any(_adjusted(s) for s in seqs) else raw
    for row, seq in zip(x, seqs, strict=True):
        if _adjusted(seq):
            _adjust(row, seq)
    tokens = torch.empty(len(seqs), dtype=torch.long, device=raw.device)
    greedy = [r for r, s in enumerate(seqs) if s.sampling.temperature == 0]
    drawn = [r for r, s in enumerate(seqs) if s.sampling.temperature > 0]
    if greedy:
        tokens[greedy] = x[greedy].argmax(-1)
    if drawn:
        tokens[drawn] = _draw(x[drawn], [seqs[r] for r in drawn])
    out: list[tuple[int, float | None, Top | None]] = [(t, None, None) for t in tokens.tolist()]
    scored = [r for r, s in enumerate(seqs) if s.sampling.logprobs is not None]
    if scored:
        logp = raw[scored].log_softmax(-1)
        chosen = logp.gather(1, tokens[scored][:, None])[:, 0].tolist()
        n = min(max(seqs[r].sampling.logprobs or 0 for r in scored), logp.size(-1))
        values, ids = torch.topk(logp, n, dim=-1) if n else (None, None)
        for j, r in enumerate(scored):
            k = seqs[r].sampling.logprobs or 0
            top = list(zip(ids[j, :k].tolist(), values[j, :k].tolist(), strict=True)) if k else []
            out[r] = (out[r][0], chosen[j], top)
    return out


def _adjusted(seq: Seq) -> bool:
    s = seq.sampling
    return bool(s.logit_bias) or s.repetition_penalty != 1.0 or (
        bool(s.presence_penalty or s.frequency_penalty) and bool(seq.counts))


def _adjust(x: torch.Tensor, seq: Seq) -> None:
    """logit_bias, then OpenAI's presence and frequency penalties over the generated tokens, then
    HF's repetition penalty over prompt and generated tokens; in place on one row (V,)."""
    s = seq.sampling
    if s.logit_bias:
        ids, bias = zip(*s.logit_bias, strict=True)
        x[list(ids)] += torch.tensor(bias)
    if (s.presence_penalty or s.frequency_penalty) and seq.counts:
        ids, counts = zip(*seq.counts.items(), strict=True)
        x[list(ids)] -= torch.tensor(counts, dtype=torch.float32) * s.frequency_penalty + s.presence_penalty
    if s.repetition_penalty != 1.0:
        seen = torch.zeros_like(x, dtype=torch.bool)
        seen[seq.prompt + seq.generated] = True
        x.copy_(apply_repetition_penalty(x[None], seen[None], s.repetition_penalty)[0])


def _draw(x: torch.Tensor, seqs: Sequence[Seq]) -> torch.Tensor:
    """One sampled token per row of x (R, V): temperature, then top-k, then top-p, then a draw. Which
    way a row is drawn depends on its own settings only, so its token does not depend on its neighbours."""
    sampling = [s.sampling for s in seqs]
    temperature = torch.tensor([s.temperature for s in sampling], dtype=torch.float64)[:, None]
    # Shifted so each row's best logit is 0, divided in float64: a tiny temperature stays the argmax.
    x = ((x.double() - x.double().amax(-1, keepdim=True)) / temperature).float()
    u = torch.tensor([torch.rand((), generator=s.generator, dtype=torch.float64).item() for s in seqs],
                     dtype=torch.float64)[:, None]
    tokens = torch.empty(len(seqs), dtype=torch.long, device=x.device)
    V = x.size(-1)
    plain = [r for r, s in enumerate(sampling) if s.top_k <= 0 and s.top_p >= 1.0]
    filtered = [r for r, s in enumerate(sampling) if not (s.top_k <= 0 and s.top_p >= 1.0)]
    if plain:
        tokens[plain] = _invert(x[plain].softmax(-1), u[plain])
    if filtered:
        ordered, order = x[filtered].sort(-1, descending=True)
        k = torch.tensor([s.top_k if 0 < s.top_k < V else V for s in (sampling[r] for r in filtered)])[:, None]
        ordered = ordered.masked_fill(ordered < ordered.gather(1, k - 1), float("-inf"))  # ties with the k-th stay
        probs = ordered.softmax(-1)
        top_p = torch.tensor([sampling[r].top_p for r in filtered])[:, None]
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # the first token always stays
        tokens[filtered] = order.gather(1, _invert(probs, u[filtered])[:, None])[:, 0]
    return tokens


def _invert(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The index where each row's cumulative probability first exceeds u times its total."""
    cdf = probs.double().cumsum(-1)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    return index.clamp(max=probs.size(-1) - 1)
