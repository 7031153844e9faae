"""Stop strings in generated text: StopText turns a stream of token ids into final text, whole
characters only, cut before the first stop string even when it spans several tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StopText:
    """Incremental text of one sample: whole characters only, stop strings found across tokens.

    Text that might be the start of a stop string is held back until the next tokens settle it,
    so what `add` returns is final: it never contains (part of) a stop string, and never half of
    a UTF-8 character.
    """

    def __init__(self, decoder: Any, stops: Sequence[str]) -> None:
        self.decoder = decoder  # tokenizer.stream_decoder(): .add(ids) -> str, .flush() -> str
        self.stops = tuple(stops)
        self.pending = ""  # decoded but held back: it may begin a stop string
        self.emitted = 0  # characters returned so far
        self.stop_at: int | None = None  # character offset where the stop string begins

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    @property
    def decoded(self) -> int:
        """Characters decoded so far, returned or held back."""
        return self.emitted + len(self.pending)

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that is now certain. Sets `stop_at` on a stop string."""
        if self.stopped:
            return ""
        return self._scan(self.pending + self.decoder.add([token_id]), final=False)

    def flush(self) -> str:
        """The rest of the text at the end of generation (a dangling partial character becomes U+FFFD)."""
        if self.stopped:
            return ""
        return self._scan(self.pending + self.decoder.flush(), final=True)

    def _scan(self, text: str, *, final: bool) -> str:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stop_at, self.pending = self.emitted + min(hits), ""
            return self._emit(text[:min(hits)])
        keep = 0 if final else _longest_stop_prefix_suffix(text, self.stops)
        self.pending = text[len(text) - keep:] if keep else ""
        return self._emit(text[:len(text) - keep])

    def _emit(self, text: str) -> str:
        self.emitted += len(text)
        return text


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
