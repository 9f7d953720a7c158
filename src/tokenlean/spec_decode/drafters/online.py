"""Online speculative decoding: the draft model keeps learning from the target as it serves.

Liu et al., "Online Speculative Decoding", arXiv 2310.07177.

The drafter is the draft model's chain (drafters/draft_model.py). Wherever the target
rejects a drafted token, the context and the target's distribution there (its top-k,
renormalised) join a buffer shared by every request. Every `update_every` finished
requests the draft takes `steps` gradient steps of forward KL, KL(p_target || q_draft),
over batches of the buffer: the draft moves toward what the target said exactly where
it was wrong, so acceptance rises over a stream of similar requests. The target still
verifies every token, so the output stays exactly plain decoding's; `frozen=true` turns
learning off for reproducible timings. What is learned lives in this process only.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import torch

from tokenlean.spec_decode.drafters.draft_model import DraftModel, DraftModelParams


@dataclass
class OnlineParams(DraftModelParams):
    update_every: int = 2  # finished requests between two distillation updates
    buffer: int = 512  # rejected positions kept (the newest)
    steps: int = 8  # gradient steps per update
    batch: int = 16  # examples per step
    lr: float = 1e-4
    window: int = 128  # context tokens each example keeps
    top_k: int = 64  # target probabilities kept per example
    frozen: bool = False  # never learn: reproducible timings
    positions: str = "rejected"  # rejected: where the draft went wrong (the paper); all:
    # every position the target scored on the accepted path as well

    def __post_init__(self):
        super().__post_init__()
        if self.update_every < 1 or self.buffer < 1 or self.steps < 1 or self.batch < 1:
            raise ValueError("update_every, buffer, steps and batch must be >= 1")
        if not 0 < self.lr < 1 or self.window < 1 or self.top_k < 1:
            raise ValueError("need 0 < lr < 1, window >= 1 and top_k >= 1")
        if self.positions not in ("rejected", "all"):
            raise ValueError(f"positions must be rejected or all, got {self.positions!r}")


@dataclass
class Learned:
    """What every session of one drafter shares: the buffer, the optimizer, the counts."""

    buffer: deque
    optimizer: torch.optim.Optimizer | None = None
    requests: int = 0
    updates: int = 0
    losses: list = field(default_factory=list)


class OnlineDraft(DraftModel):
    name = "online"
    Params = OnlineParams
    paper = "Online Speculative Decoding (arXiv 2310.07177)"
    summary = ("draft model distilled toward the target while serving, at the positions "
               "where it was rejected (frozen=true: no learning)")

    trainable = True

    def __init__(self, lm, params: OnlineParams):
        super().__init__(lm, params)
        self.learned = Learned(deque(maxlen=params.buffer))
        self.rng = random.Random(0)

    def observe(self, tree, logits, accepted) -> None:
        super().observe(tree, logits, accepted)
        if self.params.frozen or not len(tree):
            return
        # rows[i]: the target's logits after the history and the first i accepted tokens
        rows = [0] + [n + 1 for n in accepted.nodes]
        if self.params.positions == "rejected":  # only where the draft went wrong
            wrong = len(accepted.nodes) < len(tree)
            chosen = [len(rows) - 1] if wrong else []
        else:
            chosen = range(len(rows))
        window = self.params.window
        recent = self.runner.cached[-window:]  # the history this tree was drafted after
        for i in chosen:
            context = (recent + accepted.tokens[:i])[-window:]
            probs = torch.softmax(logits[rows[i]].float(), -1)
            top = probs.topk(min(self.params.top_k, probs.shape[-1]))
            self.learned.buffer.append((context, top.indices.cpu(),
                                        (top.values / top.values.sum()).cpu()))

    def end(self) -> None:
        learned = self.learned
        learned.requests += 1
        if self.params.frozen or learned.requests % self.params.update_every:
            return
        if len(learned.buffer) >= min(self.params.batch, 8):
            self._distill()

    def _distill(self) -> None:
        p, model, learned = self.params, self.draft, self.learned
        with torch.inference_mode(False), torch.enable_grad():
            params = list(model.parameters())
            for w in params:
                w.requires_grad_(True)
            if learned.optimizer is None:
                learned.optimizer = torch.optim.Adam(params, lr=p.lr)
            examples = list(learned.buffer)
            try:
                for _ in range(p.steps):
                    batch = self.rng.sample(examples, min(p.batch, len(examples)))
                    loss = forward_kl(model, batch)
                    learned.optimizer.zero_grad()
                    loss.backward()
                    learned.optimizer.step()
                    learned.losses.append(float(loss.detach()))
            finally:
                for w in params:
                    w.requires_grad_(False)
        learned.updates += 1

    def info(self) -> dict:
        return {"online_updates": self.learned.updates, "online_buffer": len(self.learned.buffer)}


def forward_kl(model, batch: list) -> torch.Tensor:
    """Mean over examples of the cross-entropy of the target's top-k distribution under the
    draft's next-token distribution after each context (forward KL up to a constant)."""
    device = next(model.parameters()).device
    T = max(len(c) for c, _, _ in batch)
    tokens = torch.zeros(len(batch), T, dtype=torch.long)
    valid = torch.zeros(len(batch), T, dtype=torch.bool)
    for i, (context, _, _) in enumerate(batch):  # left-padded: every row ends at T - 1
        tokens[i, T - len(context) :] = torch.tensor(context)
        valid[i, T - len(context) :] = True
    positions = (valid.cumsum(1) - 1).clamp(min=0)  # each context from position 0
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = causal & (valid[:, None, :] | torch.eye(T, dtype=torch.bool))  # pads see themselves
    logits = model(tokens.to(device), positions=positions.to(device), mask=mask.to(device),
                   last_n=1)[:, -1]
    logq = torch.log_softmax(logits.float(), -1)
    ids = torch.stack([t for _, t, _ in batch]).to(device)
    probs = torch.stack([w for _, _, w in batch]).to(device)
    return -(probs * logq.gather(1, ids)).sum(1).mean()
