"""The decode loop: prefill, then one target forward per new token, streamed as text.

Speculative methods replace step 4 (one token per forward) with draft -> verify
-> accept; everything around it (stops, streaming, stats) stays as it is here.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from tokenlean.engine.text import StopStrings, TextStream  # noqa: F401 (StopStrings: re-export)
from tokenlean.errors import UserError
from tokenlean.kv.registry import check_with_drafting
from tokenlean.sampling import SamplingParams, probabilities, sample
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.spec_decode.verify import Accepted, verify_greedy, verify_sampling


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


class SpecStats:
    """Drafted / accepted counts, per depth, and the time split of a generation."""

    def __init__(self):
        self.drafts = self.drafted = self.accepted = 0
        self.accepted_at_depth: list[int] = []  # steps that accepted >= d+1 draft tokens
        self.drafted_at_depth: list[int] = []  # steps whose tree reached depth d+1
        self.draft_s = self.verify_s = 0.0

    def record(self, tree: DraftTree, accepted: Accepted) -> None:
        if not len(tree):  # nothing was drafted: not a draft (vLLM counts the same way)
            return
        self.drafts += 1
        self.drafted += len(tree)
        self.accepted += len(accepted.nodes)
        depth = max(tree.depths, default=0)
        for counts, n in ((self.drafted_at_depth, depth), (self.accepted_at_depth, len(accepted.nodes))):
            counts.extend([0] * (n - len(counts)))
            for d in range(n):
                counts[d] += 1

    def to_json(self) -> dict:
        return {
            "drafts": self.drafts,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_per_depth": [round(a / d, 4) if d else None for a, d in
                                     zip(self.accepted_at_depth + [0] * len(self.drafted_at_depth),
                                         self.drafted_at_depth)],
            "accepted_at_depth": self.accepted_at_depth,
            "drafted_at_depth": self.drafted_at_depth,
            "draft_s": round(self.draft_s, 6),
            "verify_s": round(self.verify_s, 6),
        }


def decode_steps(lm, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams,
                 stop: Iterable[str] = (), stop_token_ids: Iterable[int] | None = None,
                 drafter=None, method: str = "greedy", policy=None,
                 question_ids: list[int] | None = None):
    """Generate after `prompt_ids`. With a cache policy the prompt is prefilled (and
    compressed) first; `question_ids`, if given, are then fed on the compressed cache
    before the first token is chosen (kvpress's protocol: the question unseen by the
    compression)."""
    model, tokenizer = lm.model, lm.tokenizer
    if policy is not None:
        check_with_drafting(policy.name, drafter is not None)
    question_ids = list(question_ids or [])
    context = model.config.max_position_embeddings
    if policy is not None and policy.beyond_context:
        context = len(prompt_ids) + len(question_ids) + max_new_tokens + 1  # no limit
    check_prompt(prompt_ids + question_ids, context, max_new_tokens)
    budget = min(max_new_tokens, context - len(prompt_ids) - len(question_ids))
    stop_ids = set(tokenizer.eos_ids if stop_token_ids is None else stop_token_ids)
    stops, detok = StopStrings(stop), tokenizer.detokenizer()
    generator = sampling.generator(model.device)
    spec = SpecStats()
    t_start = time.perf_counter()

    def choose(logits: torch.Tensor) -> int:
        if sampling.greedy:
            return int(logits.argmax())
        return int(sample(probabilities(logits, sampling), generator))

    with torch.inference_mode():
        # 1. prefill: the prompt into the cache, the first token from its last position
        headroom = drafter.max_nodes + 1 if drafter else 0
        fed = len(prompt_ids) + len(question_ids)
        cache = model.new_cache(min(context, fed + budget) + headroom)
        prompt = torch.tensor([prompt_ids], device=model.device)
        if policy is None:
            logits = model(prompt, cache=cache, last_n=1)[0, -1]
        else:
            logits = policy.prefill(model, cache, prompt, room=budget + headroom + len(question_ids))
        if question_ids:
            logits = model(torch.tensor([question_ids], device=model.device), cache=cache,
                           last_n=1)[0, -1]
        new = [choose(logits)]
        t_prefill = time.perf_counter()
        history = list(prompt_ids) + question_ids  # what drafters look at
        if drafter:
            drafter.start(history, sampling)
        out: list[int] = []
        steps, finish = 1, None
        while True:
            # 2. emit the new tokens, up to a stop token, a stop string or the budget
            for token in new:
                out.append(token)
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
                    finish = "length"
                    break
            if finish:
                break
            history.extend(new)
            root = new[-1]  # chosen, not yet in the cache
            # 3. draft: a tree of guesses that fits the budget and the context
            max_depth = min(budget - len(out) - 1, context - 1 - cache.seen)
            tree = None
            if drafter and max_depth > 0:
                t0 = time.perf_counter()
                tree = drafter.propose(history, max_depth)
                spec.draft_s += time.perf_counter() - t0
            steps += 1
            if tree is None:  # plain decoding: one token per forward
                logits = model(torch.tensor([[root]], device=model.device), cache=cache)[0, -1]
                new = [choose(logits)]
                continue
            # 4. verify: score [root, *tree] in one forward, keep the longest lossless path
            t0 = time.perf_counter()
            positions = tree.positions(cache.next_position)
            tokens = torch.tensor([[root, *tree.tokens]], device=model.device)
            # [root, *tree] see every cached slot and their own ancestors
            logits = model(tokens, positions.to(model.device), cache,
                           tree.ancestor_mask().to(model.device))[0]
            if sampling.greedy:
                accepted = verify_greedy(tree, logits)
            else:
                accepted = verify_sampling(tree, logits, sampling, generator)
            kept = torch.tensor([0] + [1 + n for n in accepted.nodes], dtype=torch.long)
            cache.keep_new(len(tree) + 1, kept)  # root + accepted path; the rest is dropped
            spec.verify_s += time.perf_counter() - t0
            spec.record(tree, accepted)
            drafter.observe(tree, logits, accepted)
            new = accepted.tokens

    if drafter:
        drafter.end()
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
    stats = {
        "method": method,
        "sampling": "greedy" if sampling.greedy else "sample",
        "steps": steps,
        "mean_accepted_tokens": round(len(out) / steps, 4),
        "time_s": round(elapsed, 6),
        "prefill_s": round(t_prefill - t_start, 6),
        "decode_s": round(decode_s, 6),
        "tokens_per_s": round(len(out) / elapsed, 3) if elapsed > 0 else None,
        "decode_tokens_per_s": round((len(out) - 1) / decode_s, 3)
        if decode_s > 0 and len(out) > 1 else None,
    }
    if drafter:
        stats.update(spec.to_json(), **drafter.info())
    if policy is not None:
        stats.update(policy.info(cache))
    return GenerationResult(
        text=stops.text[: stops.sent],
        token_ids=out,
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(out),
        finish_reason=finish,
        stats=stats,
    )
