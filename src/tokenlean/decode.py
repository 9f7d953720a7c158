"""The decode loop: prefill, then one target forward per new token, streamed as text.

Speculative methods replace step 4 (one token per forward) with draft -> verify
-> accept; everything around it (stops, streaming, stats) stays as it is here.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from tokenlean.errors import UserError
from tokenlean.sampling import SamplingParams, probabilities, sample


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "stats": self.stats,
        }


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


class Generation:
    """Iterate for text deltas; `.result` holds the GenerationResult once exhausted."""

    def __init__(self, steps: Generator[str, None, GenerationResult]):
        self._steps = steps
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._steps


def check_prompt(prompt_ids: list[int], context: int, max_new_tokens: int) -> None:
    if not prompt_ids:
        raise UserError("the prompt is empty")
    if len(prompt_ids) >= context:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens; the model's context is "
                        f"{context}, which leaves no room to generate")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def decode_steps(lm, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams,
                 stop: Iterable[str] = (), stop_token_ids: Iterable[int] | None = None):
    model, tokenizer = lm.model, lm.tokenizer
    context = model.config.max_position_embeddings
    check_prompt(prompt_ids, context, max_new_tokens)
    budget = min(max_new_tokens, context - len(prompt_ids))
    stop_ids = set(tokenizer.eos_ids if stop_token_ids is None else stop_token_ids)
    stops, detok = StopStrings(stop), tokenizer.detokenizer()
    generator = sampling.generator(model.device)
    t_start = time.perf_counter()

    with torch.inference_mode():
        # 1. prefill: the prompt into the cache, logits of its last position only
        cache = model.new_cache(len(prompt_ids) + budget)
        prompt = torch.tensor([prompt_ids], device=model.device)
        logits = model(prompt, cache=cache, last_n=1)[0, -1]
        t_prefill = time.perf_counter()
        out: list[int] = []
        steps, finish = 1, "length"
        while True:
            # 2. the next token from the target's distribution
            if sampling.greedy:
                token = int(logits.argmax())
            else:
                token = int(sample(probabilities(logits, sampling), generator))
            out.append(token)
            # 3. stop token, stop string, or budget
            if token in stop_ids:
                finish = "stop"
                break
            text, hit = stops.feed(detok.push([token]))
            if text:
                yield text
            if hit:
                finish = "stop"
                break
            if len(out) >= budget:
                break
            # 4. one target forward for the token just chosen
            logits = model(torch.tensor([[token]], device=model.device), cache=cache)[0, -1]
            steps += 1

    if finish == "length" or (out and out[-1] in stop_ids):
        tail, hit = stops.feed(detok.flush())
        if hit:
            finish = "stop"
        else:
            tail += stops.flush()
        if tail:
            yield tail
    t_end = time.perf_counter()
    elapsed, decode_s = t_end - t_start, t_end - t_prefill
    return GenerationResult(
        text=stops.text[: stops.sent],
        token_ids=out,
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(out),
        finish_reason=finish,
        stats={
            "method": "greedy" if sampling.greedy else "sample",
            "steps": steps,
            "mean_accepted_tokens": len(out) / steps,
            "time_s": round(elapsed, 6),
            "prefill_s": round(t_prefill - t_start, 6),
            "decode_s": round(decode_s, 6),
            "tokens_per_s": round(len(out) / elapsed, 3) if elapsed > 0 else None,
            "decode_tokens_per_s": round((len(out) - 1) / decode_s, 3) if decode_s > 0 and len(out) > 1 else None,
        },
    )
