"""The text layer: token ids in, streamed text out, cut at stop tokens, stop strings and
the token budget. Nothing here runs the model; the token step never sees text."""

from __future__ import annotations

from collections.abc import Iterable


class StopStrings:
    """Cuts the text at the first stop string; holds back a tail that may begin one.

    Each `feed` looks only at the new text and the held-back tail before it (at most the
    longest stop string minus one character), so a long output with long stop strings
    costs time linear in its length, not quadratic."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0  # text[:sent] has been emitted

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            self.text += delta
            return self._emit(len(self.text)), False
        # a stop string that ends in the new text starts at most longest - 1 characters back
        start = max(self.sent, len(self.text) - self.longest + 1)
        self.text += delta
        # the stop string completed first (earliest end; of those, the longest) ends the
        # text, so the cut does not depend on how the text was split into deltas
        hits = [(i + len(s), i) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            return self._emit(min(hits)[1]), True
        return self._emit(len(self.text) - self._partial_tail()), False

    def _partial_tail(self) -> int:
        """The length of the longest end of the text that begins some stop string."""
        best = 0
        for s in self.stops:
            # candidates begin where the stop string's first character occurs, leftmost first
            i = self.text.find(s[0], max(self.sent, len(self.text) - len(s) + 1))
            while i >= 0 and len(self.text) - i > best:
                if s.startswith(self.text[i:]):
                    best = len(self.text) - i
                    break
                i = self.text.find(s[0], i + 1)
        return best

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out


class TextStream:
    """One sequence's text: `push(tokens)` returns the text safe to send. A stop token adds
    no text; a stop string sets `hit` and cuts the text there (`unused`: how many of the
    pushed tokens came after it). `close()` returns what was held back (a partial
    character, the start of a possible stop string) once the output is complete."""

    def __init__(self, tokenizer, stop: Iterable[str], stop_ids: Iterable[int]):
        self.stops, self.detok = StopStrings(stop), tokenizer.detokenizer()
        self.stop_ids = set(stop_ids)
        self.hit = False
        self.unused = 0

    def push(self, tokens: list[int]) -> str:
        out = []
        for i, token in enumerate(tokens):
            if token in self.stop_ids:
                break
            text, self.hit = self.stops.feed(self.detok.push([token]))
            out.append(text)
            if self.hit:
                self.unused = len(tokens) - i - 1
                break
        return "".join(out)

    def close(self) -> str:
        if self.hit:  # the text was cut at the stop string already
            return ""
        tail, self.hit = self.stops.feed(self.detok.flush())
        return tail if self.hit else tail + self.stops.flush()

    @property
    def text(self) -> str:
        return self.stops.text[: self.stops.sent]
