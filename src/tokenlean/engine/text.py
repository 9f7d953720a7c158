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
    """One sequence's output: `push(tokens)` returns the text safe to send and sets `finish`
    ("stop": a stop token or string; "length": the budget) once the output is complete;
    `close()` returns what was held back (a partial character, a possible stop prefix)."""

    def __init__(self, tokenizer, stop: Iterable[str], stop_ids: Iterable[int], budget: int):
        self.stops, self.detok = StopStrings(stop), tokenizer.detokenizer()
        self.stop_ids, self.budget = set(stop_ids), budget
        self.token_ids: list[int] = []
        self.finish: str | None = None

    def push(self, tokens: Iterable[int]) -> str:
        out = []
        for token in tokens:
            self.token_ids.append(token)
            if token in self.stop_ids:
                self.finish = "stop"
                break
            text, hit = self.stops.feed(self.detok.push([token]))
            out.append(text)
            if hit:
                self.finish = "stop"
                break
            if len(self.token_ids) >= self.budget:
                self.finish = "length"
                break
        return "".join(out)

    def close(self) -> str:
        """The held-back tail, once the output ended at the budget or a stop token (a stop
        string cut the text already)."""
        ids = self.token_ids
        if not (self.finish == "length" or (ids and ids[-1] in self.stop_ids)):
            return ""
        tail, hit = self.stops.feed(self.detok.flush())
        if hit:
            self.finish = "stop"
            return tail
        return tail + self.stops.flush()

    @property
    def text(self) -> str:
        return self.stops.text[: self.stops.sent]
