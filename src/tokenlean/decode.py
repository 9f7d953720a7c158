"""Offline generation: one sequence stepped by the engine's token step, streamed as text.

The same `Sequence` and `step` serve the batching scheduler, so a request served in a
batch follows exactly the path it follows here, with a batch of one.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator

from tokenlean.engine.sequence import GenerationResult, Sequence, SpecStats, check_prompt  # noqa: F401 (re-exports)
from tokenlean.engine.step import step
from tokenlean.engine.text import StopStrings, TextStream  # noqa: F401 (StopStrings: re-export)
from tokenlean.sampling import SamplingParams


class Generation:
    """Iterate for text deltas; `.result` holds the GenerationResult once exhausted."""

    def __init__(self, steps: Generator[str, None, GenerationResult]):
        self._steps = steps
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._steps


def decode_steps(lm, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams,
                 stop: Iterable[str] = (), stop_token_ids: Iterable[int] | None = None,
                 drafter=None, method: str = "greedy", policy=None,
                 question_ids: list[int] | None = None):
    """Generate after `prompt_ids`. With a cache policy the prompt is prefilled (and
    compressed) first; `question_ids`, if given, are then fed on the compressed cache
    before the first token is chosen (kvpress's protocol: the question unseen by the
    compression). Closing the generator early still ends the drafter's session."""
    stop_ids = lm.tokenizer.eos_ids if stop_token_ids is None else stop_token_ids
    seq = Sequence(lm.model, prompt_ids, max_new_tokens, sampling, drafter=drafter,
                   policy=policy, question_ids=question_ids, stop_ids=stop_ids, method=method)
    text = TextStream(lm.tokenizer, stop, seq.stop_ids)
    seq.allocate()
    try:
        while not seq.finished:
            new = step(lm.model, [seq])[0]
            delta = text.push(new)
            if text.hit:
                seq.stop_early(text.unused)
            if delta:
                yield delta
        tail = text.close()
        if text.hit:
            seq.finish_reason = "stop"
        if tail:
            yield tail
        return seq.result(text.text)
    finally:
        seq.close()
