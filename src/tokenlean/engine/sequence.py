"""One request's token state: its prompt, cache, drafter session, sampler and output ids.

A sequence knows nothing of text or of other sequences. Each step it hands the
batched forward (engine/step.py) a `Segment`: the next chunk of its prompt, its
last chosen token, or that token with a draft tree. It takes back the logits of
its segment and turns them into accepted tokens, cut at a stop token or its
budget. What a drafter learns across requests (Token Recycling's matrix) stays
on the shared drafter; the sequence holds its own session of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tokenlean.errors import UserError
from tokenlean.kv.registry import check_with_drafting
from tokenlean.model.transformer import Segment
from tokenlean.sampling import SamplingParams, penalize, probabilities, sample
from tokenlean.spec_decode.tree import DraftTree
from tokenlean.spec_decode.verify import Accepted, verify_greedy, verify_sampling


@dataclass
class TokenLogprob:
    """A chosen token's log-probability under the model (its raw distribution: before
    temperature, top-k/top-p and penalties, as vLLM reports by default) and the `top`
    most likely tokens at that position, (token, logprob) best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """(n, V) logits of the positions that chose `tokens` (n of them) -> their logprobs."""
    logp = logits[: len(tokens)].float().log_softmax(-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    best = logp.topk(top, dim=-1) if top else None
    out = []
    for i, (token, lp) in enumerate(zip(tokens, chosen)):
        alternatives = (list(zip(best.indices[i].tolist(), best.values[i].tolist()))
                        if best is not None else [])
        out.append(TokenLogprob(token, lp, alternatives))
    return out


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: dict = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token after the first

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "stats": self.stats,
        }


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


@dataclass
class Plan:
    """What a sequence put into this step's forward, to read its logits back."""

    segment: Segment
    prefill: int = 0  # prompt tokens in the segment (0: a decoding step)
    tree: DraftTree | None = None  # the draft tree verified after the root, if any


class Sequence:
    def __init__(self, model, prompt_ids: list[int], max_new_tokens: int,
                 sampling: SamplingParams, *, drafter=None, policy=None,
                 question_ids: list[int] | None = None, stop_ids=(), method: str = "greedy",
                 logprobs: int | None = None, prompt_logprobs: bool = False):
        """`drafter`: the method's shared drafter (this sequence opens its own session);
        `policy`: a fresh CachePolicy; `question_ids`: fed after the prompt was prefilled
        (and compressed), before the first token is chosen (kvpress's protocol);
        `logprobs`: None, or record each new token's logprob and this many alternatives;
        `prompt_logprobs`: also each prompt token's (from its second on; OpenAI's echo
        with logprobs), which scores every prompt position, so no cached prefix is reused.
        Penalties depend on the tokens before each position, which a draft tree's
        verification does not apply: a penalized sequence decodes without drafting."""
        if sampling.penalized:
            drafter = None
        if policy is not None:
            check_with_drafting(policy.name, drafter is not None)
            if prompt_logprobs:
                raise UserError("the prompt's own logprobs (echo with logprobs) need every "
                                "prompt position scored; a KV cache policy compresses the "
                                "prompt in its own forward, which scores only the last")
        self.model, self.sampling, self.policy, self.method = model, sampling, policy, method
        question_ids = list(question_ids or [])
        context = model.config.max_position_embeddings
        if policy is not None and policy.beyond_context:
            context = len(prompt_ids) + len(question_ids) + max_new_tokens + 1  # no limit
        check_prompt(list(prompt_ids) + question_ids, context, max_new_tokens)
        self.context = context
        self.prompt_ids = list(prompt_ids)
        self.feed = self.prompt_ids + question_ids  # what enters the cache before token 1
        self.budget = min(max_new_tokens, context - len(self.feed))
        self.stop_ids = set(stop_ids)
        self.drafter = drafter.session() if drafter is not None else None
        headroom = self.drafter.max_nodes + 1 if self.drafter else 0
        self.capacity = min(context, len(self.feed) + self.budget) + headroom
        self.cache = None  # allocated when the sequence is admitted (`allocate`)
        self.fed = 0  # feed[:fed] is in the cache
        self.out: list[int] = []
        self.top_logprobs = logprobs
        self.logprobs: list[TokenLogprob] | None = [] if logprobs is not None else None
        # feed[1:]'s logprobs, filled as the prompt is prefilled (None: not asked for)
        self.prompt_logprobs: list[TokenLogprob] | None = [] if prompt_logprobs else None
        self.counts = (torch.zeros(model.config.vocab_size, device=model.device)
                       if sampling.penalized else None)  # generated-token counts
        self.history = list(self.feed)  # what the drafter looks at
        self.generator = sampling.generator(model.device)
        self.spec = SpecStats()
        self.steps = 0
        self.max_nodes: int | None = None  # a cap on draft trees (the scheduler's)
        # (nodes, accepted, drafter seconds, the cap it was drafted under) of the last step
        self.last_tree: tuple[int, list[int], float, int | None] | None = None
        self.last_draft_s = 0.0
        self.finish_reason: str | None = None
        self.t_start = time.perf_counter()
        self.t_prefill: float | None = None
        self._closed = False

    # --- the cache ---------------------------------------------------------------------------

    def kv_bytes(self) -> int:
        """What this sequence's cache takes once allocated (keys, values, positions)."""
        c = self.model.config
        per_slot = 2 * c.num_key_value_heads * c.head_dim * self.model.kv_dtype.itemsize
        return self.capacity * (c.num_hidden_layers * per_slot + 8)

    def allocate(self) -> None:
        self.cache = self.model.new_cache(self.capacity)

    def reuse(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Start from a cached prefix: per layer (1, H_kv, n, D) keys and values of feed[:n]."""
        n = keys[0].shape[2]
        self.cache.begin(torch.arange(n, device=self.model.device))
        for layer, k, v in zip(self.cache.layers, keys, values):
            layer.write(k, v, self.cache.new_pos)
        self.cache.advance(n)
        self.fed = n

    @property
    def remaining_prompt(self) -> int:
        return len(self.feed) - self.fed

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.feed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    # --- one step ----------------------------------------------------------------------------

    def plan(self, chunk: int | None = None) -> Plan:
        """This step's segment: the next `chunk` prompt tokens (None: all that are left), or
        the last chosen token with a draft tree."""
        device = self.model.device
        start = self.cache.next_position
        if self.prefilling:
            n = len(self.feed) - self.fed if chunk is None else min(chunk, len(self.feed) - self.fed)
            tokens = torch.tensor(self.feed[self.fed : self.fed + n], device=device)
            last = self.fed + n == len(self.feed)
            wanted = None if self.prompt_logprobs is not None else 1 if last else 0
            return Plan(Segment(tokens, torch.arange(start, start + n, device=device), self.cache,
                                logits_for=wanted), prefill=n)
        root = self.out[-1]  # chosen, not yet in the cache
        tree = self._draft()
        if tree is None:  # plain decoding: one token per forward
            return Plan(Segment(torch.tensor([root], device=device),
                                torch.tensor([start], device=device), self.cache))
        # [root, *tree] see every cached slot and their own ancestors
        return Plan(Segment(torch.tensor([root, *tree.tokens], device=device),
                            tree.positions(start, device), self.cache,
                            tree.ancestor_mask(device), logits_for=None), tree=tree)

    def _draft(self) -> DraftTree | None:
        max_depth = min(self.budget - len(self.out) - 1, self.context - 1 - self.cache.seen)
        if self.drafter is None or max_depth <= 0 or self.max_nodes == 0:
            return None  # the scheduler found that drafting does not pay in this batch
        t0 = time.perf_counter()
        tree = self.drafter.propose(self.history, max_depth)
        if self.max_nodes is not None:
            tree = tree.first(self.max_nodes)
        self.last_draft_s = time.perf_counter() - t0
        self.spec.draft_s += self.last_draft_s
        return tree

    def take(self, plan: Plan, logits: torch.Tensor) -> list[int]:
        """The logits of this sequence's segment -> the tokens it accepts this step."""
        if plan.prefill:
            if self.prompt_logprobs is not None:  # row i scores feed[fed + i + 1]
                scored = self.feed[self.fed + 1 : self.fed + 1 + plan.prefill]
                if scored:
                    self.prompt_logprobs += token_logprobs(logits, scored,
                                                           self.top_logprobs or 0)
            self.fed += plan.prefill
            if self.prefilling:
                return []
            return self._first(logits[-1])
        self.steps += 1
        if plan.tree is None:
            return self._record(logits[:1], self.accept([self._choose(logits[0])]))
        t0 = time.perf_counter()
        tree = plan.tree
        if self.sampling.greedy:
            accepted = verify_greedy(tree, logits)
        else:
            accepted = verify_sampling(tree, logits, self.sampling, self.generator)
        kept = torch.tensor([0] + [1 + n for n in accepted.nodes], dtype=torch.long)
        self.cache.keep_new(len(tree) + 1, kept)  # root + accepted path; the rest is dropped
        self.spec.verify_s += time.perf_counter() - t0
        self.spec.record(tree, accepted)
        self.drafter.observe(tree, logits, accepted)
        # what speculation cost this sequence beyond the forward (proposing, verifying,
        # compacting the cache, learning): the sizer weighs it against the tokens it gains
        overhead = self.last_draft_s + time.perf_counter() - t0
        self.last_tree = (len(tree), accepted.nodes, overhead, self.max_nodes)
        return self._record(logits[kept.to(logits.device)], self.accept(accepted.tokens))

    def prefill_with_policy(self) -> list[int]:
        """A cache policy compresses the prompt inside its own forward (not packed with other
        sequences); the question, if any, then follows as an ordinary chunk."""
        prompt = torch.tensor([self.prompt_ids], device=self.model.device)
        room = self.capacity - len(self.prompt_ids)
        logits = self.policy.prefill(self.model, self.cache, prompt, room=room)
        self.fed = len(self.prompt_ids)
        return [] if self.prefilling else self._first(logits)

    def _first(self, logits: torch.Tensor) -> list[int]:
        self.t_prefill = time.perf_counter()
        self.steps = 1
        if self.drafter:
            self.drafter.start(self.history, self.sampling)
        return self._record(logits[None], self.accept([self._choose(logits)]))

    def _record(self, logits: torch.Tensor, kept: list[int]) -> list[int]:
        """Note the logprobs of the kept tokens ((n, V) logits of the positions that chose
        them) and their counts for the penalties."""
        if self.logprobs is not None and kept:
            self.logprobs += token_logprobs(logits, kept, self.top_logprobs)
        if self.counts is not None:
            for token in kept:
                self.counts[token] += 1
        return kept

    def _choose(self, logits: torch.Tensor) -> int:
        if self.counts is not None:
            logits = penalize(logits, self.counts, self.sampling)
        if self.sampling.greedy:
            return int(logits.argmax())
        return int(sample(probabilities(logits, self.sampling), self.generator))

    def accept(self, tokens: list[int]) -> list[int]:
        """Append new tokens up to a stop token or the budget; return those kept."""
        kept = []
        for token in tokens:
            kept.append(token)
            self.out.append(token)
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            if len(self.out) >= self.budget:
                self.finish_reason = "length"
                break
        self.history.extend(kept)  # complete at the end too: suffix's store keeps it
        return kept

    def stop_early(self, unused: int) -> None:
        """The text layer hit a stop string with `unused` of the last new tokens left over."""
        if unused:
            del self.out[-unused:]
            if self.logprobs is not None:
                del self.logprobs[-unused:]
        self.finish_reason = "stop"

    # --- the end -----------------------------------------------------------------------------

    def close(self) -> None:
        """Free the cache and end the drafter session (it saves what it learned); safe to
        call twice, and called however the sequence ended (finished, cancelled, failed)."""
        if self._closed:
            return
        self._closed = True
        self.cache = None
        if self.drafter is not None and self.t_prefill is not None:
            self.drafter.end()

    def stats(self) -> dict:
        end = time.perf_counter()
        t_prefill = self.t_prefill or end
        elapsed, decode_s, n = end - self.t_start, end - t_prefill, len(self.out)
        stats = {
            "method": self.method,
            "sampling": "greedy" if self.sampling.greedy else "sample",
            "steps": self.steps,
            "mean_accepted_tokens": round(n / self.steps, 4) if self.steps else None,
            "time_s": round(elapsed, 6),
            "prefill_s": round(t_prefill - self.t_start, 6),
            "decode_s": round(decode_s, 6),
            "tokens_per_s": round(n / elapsed, 3) if elapsed > 0 else None,
            "decode_tokens_per_s": round((n - 1) / decode_s, 3) if decode_s > 0 and n > 1 else None,
        }
        if self.drafter is not None:
            stats.update(self.spec.to_json(), **self.drafter.info())
        if self.policy is not None and self.cache is not None:
            stats.update(self.policy.info(self.cache))
        return stats

    def result(self, text: str) -> GenerationResult:
        """Call before `close` (a policy reports what its cache holds)."""
        return GenerationResult(text=text, token_ids=list(self.out),
                                prompt_tokens=len(self.prompt_ids),
                                completion_tokens=len(self.out),
                                finish_reason=self.finish_reason or "length", stats=self.stats(),
                                logprobs=list(self.logprobs) if self.logprobs is not None else None,
                                prompt_logprobs=self.prompt_logprobs)
