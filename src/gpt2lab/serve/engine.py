"""Continuous batching: one model, one thread, many sequences.

Sequences join the running batch between decode steps and leave it when they finish, each with
its own sampling, position and stop rules. The batch lives in a KV cache of `max_batch` slots:
active sequences hold slots 0..B-1 (a finished one's slot is filled by moving the last one in),
so one decode step attends over a view of the cache, never a copy, each row masked to its own
positions. New sequences are prefilled together. A row's result does not depend on its
neighbours, to the bit (see _forward). Sampling is per sequence (its own generator when seeded).

The engine thread is the only one that touches the model. Other threads submit sequences and
cancel them; a cancelled sequence leaves the batch before the next decode step.
"""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..model import GPT
from ..stoptext import StopText
from .sampling import choose

Top = list[tuple[int, float]]
PREFILL_TOKENS = 4096  # prompt tokens prefilled in one batch (more wait for the next step)
WIDTH_STEP = 64  # a decoded token attends over its length rounded up to this (see Engine._forward)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row, (B, nh, 1, hs), over keys and values (B, nh, W, hs) where `mask`
    (B, 1, 1, W) is True, computing each row on a CPU as it would alone, to the bit.

    Two matmuls and a softmax, not F.scaled_dot_product_attention: PyTorch's flash kernel for CPU
    divides a decoding batch's work among threads by its size, and a row's result then changes in
    its last bits with the rows beside it (8 of 9 rows of a batch, measured with torch 2.13); bf16
    activations then turn that into a different greedy token now and then. As fast for one query.
    On a GPU cuBLAS picks its kernels by the batch, so there no row is promised its bits.
    """
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(q.size(-1) ** -0.5)  # (B, nh, 1, W)
    return torch.matmul(scores.masked_fill_(~mask, float("-inf")).softmax(-1), values)


@dataclass(frozen=True)
class Sampling:
    """How one sequence is generated. Logprobs reported are the model's own (a log_softmax of its
    logits), before penalties, bias and temperature: what scoring a text needs."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # HF's, over the prompt and the generated tokens
    presence_penalty: float = 0.0  # OpenAI's, over the generated tokens
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top-N alternatives with each token; None: no logprobs
    prompt_logprobs: bool = False  # also score the prompt's tokens (echo with logprobs)
    stop_at_eot: bool = True


@dataclass
class Token:
    """A generated token, released once its text is final."""

    id: int
    logprob: float | None
    top: Top | None


@dataclass
class Event:
    """What a sequence produced in one step: final text, the tokens it came from, and on the
    last event the finish reason ("stop", "length", or "cancelled" / "error" for the engine's own)."""

    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None
    prompt: list[Token] | None = None  # the prompt's tokens and logprobs, on the first event when asked
    error: str | None = None


class QueueFull(Exception):
    """More sequences are waiting than the engine accepts: try again later."""


class Seq:
    """One sequence (one choice of a request). `on_event` is called from the engine thread."""

    def __init__(self, prompt: Sequence[int], sampling: Sampling, on_event: Callable[[Event], None], *,
                 decoder: Any = None, group: object | None = None) -> None:
        self.prompt = list(prompt)
        self.sampling = sampling
        self.on_event = on_event
        self.group = group  # sequences of one group share a prompt: it is prefilled once
        self.text = StopText(decoder, sampling.stop) if decoder is not None else None
        self.generated: list[int] = []
        self.counts: collections.Counter[int] = collections.Counter()
        self.held: list[tuple[Token, int]] = []  # tokens whose text is not released yet, with its end
        self.length = 0  # tokens in the KV cache
        self.next_token: int | None = None  # sampled, not yet fed
        self.cancelled = False
        self.finished = False
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed % 2**64)  # any JSON integer is a seed

    def cancel(self) -> None:
        """Stop generating (from any thread): the sequence leaves the batch before the next step."""
        self.cancelled = True


class Engine:
    """The continuous-batching loop over `model`, in a thread of its own (start() / stop())."""

    def __init__(self, model: GPT, tokenizer: Any = None, *, max_batch: int = 64, max_waiting: int = 256,
                 eot_id: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eot_id = eot_id if eot_id is not None else getattr(tokenizer, "eot_id", None)
        self.max_batch, self.max_waiting = max_batch, max_waiting
        cfg = model.config
        self.n_ctx, self.n_head, self.head_dim = cfg.n_ctx, cfg.n_head, cfg.head_dim
        ref = model.transformer.ln_f.weight  # the activations' dtype and device (weights may be int8)
        self.device = ref.device
        self._keys: list[torch.Tensor] = []  # per layer (max_batch, nh, length, hs)
        self._values: list[torch.Tensor] = []
        self._waiting: collections.deque[Seq] = collections.deque()
        self._active: list[Seq] = []  # index = cache slot
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and metrics)

    # -- from other threads --------------------------------------------------------------

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="gpt2lab-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """End every sequence (finish_reason "cancelled") and join the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, seqs: Sequence[Seq]) -> None:
        """Queue sequences to be generated; raises QueueFull when too many are already waiting."""
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(seqs) > self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} sequences are already waiting")
            self._waiting.extend(seqs)
            self._wake.notify()

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._waiting and not self._active and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self._admit()
                    self._drop_cancelled()
                    if self._active:
                        self._step()
                except Exception as e:  # a bug must not hang every client: end them all with the error
                    self._fail_all(f"{type(e).__name__}: {e}")
        self._fail_all("the server is shutting down", reason="cancelled")

    def _fail_all(self, message: str, reason: str = "error") -> None:
        with self._wake:
            seqs, self._waiting = [*self._active, *self._waiting], collections.deque()
        self._active = []
        for seq in seqs:
            if not seq.finished:
                seq.finished = True
                try:
                    seq.on_event(Event(finish_reason=reason, error=message))
                except Exception:  # a listener already gone (its event loop closed): nothing to tell
                    pass

    def _admit(self) -> None:
        """Move waiting sequences into free slots: their prompts prefilled together (a group's once),
        their first tokens chosen."""
        new: list[Seq] = []
        budget = PREFILL_TOKENS
        while len(self._active) + len(new) < self.max_batch:
            with self._wake:
                if not self._waiting or (new and len(self._waiting[0].prompt) > budget):
                    break
                seq = self._waiting.popleft()
            if seq.cancelled:
                seq.finished = True
                continue
            new.append(seq)
            budget -= len(seq.prompt)
        if not new:
            return
        try:
            self._prefill(new)
        except Exception as e:  # these sequences fail (e.g. out of memory); the running batch goes on
            self._active = [s for s in self._active if s not in new]
            for seq in new:
                if not seq.finished:
                    seq.finished = True
                    seq.on_event(Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))
        self._compact()

    def _prefill(self, new: list[Seq]) -> None:
        """Run the new sequences' prompts through the model as one right-padded batch (causal attention:
        padding comes after every real token, so no real token sees it) into their slots."""
        first = len(self._active)
        self._active += new
        for seq in new:
            seq.length = len(seq.prompt)
        self._reserve(max(len(s.prompt) + s.sampling.max_tokens for s in new))
        leaders: dict[object, Seq] = {}  # a group's first sequence is prefilled; the others copy its cache
        rows = []
        for seq in new:
            if seq.group is None or seq.group not in leaders:
                rows.append(seq)
                if seq.group is not None:
                    leaders[seq.group] = seq
        width = max(len(s.prompt) for s in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for r, seq in enumerate(rows):
            ids[r, :len(seq.prompt)] = torch.tensor(seq.prompt)
        slots = [self._active.index(seq) for seq in rows]
        positions = torch.arange(width, device=self.device).expand(len(rows), width)
        hidden = self._forward(ids.to(self.device), positions, slots=slots,
                               lengths=[len(seq.prompt) for seq in rows])  # (R, W, C)
        last = torch.stack([hidden[r, len(seq.prompt) - 1] for r, seq in enumerate(rows)])
        logits = {id(seq): row for seq, row in zip(rows, self.model.lm_head(last), strict=True)}
        prompts = {id(seq): self._score_prompt(seq, hidden[r]) for r, seq in enumerate(rows)}
        for slot, seq in enumerate(new, start=first):
            leader = leaders.get(seq.group, seq)
            if leader is not seq:
                source, n = self._active.index(leader), len(seq.prompt)
                for keys, values in zip(self._keys, self._values, strict=True):
                    keys[slot, :, :n], values[slot, :, :n] = keys[source, :, :n], values[source, :, :n]
        starting = [seq for seq in new if seq.sampling.max_tokens > 0]
        for seq in new:
            if seq.sampling.max_tokens == 0:
                self._finish(seq, "length", Event(prompt=prompts[id(leaders.get(seq.group, seq))]))
        if starting:
            rows_logits = torch.stack([logits[id(leaders.get(s.group, s))]
                                       for s in starting])
            for seq, choice in zip(starting, choose(starting, rows_logits), strict=True):
                self._emit(seq, choice, prompts[id(leaders.get(seq.group, seq))])

    def _score_prompt(self, seq: Seq, hidden: torch.Tensor) -> list[Token] | None:
        """The prompt's tokens with their logprobs (echo with logprobs): position i predicts token i + 1."""
        if not seq.sampling.prompt_logprobs:
            return None
        T = len(seq.prompt)
        logp = self.model.lm_head(hidden[:T - 1]).float().log_softmax(-1)  # (T - 1, V)
        chosen = logp.gather(1, torch.tensor(seq.prompt[1:], device=logp.device)[:, None])[:, 0].tolist()
        n = seq.sampling.logprobs or 0
        values, ids = torch.topk(logp, min(n, logp.size(-1)), dim=-1) if n else (None, None)
        prompt = [Token(seq.prompt[0], None, None)]
        for i, tok in enumerate(seq.prompt[1:]):
            top = list(zip(ids[i].tolist(), values[i].tolist(), strict=True)) if n else []
            prompt.append(Token(tok, chosen[i], top))
        return prompt

    def _step(self) -> None:
        """One decode step for every active sequence."""
        tokens = torch.tensor([[s.next_token] for s in self._active], device=self.device)  # (B, 1)
        positions = torch.tensor([[s.length] for s in self._active], device=self.device)  # (B, 1)
        self._reserve(max(s.length for s in self._active) + 1)
        logits = self.model.lm_head(self._forward(tokens, positions)[:, -1])  # (B, V)
        self.steps += 1
        running = list(self._active)
        for seq in running:
            seq.length += 1
        for seq, choice in zip(running, choose(running, logits), strict=True):
            if not seq.finished:
                self._emit(seq, choice)
        self._compact()

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, *, slots: list[int] | None = None,
                 lengths: list[int] | None = None) -> torch.Tensor:
        """Hidden states (B, T, C) for `ids` at `positions`, reading and writing the KV cache: prompts
        of `lengths` into `slots`, or one new token for each of the first B slots.

        On a CPU, batching must not change a row's result, to the bit: the linear layers compute each
        row alone whatever the batch (gemv.py's kernel; see the serving guide where it cannot run),
        and a row's attention depends only on its own length: a prompt attends alone, and a decoded
        token attends over its own length rounded up to WIDTH_STEP, masked, beside only the rows of
        that width, through decode_attention. (Masked up to the longest neighbour, a row would round
        differently with its neighbours' lengths; in low precision one last bit is enough to change a
        greedy token.)"""
        tr = self.model.transformer
        B, T = ids.shape
        x = tr.wte(ids) + tr.wpe(positions)  # (B, T, C)
        C = x.size(-1)
        spans = [int(p) + 1 for p in positions[:, 0]] if slots is None else lengths
        assert spans is not None
        rows = torch.arange(B, device=self.device)
        groups = self._width_groups(spans) if slots is None else []
        for layer, block in enumerate(tr.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).float().split(C, dim=2)
            q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            keys, values = self._keys[layer], self._values[layer]
            if slots is not None:  # prompts: causal attention within each one
                y = torch.zeros_like(q)  # padding's rows stay finite: their keys are cached, if never read
                for r, (slot, n) in enumerate(zip(slots, spans, strict=True)):
                    keys[slot, :, :T], values[slot, :, :T] = k[r], v[r]
                    y[r, :, :n] = F.scaled_dot_product_attention(q[r:r + 1, :, :n], k[r:r + 1, :, :n],
                                                                 v[r:r + 1, :, :n], is_causal=n > 1)[0]
            else:  # one token per row, after that row's cached positions
                keys[rows, :, positions[:, 0]], values[rows, :, positions[:, 0]] = k[:, :, 0], v[:, :, 0]
                y = torch.empty_like(q)  # every row is written by its width's group
                for width, members, mask in groups:
                    if members is None:  # every row in one width: a view of the cache
                        y = decode_attention(q, keys[:B, :, :width], values[:B, :, :width], mask)
                    else:
                        y[members] = decode_attention(q[members], keys[members, :, :width],
                                                      values[members, :, :width], mask)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, C).to(x.dtype))
            x = x + block.mlp(block.ln_2(x))
        return tr.ln_f(x)

    def _width_groups(self, spans: list[int]) -> list[tuple[int, torch.Tensor | None, torch.Tensor]]:
        """(width, rows or None for all, mask) for each attention width among the rows' lengths."""
        widths: dict[int, list[int]] = {}
        for r, n in enumerate(spans):
            widths.setdefault(min(-(-n // WIDTH_STEP) * WIDTH_STEP, self._keys[0].size(2)), []).append(r)
        groups = []
        for width, members in widths.items():
            lengths = torch.tensor([spans[r] for r in members], device=self.device)
            mask = (torch.arange(width, device=self.device)[None] < lengths[:, None])[:, None, None, :]  # (m, 1, 1, W)
            whole = len(widths) == 1
            groups.append((width, None if whole else torch.tensor(members, device=self.device), mask))
        return groups

    def _reserve(self, length: int) -> None:
        """A KV cache with at least `length` positions (up to n_ctx) for max_batch slots; it grows by doubling."""
        length = min(max(length, 1), self.n_ctx)
        have = self._keys[0].size(2) if self._keys else 0
        if have >= length:
            return
        new = min(self.n_ctx, -(-max(length, 2 * have) // WIDTH_STEP) * WIDTH_STEP)  # whole widths
        shape = (self.max_batch, self.n_head, new, self.head_dim)
        keys = [torch.zeros(shape, device=self.device) for _ in self.model.transformer.h]  # float32: see _forward
        values = [torch.zeros(shape, device=self.device) for _ in self.model.transformer.h]
        for old, fresh in zip(self._keys + self._values, keys + values, strict=False):  # none the first time
            fresh[:, :, :have] = old
        self._keys, self._values = keys, values

    # -- sampling and results ------------------------------------------------------------------

    def _emit(self, seq: Seq, choice: tuple[int, float | None, Top | None], prompt: list[Token] | None = None) -> None:
        """Record a sampled token: release what text is final, and finish the sequence if it is done."""
        token, logprob, top = choice
        s = seq.sampling
        if s.stop_at_eot and token == self.eot_id:
            self._finish(seq, "stop", Event(prompt=prompt))
            return
        seq.generated.append(token)
        seq.counts[token] += 1
        seq.next_token = token
        event = Event(prompt=prompt)
        held = Token(token, logprob, top)
        if seq.text is None:
            event.tokens.append(held)
        else:
            event.text = seq.text.add(token)
            seq.held.append((held, seq.text.decoded))
            if seq.text.stopped:
                self._finish(seq, "stop", event)
                return
            event.tokens = self._release(seq)
        if len(seq.generated) >= s.max_tokens or seq.length >= self.n_ctx:  # no position left to feed it at
            self._finish(seq, "length", event)
            return
        seq.on_event(event)

    def _release(self, seq: Seq, final: bool = False) -> list[Token]:
        """The held tokens whose text has been released (at a stop: those that end before it)."""
        assert seq.text is not None
        limit = seq.text.stop_at if seq.text.stop_at is not None else seq.text.emitted
        done = [t for t, end in seq.held if end <= limit or (final and seq.text.stop_at is None)]
        seq.held = [] if final else [(t, end) for t, end in seq.held if end > limit]
        return done

    def _finish(self, seq: Seq, reason: str, event: Event) -> None:
        if seq.text is not None:
            if reason != "stop" or not seq.text.stopped:
                event.text += seq.text.flush()
            event.tokens += self._release(seq, final=True)
        event.finish_reason = reason
        seq.finished = True
        seq.on_event(event)

    def _drop_cancelled(self) -> None:
        for seq in self._active:
            if seq.cancelled and not seq.finished:
                seq.finished = True
                seq.on_event(Event(finish_reason="cancelled"))
        self._compact()

    def _compact(self) -> None:
        """Finished sequences leave their slots; the last active ones move into the gaps."""
        slot = 0
        while slot < len(self._active):
            if not self._active[slot].finished:
                slot += 1
                continue
            last = len(self._active) - 1
            if slot != last:
                n = self._active[last].length
                for keys, values in zip(self._keys, self._values, strict=True):
                    keys[slot, :, :n] = keys[last, :, :n]
                    values[slot, :, :n] = values[last, :, :n]
                self._active[slot] = self._active[last]
            self._active.pop()

