"""The text layer: token ids in, streamed text out, cut at stop tokens, stop strings and
the token budget. Nothing here runs the model; the token step never sees text."""

from __future__ import annotations

from collections.abc import Iterable


class StopStrings:
    """Cuts the text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0  # text[:sent] has been emitted

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit, whether a stop string was hit)."""
        self.text += delta
        # the stop string completed first (earliest end; of those, the longest) ends the
        # text, so the cut does not depend on how the text was split into deltas
        hits = [(i + len(s), i) for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            return self._emit(min(hits)[1]), True
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])), default=0)
        return self._emit(len(self.text) - hold), False

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
