"""Text generation: small pure sampling functions, and a Generator that runs prefill then decode.

Each step turns the last position's logits into the next token, in this order (HF's order):

    1. repetition penalty   every token already in the row (prompt or generated) has its logit
                            divided by the penalty if positive, multiplied if negative (HF's rule)
    2. greedy               stop here and take the argmax (also when temperature == 0)
    3. temperature          logits / temperature, each row first shifted so that its largest logit
                            is 0 (softmax ignores the shift): then no temperature, however small,
                            can overflow the largest logit to inf (inf - inf is NaN)
    4. top-k                keep the k largest logits (ties with the k-th are kept)
    5. top-p                keep the smallest set of most likely tokens whose probability reaches p
    6. sample               one draw from softmax of what is left

Log-probabilities reported with each token (and the top alternatives) are the model's own,
log_softmax of the raw logits, before any of the steps above: they describe the model, not
the sampling settings.

Steps 1 and 3 divide in float64 and keep the results finite where an extreme penalty or a tiny
temperature would overflow float32, so every finite, in-range setting samples without NaNs.

The Generator holds the model and one KV cache, allocated on first use and reused while it is big
enough. Prompts of different lengths run as one left-padded batch: every row gets its own
position ids (starting at 0) and a key mask that hides its padding, so greedy output for each
prompt is the same as for that prompt alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .device import compiled, resolve_device
from .errors import GenerationError
from .model import GPT
from .quantize import KernelLinear, Mode, PackedLinear
from .stoptext import StopText

Finish = Literal["length", "eot", "stop", "context"]
# When a row slides past the context window it keeps this fraction of the window and re-reads it.
SLIDE_KEEP = 0.75
# torch.Generator.manual_seed takes an unsigned 64-bit seed (it wraps negative ones: not taken here).
SEED_LIMIT = 2**64
_SURROGATE = re.compile("[\ud800-\udfff]")


# -- options ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How to generate. Sampling is the default; `greedy=True` or `temperature=0` takes the argmax."""

    max_new_tokens: int = 64
    """Generate at most this many tokens per sample."""
    greedy: bool = False
    """Take the most likely token at each step (temperature, top-k and top-p are then unused)."""
    temperature: float = 1.0
    """Divide the logits by this before sampling; 0 means greedy."""
    top_k: int | None = None
    """Sample only among the k most likely tokens (None or 0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens whose probabilities sum to top_p."""
    repetition_penalty: float = 1.0
    """HF's penalty for tokens already present (> 1 discourages repeats, 1 is off)."""
    stop: tuple[str, ...] = ()
    """Stop when the generated text contains one of these strings (left out of the output)."""
    stop_at_eot: bool = True
    """Stop when the model emits <|endoftext|> (the token is left out of the output)."""
    seed: int | None = None
    """Seed for sampling, 0 <= seed < 2**64; sample i of every prompt uses seed + i. None: not reproducible."""
    num_samples: int = 1
    """Samples per prompt."""
    top_logprobs: int = 0
    """Also report this many most likely alternatives (id, logprob) at each step."""
    add_bos: bool = False
    """Start every prompt with <|endoftext|>, GPT-2's document boundary; needed for an empty prompt."""
    truncate_prompt: bool = False
    """Keep only the last tokens of a prompt longer than the context, instead of failing."""
    slide_window: bool = False
    """At the end of the context window keep its last part and go on, instead of stopping."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string would otherwise become one stop per character
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
               f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        _check(_is_finite(self.temperature) and self.temperature >= 0,
               f"temperature must be >= 0 and finite (0 means greedy), got {self.temperature!r}")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 0),
               f"top_k must be a non-negative integer (0 or None: off), got {self.top_k!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1] (1 is off), got {self.top_p!r}")
        _check(_is_finite(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0 and finite (1 is off), got {self.repetition_penalty!r}")
        _check(_is_int(self.num_samples) and self.num_samples >= 1,
               f"num_samples must be a positive integer, got {self.num_samples!r}")
        _check(_is_int(self.top_logprobs) and self.top_logprobs >= 0,
               f"top_logprobs must be a non-negative integer, got {self.top_logprobs!r}")
        last = SEED_LIMIT - self.num_samples  # sample i uses seed + i, which must fit too
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed <= last),
               f"seed must be an integer from 0 to {last} (2**64 - num_samples: sample i uses seed + i), "
               f"got {self.seed!r}")
        for s in self.stop:
            _check(isinstance(s, str) and s != "", f"stop strings must be non-empty strings, got {s!r}")
            _check(not _SURROGATE.search(s), f"stop string {s!r} holds a lone surrogate, which no generated "
                   "text contains: give valid text")

    @property
    def sampling(self) -> bool:
        return not self.greedy and self.temperature > 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise GenerationError(message)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x  # x == x: not NaN


def _is_finite(x: Any) -> bool:
    return _is_number(x) and abs(x) != float("inf")


# -- the sampling steps, each a pure function of (B, V) logits -------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's repetition penalty: logits of `seen` tokens (B, V) bool are pushed towards less likely.

    Float64 keeps a tiny penalty from becoming 0 in float32 (0 / 0 is NaN); a result beyond the
    dtype's range is clamped to its largest finite value (an inf would make softmax NaN)."""
    x = logits.double()
    big = torch.finfo(logits.dtype).max
    penalized = torch.where(x < 0, x * penalty, x / penalty).clamp(-big, big)
    return torch.where(seen, penalized, x).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, divided in float64: in float32 a temperature below ~1e-45 would be 0."""
    return (logits.double() / temperature).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept)."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probabilities reach p (at least one), -inf the rest."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each one
    drop_sorted = before >= p  # never true for the first token, so one always survives
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `probs` (B, V), each row drawn with its own random generator."""
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def next_tokens(logits: torch.Tensor, seen: torch.Tensor | None, config: GenerationConfig,
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """The next token (B,) for last-position logits (B, V), applying the steps in the module's order."""
    logits = logits.float()
    if config.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if not config.sampling:
        return logits.argmax(-1)
    # Shifted so that each row's largest logit is 0: it stays 0 at any temperature, the others go at
    # worst to -inf, so a tiny temperature is the argmax (or an even draw among ties), never NaN.
    logits = apply_temperature(logits - logits.amax(-1, keepdim=True), config.temperature)
    if config.top_k:
        logits = top_k_filter(logits, config.top_k)
    logits = top_p_filter(logits, config.top_p)
    return sample(logits.softmax(-1), generators)


# -- results ---------------------------------------------------------------------------------


@dataclass
class Completion:
    """One generated sample."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    """The new tokens (without <|endoftext|> or the tokens of a stop string)."""
    logprobs: list[float]
    """Log-probability of each new token under the model."""
    finish_reason: Finish
    """length: max_new_tokens; eot: <|endoftext|>; stop: a stop string; context: the window is full."""
    text: str | None = None
    """The new text (None without a tokenizer)."""
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """The top alternatives at each step, most likely first (when asked for)."""
    prompt_tokens: int = 0
    """Tokens of the prompt the model saw (after add_bos and truncation)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class StreamEvent:
    """One generated token of one sample, and the text it settles (possibly empty)."""

    index: int
    """The sample: prompt_index * num_samples + sample_index."""
    text: str
    token_id: int | None
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: Finish | None = None
    """Set on the sample's last event."""


@dataclass
class _Row:
    """The state of one sample while it is generated."""

    prompt_index: int
    sample_index: int
    context: list[int]  # the tokens the model conditions on: prompt then generated (slides)
    prompt_tokens: int
    text: StopText | None
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    text_ends: list[int] = field(default_factory=list)  # characters decoded after each token
    finish: Finish | None = None

    def completion(self, with_top: bool) -> Completion:
        n = len(self.token_ids)
        if self.text is not None and self.text.stop_at is not None:  # only tokens that end before the stop
            n = sum(1 for end in self.text_ends if end <= self.text.stop_at)
        return Completion(
            prompt_index=self.prompt_index, sample_index=self.sample_index,
            token_ids=self.token_ids[:n], logprobs=self.logprobs[:n], finish_reason=self.finish or "length",
            text=None if self.text is None else "".join(self.text_parts),
            top_logprobs=self.top_logprobs[:n] if with_top else None, prompt_tokens=self.prompt_tokens,
        )


# -- the generator ---------------------------------------------------------------------------


class Generator:
    """A model, its tokenizer (optional: ids in, ids out without one) and a reusable KV cache.

    compile: run the model through torch.compile (the first calls are slow while it compiles).
    """

    def __init__(self, model: GPT, tokenizer: Any = None, *, compile: bool = False,
                 eot_id: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eot_id = eot_id if eot_id is not None else getattr(tokenizer, "eot_id", None)
        if self.eot_id is None and model.config.vocab_size == 50257:
            self.eot_id = 50256  # GPT-2's <|endoftext|>
        self.n_ctx = model.config.n_ctx
        if compile and any(isinstance(m, PackedLinear | KernelLinear) or getattr(m, "packed", False)
                           for m in model.modules()):
            raise GenerationError("torch.compile cannot trace packed weights: prepare the model with "
                                  "quantize.prepare(model, mode, pack=False) to compile it")
        self._cache: list[Any] = []  # the blocks' KVCache objects, attached to the model while generating
        device = next(model.parameters()).device
        self._hidden: Callable[..., torch.Tensor] = (
            compiled(model.hidden, device, what="generation", dynamic=True) if compile else model.hidden
        )

    @classmethod
    def load(cls, path: str | Path, *, mode: Mode = "fp32", compile: bool = False,
             device: str | torch.device = "auto") -> Generator:
        """A Generator for a checkpoint, run or HF folder (or a Hub name, see gpt2lab.hub), with its tokenizer,
        in a speed mode, on a device (a name for device.resolve_device: auto, cpu, cuda, cuda:N, mps)."""
        from .checkpoint import load_tokenizer
        from .quantize import load

        device = resolve_device(device)
        tokenizer = load_tokenizer(path)
        # load raises if the tokenizer is not the model's; inductor cannot trace packed weights.
        model = load(path, mode, tokenizer=tokenizer, device=device, pack=not compile)
        return cls(model, tokenizer, compile=compile)

    # -- public API --

    def generate(self, prompts: str | Sequence[str], config: GenerationConfig | None = None,
                 **options: Any) -> list[Completion]:
        """Complete text prompts (a string or a list): num_samples Completions per prompt, in order.

        options: GenerationConfig fields, replacing those of `config`.
        """
        return self.generate_ids(self.encode(prompts), config, **options)

    def generate_ids(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None,
                     **options: Any) -> list[Completion]:
        """Complete prompts given as token ids (no tokenizer needed unless there are stop strings)."""
        config = _config(config, options)
        rows = self._rows(prompts, config)
        for _ in self._run(rows, config):
            pass
        return [row.completion(config.top_logprobs > 0) for row in rows]

    def stream(self, prompts: str | Sequence[str], config: GenerationConfig | None = None,
               **options: Any) -> Iterator[StreamEvent]:
        """Generate, yielding each token as it comes with the text it settles (whole characters only)."""
        return self.stream_ids(self.encode(prompts), config, **options)

    def stream_ids(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None,
                   **options: Any) -> Iterator[StreamEvent]:
        """Like `stream`, for prompts given as token ids."""
        config = _config(config, options)
        rows = self._rows(prompts, config)  # validates before the first next()
        return self._run(rows, config)

    def encode(self, prompts: str | Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt; <|endoftext|> written in a prompt is the special token."""
        if self.tokenizer is None:
            raise GenerationError("this Generator has no tokenizer: pass token ids to generate_ids/stream_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        return [self.tokenizer.encode(p, allowed_special="all") for p in prompts]

    # -- internals --

    def _rows(self, prompts: Sequence[Sequence[int]], config: GenerationConfig) -> list[_Row]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise GenerationError("prompts must be a non-empty list of token-id lists")
        if config.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer: build the Generator with one")
        if config.add_bos and self.eot_id is None:
            raise GenerationError("add_bos needs the <|endoftext|> id: pass eot_id= or a tokenizer")
        if config.stop_at_eot and self.eot_id is None:
            raise GenerationError("stop_at_eot needs the <|endoftext|> id: pass eot_id= or a tokenizer, "
                                  "or set stop_at_eot=False")
        vocab = self.model.config.vocab_size
        all_ids = []
        for i, prompt in enumerate(prompts):
            ids = [int(t) for t in prompt]
            if config.add_bos:
                ids = [self.eot_id, *ids]
            if not ids:
                raise GenerationError(f"prompt {i} is empty: give some text, or set add_bos "
                                      "(--add-bos) to start from <|endoftext|>")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary 0..{vocab - 1}")
            if len(ids) > self.n_ctx:
                if not config.truncate_prompt:
                    raise GenerationError(
                        f"prompt {i} has {len(ids)} tokens but the model's context is {self.n_ctx}: shorten it, "
                        "or set truncate_prompt (--truncate-prompt) to keep its last tokens")
                # Leave room for the answer, but keep at least half the window of prompt.
                keep = self.n_ctx - min(config.max_new_tokens, self.n_ctx // 2)
                ids = ids[-keep:]
            all_ids.append(ids)
        self._check_memory(all_ids, config)
        rows = []
        for i, ids in enumerate(all_ids):
            for s in range(config.num_samples):
                gen = None
                if config.sampling and config.seed is not None:
                    gen = torch.Generator(device=self.model.transformer.ln_f.weight.device)
                    gen.manual_seed(config.seed + s)
                text = None
                if self.tokenizer is not None:
                    text = StopText(self.tokenizer.stream_decoder(), config.stop)
                rows.append(_Row(prompt_index=i, sample_index=s, context=list(ids), prompt_tokens=len(ids),
                                 text=text, generator=gen))
        return rows

    def _check_memory(self, prompts: list[list[int]], config: GenerationConfig) -> None:
        """Refuse, before building anything, a batch whose KV cache and logits cannot fit in this
        device's memory (too many prompts x samples): the allocation would fail, or swap for hours."""
        ref = self.model.transformer.ln_f.weight
        cfg = self.model.config
        width, shortest = max(map(len, prompts)), min(map(len, prompts))
        length = min(width + config.max_new_tokens, width - shortest + self.n_ctx)  # as _prefill sizes it
        rows = len(prompts) * config.num_samples
        per_row = 2 * cfg.n_layer * length * cfg.n_embd * ref.element_size() + 4 * 4 * cfg.vocab_size
        total = _memory(ref.device)
        if total is not None and rows * per_row > total:
            raise GenerationError(
                f"{len(prompts)} prompt(s) x {config.num_samples} sample(s) need about "
                f"{rows * per_row / 2**30:.1f} GiB for the KV cache and logits, more than the "
                f"{total / 2**30:.1f} GiB of memory on {ref.device}: ask for fewer samples or prompts at once")

    @torch.inference_mode()
    def _run(self, rows: list[_Row], config: GenerationConfig) -> Iterator[StreamEvent]:
        device = self.model.transformer.ln_f.weight.device
        B, V = len(rows), self.model.config.vocab_size
        seen = None
        if config.repetition_penalty != 1.0:
            seen = torch.zeros(B, V, dtype=torch.bool, device=device)
            for b, row in enumerate(rows):
                seen[b, torch.tensor(row.context, device=device)] = True
        try:
            yield from self._loop(rows, config, seen)
        except torch.cuda.OutOfMemoryError:  # a GPU that ran out (the CPU check is _check_memory)
            self._cache = []  # whatever was allocated goes, so the next request starts clean
            raise GenerationError(f"out of memory on {device} generating {B} rows at once: ask for fewer "
                                  "samples or prompts, or fewer new tokens") from None
        finally:
            self.model.clear_cache()  # the model is usable without a cache again; we keep ours

    def _loop(self, rows: list[_Row], config: GenerationConfig, seen: torch.Tensor | None) -> Iterator[StreamEvent]:
        device = self.model.transformer.ln_f.weight.device
        B, V = len(rows), self.model.config.vocab_size
        logits, step = self._prefill(rows, config.max_new_tokens)
        gens = [r.generator for r in rows]
        while True:
            tokens = next_tokens(logits, seen, config, gens)  # (B,)
            logp = logits.float().log_softmax(-1)  # (B, V)
            chosen = logp.gather(-1, tokens[:, None])[:, 0].tolist()
            top = None
            if config.top_logprobs:
                t = torch.topk(logp, min(config.top_logprobs, V), dim=-1)
                top = [list(zip(i, v, strict=True)) for i, v in zip(t.indices.tolist(), t.values.tolist(),
                                                                     strict=True)]
            if seen is not None:
                seen[torch.arange(B, device=device), tokens] = True
            for b, (row, tok) in enumerate(zip(rows, tokens.tolist(), strict=True)):
                if row.finish is None:
                    yield self._advance(b, row, tok, chosen[b], None if top is None else top[b], config)
            if all(r.finish is not None for r in rows):
                return
            if any(r.finish is None and len(r.context) > self.n_ctx for r in rows):  # only with slide_window
                for r in rows:
                    if len(r.context) > self.n_ctx:
                        r.context = r.context[-int(self.n_ctx * SLIDE_KEEP):]
                logits, step = self._prefill(rows, config.max_new_tokens - min(len(r.token_ids) for r in rows))
                continue
            logits = self._decode(tokens, step)
            step.advance(self.n_ctx)

    def _advance(self, b: int, row: _Row, tok: int, logprob: float, top: list[tuple[int, float]] | None,
                 config: GenerationConfig) -> StreamEvent:
        """Record token `tok` for a row, decide whether the row is finished, and say what it adds."""
        if config.stop_at_eot and tok == self.eot_id:
            row.finish = "eot"
            text = row.text.flush() if row.text is not None else ""
            row.text_parts.append(text)
            return StreamEvent(index=b, text=text, token_id=None, logprob=None, finish_reason="eot")
        row.token_ids.append(tok)
        row.logprobs.append(logprob)
        if top is not None:
            row.top_logprobs.append(top)
        row.context.append(tok)
        text = ""
        if row.text is not None:
            text = row.text.add(tok)
            if row.text.stopped:
                row.finish = "stop"
            else:
                row.text_ends.append(row.text.decoded)
        if row.finish is None:
            if len(row.token_ids) == config.max_new_tokens:
                row.finish = "length"
            elif len(row.context) > self.n_ctx and not config.slide_window:
                row.finish = "context"  # the new token has no position left to be read at
            if row.finish is not None and row.text is not None:
                text += row.text.flush()
        row.text_parts.append(text)
        return StreamEvent(index=b, text=text, token_id=tok, logprob=logprob, top_logprobs=top,
                           finish_reason=row.finish)

    def _prefill(self, rows: list[_Row], steps: int) -> tuple[torch.Tensor, _Slots]:
        """Run every row's context through the model as one left-padded batch: last logits (B, V)."""
        ref = self.model.transformer.ln_f.weight  # the activations' dtype and device (weights may be int8)
        device = ref.device
        lengths = [len(r.context) if r.finish is None else 1 for r in rows]
        B, W = len(rows), max(lengths)
        # Rows stop at the window's end, so a row never holds more than its padding + n_ctx slots.
        need = min(W + steps, W - min(lengths) + self.n_ctx)
        self._attach_cache(B, need, ref.dtype)
        ids = torch.zeros(B, W, dtype=torch.long)
        key_mask = torch.zeros(B, self.model.cache_len, dtype=torch.bool)
        for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            ids[b, W - n:] = torch.tensor(row.context[-n:])
            key_mask[b, W - n:W] = True
        padded = min(lengths) < W
        positions = (key_mask[:, :W].long().cumsum(1) - 1).clamp(min=0)  # (B, W): 0 at each row's first token
        slots = _Slots(W, key_mask.to(device), positions[:, -1:].to(device) + 1, padded)
        hidden = self._hidden(ids.to(device), position_ids=positions.to(device) if padded else None,
                              key_mask=slots.key_mask[:, :W] if padded else None)
        return self.model.lm_head(hidden[:, -1]), slots  # (B, V)

    def _decode(self, tokens: torch.Tensor, slots: _Slots) -> torch.Tensor:
        """Feed one token per row (B,) at the next cache slot: logits (B, V) for the step after."""
        slots.key_mask[:, slots.start] = True
        hidden = self._hidden(
            tokens[:, None], start=slots.start,
            position_ids=slots.positions if slots.padded else None,
            key_mask=slots.key_mask[:, :slots.start + 1] if slots.padded else None,
        )
        return self.model.lm_head(hidden[:, -1])

    def _attach_cache(self, batch_size: int, length: int, dtype: torch.dtype) -> None:
        """Put our KV cache in the model's blocks, allocating it only when it is too small."""
        if self._cache:
            k = self._cache[0].k
            if k.size(0) >= batch_size and k.size(2) >= length and k.dtype == dtype:
                for block, cache in zip(self.model.transformer.h, self._cache, strict=True):
                    block.attn.kv_cache = cache
                return
            batch_size, length = max(batch_size, k.size(0)), max(length, k.size(2))
            self._cache = []  # free the old one before allocating the new one
        self.model.setup_cache(batch_size, length, dtype=dtype)
        self._cache = [block.attn.kv_cache for block in self.model.transformer.h]


def _memory(device: torch.device) -> int | None:
    """The memory of `device` in bytes (a GPU's, or this machine's RAM for the CPU); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


@dataclass
class _Slots:
    """Where the next decoded token goes: its cache slot, each row's position, the key mask."""

    start: int
    key_mask: torch.Tensor  # (B, cache_len) bool: slots holding real tokens
    positions: torch.Tensor  # (B, 1) position of the next token in each row
    padded: bool

    def advance(self, n_ctx: int) -> None:
        self.start += 1
        # A finished row is still fed (its output ignored); keep its position inside the table.
        self.positions.add_(1).clamp_(max=n_ctx - 1)


def _config(config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
    if config is None:
        return GenerationConfig(**options)
    if options:
        return replace(config, **options)
    return config
