"""The token step: every running sequence in one forward, new tokens out.

1. Each sequence plans its segment: a prompt chunk, its last token, or that token
   with its draft tree (`Sequence.plan`).
2. One packed forward scores all segments, each over its own cache
   (`Transformer.forward_packed`).
3. Each sequence reads its logits back: the first token after its prompt, the
   next token, or the longest lossless path of its tree (`Sequence.take`).

A sequence whose cache policy compresses the prompt prefills alone first, inside
the policy's own forward. Text, stop strings and streaming are not in here.
"""

from __future__ import annotations

import torch

from tokenlean.engine.sequence import Sequence


@torch.inference_mode()
def step(model, sequences: list[Sequence], chunks: list[int | None] | None = None) -> list[list[int]]:
    """Advance every sequence by one forward; return the tokens each accepted (none for a
    sequence still prefilling). `chunks[i]`: how many prompt tokens sequence i may feed
    this step (None: all that are left)."""
    chunks = chunks or [None] * len(sequences)
    new: list[list[int] | None] = [None] * len(sequences)
    plans = []
    for i, (seq, chunk) in enumerate(zip(sequences, chunks)):
        if seq.policy is not None and seq.fed == 0:
            new[i] = seq.prefill_with_policy()  # compressed in its own forward
        else:
            plans.append((i, seq.plan(chunk)))
    if plans:
        logits = model.forward_packed([plan.segment for _, plan in plans])
        for (i, plan), seg_logits in zip(plans, logits):
            new[i] = sequences[i].take(plan, seg_logits)
    return new
