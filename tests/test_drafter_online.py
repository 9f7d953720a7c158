"""Online speculative decoding: the draft learns where it was rejected, acceptance rises on a
stream of like requests, the output stays exact, and frozen mode learns nothing."""

from __future__ import annotations

import pytest
import torch

from tokenlean.errors import UserError
from tokenlean.lm import LM
from tokenlean.spec_decode.drafters.online import forward_kl
from tokenlean.spec_decode.registry import make_drafter


def fresh(lm) -> LM:
    return LM(lm.name, lm.folder, lm.model, lm.tokenizer)


@pytest.fixture(scope="module")
def stream(tiny_lm):
    """A prompt the tiny target continues its own way, and its plain greedy output."""
    prompt = tiny_lm.encode("def add(a, b):\n    return a + b\n")
    return prompt, tiny_lm.generate(prompt, 24).token_ids


def run_stream(lm, prompt, draft_dir, n: int, **options):
    lm = fresh(lm)
    args = {"model": str(draft_dir), "update_every": 1, "steps": 20, "lr": 3e-3,
            "batch": 16, **options}
    results = [lm.generate(prompt, 24, method="online", method_args=args) for _ in range(n)]
    drafter = next(iter(lm.drafters.values()))
    return results, drafter


def test_acceptance_rises_on_a_repeated_request_and_output_stays_exact(tiny_lm, stream,
                                                                       tiny_draft_dir):
    prompt, greedy = stream
    results, drafter = run_stream(tiny_lm, prompt, tiny_draft_dir, 5)
    assert all(r.token_ids == greedy for r in results)  # exact while the draft changes
    rates = [r.stats["accepted_tokens"] / r.stats["drafted_tokens"] for r in results]
    assert drafter.learned.updates == 5 and len(drafter.learned.buffer) > 0
    assert rates[-1] > rates[0] + 0.2, rates  # a random draft learns the target's answer
    assert drafter.learned.losses[-1] < drafter.learned.losses[0]


def test_frozen_learns_nothing(tiny_lm, stream, tiny_draft_dir):
    prompt, greedy = stream
    results, drafter = run_stream(tiny_lm, prompt, tiny_draft_dir, 3, frozen=True)
    assert all(r.token_ids == greedy for r in results)
    assert drafter.learned.updates == 0 and len(drafter.learned.buffer) == 0
    assert len({r.stats["accepted_tokens"] for r in results}) == 1  # the same drafts each time


def test_the_buffer_keeps_the_targets_distribution_where_the_draft_was_rejected(
        tiny_lm, stream, tiny_draft_dir):
    prompt, _ = stream
    _, drafter = run_stream(tiny_lm, prompt, tiny_draft_dir, 1, update_every=100)
    assert drafter.learned.buffer
    for context, ids, probs in list(drafter.learned.buffer)[:5]:
        # the target's own distribution after that context (an uncached forward)
        with torch.inference_mode():
            p = torch.softmax(tiny_lm.model(torch.tensor([context]))[0, -1], -1)
        top = p.topk(len(ids))
        assert ids.tolist() == top.indices.tolist()
        assert torch.allclose(probs, top.values / top.values.sum(), atol=1e-4)


def test_forward_kl_is_zero_gradient_at_the_target(tiny_lm):
    """The loss is the cross-entropy to the target's top-k: the model's own distribution
    (all of it) is where its KL part vanishes, so the loss there equals the entropy."""
    model = tiny_lm.model
    context = [5, 9, 13, 21]
    with torch.inference_mode():
        q = torch.softmax(model(torch.tensor([context]))[0, -1], -1)
    ids = torch.arange(q.shape[0])
    with torch.inference_mode():
        loss = forward_kl(model, [(context, ids, q), (context[1:], ids, q)])
    entropy = -(q * q.log()).sum()
    assert float(loss) >= float(entropy) - 1e-4  # the second context is elsewhere: >= entropy


@pytest.mark.parametrize(("options", "message"), [
    ({"positions": "some"}, "positions"), ({"lr": 0}, "lr"), ({"update_every": 0}, "update_every")])
def test_bad_options(tiny_lm, tiny_draft_dir, options, message):
    with pytest.raises(UserError, match=message):
        make_drafter("online", tiny_lm, {"model": str(tiny_draft_dir), **options})
