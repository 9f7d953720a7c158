"""Train a zoo model on CPU, checkpointing as it goes and resuming where it stopped.

The batch of step s (and its dropout masks) is a pure function of (seed, s), so a
run interrupted and resumed any number of times gives the same model as one
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress, TextColumn

from tokenlean.errors import UserError
from tokenlean.model import ModelConfig, Transformer
from tokenlean.zoo.corpus import random_value, retrieval_pair
from tokenlean.zoo.recipe import (
    EOS,
    SPECIAL_TOKENS,
    SPECS,
    ModelSpec,
    token_stream,
    train_tokenizer,
    work_dir,
)

CHECKPOINT_EVERY = 25
NGRAM_ALPHABET = 16  # tokens per row in "ngram" copy rows


def lr_at(spec: ModelSpec, step: int) -> float:
    """Warmup-stable-decay: the stable checkpoint can be extended later without a restart."""
    decay_start = int(spec.steps * (1 - spec.decay_fraction))
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    if step < decay_start:
        return spec.lr
    return spec.lr * max(0.02, (spec.steps - step) / (spec.steps - decay_start))


class Batches:
    """Random windows of the token stream, plus synthetic retrieval documents."""

    def __init__(self, spec: ModelSpec, stream: np.ndarray, tokenizer, extra: np.ndarray | None):
        self.spec, self.stream, self.tok, self.extra = spec, stream, tokenizer, extra
        self.eos = tokenizer.token_to_id(EOS)

    def window(self, rng: np.random.Generator, n: int, source: np.ndarray | None = None):
        source = self.stream if source is None else source
        start = int(rng.integers(0, len(source) - n))
        return source[start : start + n].astype(np.int64)

    def retrieval(self, rng: np.random.Generator, n: int, count: int = 1,
                  style: str = "repeat", layout: str = "block") -> np.ndarray:
        """`count` definitions at the top of a code window, questions (in another order) at
        its end ("block") or each at a random point of the code ("scattered")."""
        pairs = self._distinct_pairs(random.Random(int(rng.integers(1 << 62))), count, style)
        head = self.tok.encode("".join(header for header, _, _ in pairs)).ids
        # one pair draws no permutation, so run 1's random stream (and batches) stay as they were
        asked = [pairs[i] for i in rng.permutation(len(pairs))] if len(pairs) > 1 else pairs
        if layout == "scattered":
            return self._scattered(rng, n, head, asked)
        if layout != "block":  # a misspelt recipe must not train silently on the default
            raise ValueError(f"unknown retrieval layout {layout!r}")
        tail = self.tok.encode("".join(q + a + "\n" for _, q, a in asked)).ids
        length = int(rng.integers(min(128, n // 4), n - 16))  # definition-to-question distance
        filler = self.window(rng, max(1, length - len(head) - len(tail)))
        doc = np.concatenate([head, filler, tail, [self.eos]])
        rest = self.window(rng, max(0, n - len(doc)))
        return np.concatenate([doc, rest])[:n]

    def _scattered(self, rng: np.random.Generator, n: int, head, asked) -> np.ndarray:
        """Each question follows code at a random point of a full-length row, as the
        evaluation's single question does, at every distance from the definitions."""
        questions = [self.tok.encode(q + a + "\n").ids for _, q, a in asked]
        filler = self.window(rng, max(1, n - len(head) - sum(map(len, questions))))
        cuts = np.sort(rng.integers(0, len(filler) + 1, len(questions)))
        parts, last = [head], 0
        for cut, question in zip(cuts, questions):
            parts += [filler[last:cut], question]
            last = cut
        parts.append(filler[last:])
        return np.concatenate(parts).astype(np.int64)[:n]

    def copy(self, rng: np.random.Generator, n: int, repeats: int = 2,
             source: str = "code") -> np.ndarray:
        """A span recurring `repeats` times between other code: every occurrence after the
        first is predictable only by finding and copying an earlier one (what retrieval needs).
        source "code": one code span; "random" / "ngram": see random_copies; "values": see
        value_copies."""
        if source in ("random", "ngram"):
            return self.random_copies(rng, n, repeats, NGRAM_ALPHABET if source == "ngram" else 0)
        if source == "values":
            return self.value_copies(rng, n, repeats)
        if source != "code":
            raise ValueError(f"unknown copy source {source!r}")
        longest = min(257, n // (repeats + 1))  # 32-256 tokens where the row has room
        span = self.window(rng, int(rng.integers(min(32, longest - 1), longest)))
        parts = [span]
        room = n - repeats * len(span)
        for _ in range(repeats - 1):
            parts += [self.window(rng, int(rng.integers(0, room // (repeats - 1)))), span]
        parts.append(self.window(rng, max(1, n - sum(map(len, parts)))))
        return np.concatenate(parts)[:n]

    def random_copies(self, rng: np.random.Generator, n: int, repeats: int,
                      alphabet: int = 0) -> np.ndarray:
        """Spans of 8-64 random tokens, each recurring `repeats` times with code in between.
        Nothing but the earlier occurrence predicts a random token, so these rows reward the
        copying (induction) mechanism alone, densely: ~20 % of a row's tokens. With an
        `alphabet`, a row's spans draw from that many tokens only, so a token recurs within
        and across spans and only a match on several tokens finds the place to copy from
        (as `NAME =` must be matched whole among the code's many `=`)."""
        low, high = len(SPECIAL_TOKENS), self.tok.get_vocab_size()
        letters = rng.choice(np.arange(low, high), alphabet, replace=False) if alphabet else None

        def span():
            length = int(rng.integers(8, 65))
            return rng.choice(letters, length) if alphabet else rng.integers(low, high, length)

        return self._recurring(rng, n, repeats, span)

    def value_copies(self, rng: np.random.Generator, n: int, repeats: int) -> np.ndarray:
        """Spans of 2-8 random values of the kind retrieval asks for (` 76510 'k3x9qa'`),
        each recurring `repeats` times with code in between. Their tokens are alike (digit
        pairs, letter pieces), so copying them right takes an exact match and an exact copy:
        where tl-code run 5 missed retrieval, it had found the definition and then guessed a
        look-alike of the value's middle token ("65" -> "14")."""
        values = random.Random(int(rng.integers(1 << 62)))

        def span():
            text = "".join(" " + random_value(values) for _ in range(int(rng.integers(2, 9))))
            return np.asarray(self.tok.encode(text).ids, dtype=np.int64)

        return self._recurring(rng, n, repeats, span)

    def _recurring(self, rng: np.random.Generator, n: int, repeats: int, new_span) -> np.ndarray:
        """A row of spans from `new_span()`, each recurring `repeats` times, every occurrence
        after 1-127 tokens of code."""
        parts, used = [], 0
        while used < n:
            span = new_span()
            for _ in range(repeats):
                parts += [self.window(rng, int(rng.integers(1, 128))), span]
                used += len(parts[-2]) + len(span)
        return np.concatenate(parts)[:n]

    def _distinct_pairs(self, rng: random.Random, count: int, style: str) -> list[tuple[str, str, str]]:
        """`count` (NAME, VALUE) pairs with distinct names."""
        pairs: dict[str, tuple[str, str, str]] = {}
        for _ in range(20 * count):
            pair = retrieval_pair(rng, style)
            pairs.setdefault(pair[0].split(" = ")[0], pair)
            if len(pairs) == count:
                break
        return list(pairs.values())

    def __call__(self, step: int) -> torch.Tensor:
        spec = self.spec.at(step)
        rng = np.random.default_rng([spec.seed, step])
        n = spec.context + 1
        rows = []
        for _ in range(spec.batch):
            u = rng.random()
            if u < spec.retrieval_fraction:
                rows.append(self.retrieval(rng, n, spec.retrieval_pairs, spec.retrieval_style,
                                              spec.retrieval_layout))
            elif u < spec.retrieval_fraction + spec.copy_fraction:
                rows.append(self.copy(rng, n, spec.copy_repeats, spec.copy_source))
            elif self.extra is not None and u < 0.5 + spec.retrieval_fraction / 2:
                rows.append(self.window(rng, n, self.extra))
            else:
                rows.append(self.window(rng, n))
        return torch.from_numpy(np.stack(rows))


def distillation_data(spec: ModelSpec, run: Path, stream: np.ndarray, eos: int) -> np.ndarray:
    from tokenlean.zoo import zoo_path
    from tokenlean.zoo.distill import cached_continuations

    target = zoo_path(spec.distill_from)
    if target is None:
        raise UserError(f"{spec.name} is distilled from {spec.distill_from}, which is not in the "
                        f"zoo yet: run tokenlean zoo train {spec.distill_from} first")
    return cached_continuations(run, target, stream, eos, spec.distill_tokens)


def new_model(spec: ModelSpec) -> Transformer:
    torch.manual_seed(spec.seed)
    model = Transformer(ModelConfig.from_hf(spec.hf_config()))
    for name, p in model.named_parameters():  # small init (GPT-2 style), residual outputs scaled
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * spec.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)
    if spec.dropout or any("dropout" in changes for _, changes in spec.stages):
        add_residual_dropout(model, spec.dropout)
    return model


def add_residual_dropout(model: Transformer, p: float) -> None:
    """Dropout on each attention and MLP output while the model trains (GPT-2 style), for a
    corpus the model sees many times over; eval() turns it off, and export ignores it.
    The rate is read at each call from `model.residual_dropout`, so a stage can change it."""
    model.residual_dropout = p
    for layer in model.model.layers:
        for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
            module.register_forward_hook(
                lambda m, inputs, out: F.dropout(out, model.residual_dropout, m.training))


@torch.no_grad()
def heldout_loss(model: Transformer, heldout: np.ndarray, context: int, windows: int = 8) -> tuple[float, float]:
    """Mean next-token loss and top-1 accuracy on fixed held-out windows."""
    model.eval()
    starts = np.linspace(0, len(heldout) - context - 1, windows).astype(int)
    losses, hits, total = [], 0, 0
    for s in starts:
        x = torch.from_numpy(heldout[s : s + context + 1].astype(np.int64))[None]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[:, :-1]).float()
        losses.append(F.cross_entropy(logits[0], x[0, 1:]).item())
        hits += (logits[0].argmax(-1) == x[0, 1:]).sum().item()
        total += context
    model.train()
    return float(np.mean(losses)), hits / total


def kv_heads(model: Transformer) -> int:
    return model.config.num_key_value_heads


def head_dim(spec: ModelSpec) -> int:
    return spec.hidden_size // spec.num_attention_heads


def model_and_optimizer(spec: ModelSpec, state: dict | None = None):
    """The model and its AdamW, fresh or from a checkpoint `state`, in the checkpoint's
    layout (a run regrouped later, `kv_heads_before`, starts with fewer KV heads)."""
    if state is not None:
        k_rows = state["model"]["model.layers.0.self_attn.k_proj.weight"].shape[0]
        spec = replace(spec, num_key_value_heads=k_rows // head_dim(spec))
    elif spec.kv_heads_before:
        spec = replace(spec, num_key_value_heads=spec.kv_heads_before[1])
    model = new_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    return model, opt


def regrouped(spec: ModelSpec, model: Transformer, opt):
    """Model and optimiser moved to the spec's KV head count (zoo.regroup)."""
    from tokenlean.zoo.regroup import regroup

    names = [name for name, _ in model.named_parameters()]
    weights, moments = regroup(model.state_dict(), opt.state_dict(), names, spec.num_attention_heads,
                               head_dim(spec), kv_heads(model), spec.num_key_value_heads)
    model, opt = model_and_optimizer(spec, {"model": weights, "opt": moments})
    model.train()
    return model, opt


def save_checkpoint(path: Path, model, opt, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)


def train(name: str, steps: int | None = None, threads: int = 2, log=print,
          extra: np.ndarray | None = None, stop_at: int | None = None) -> Path:
    """Train (or resume) zoo model `name`; `stop_at` ends this run early at that step."""
    from tokenizers import Tokenizer

    spec = SPECS[name]
    if steps:
        spec = replace(spec, steps=steps)
    torch.set_num_threads(threads)
    root = work_dir()
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    tok_path = train_tokenizer(root)
    tokenizer = Tokenizer.from_file(str(tok_path))
    stream, heldout = token_stream("train", tok_path), token_stream("heldout", tok_path)
    if spec.distill_from and extra is None:
        extra = distillation_data(spec, run, stream, tokenizer.token_to_id(EOS))
    batches = Batches(spec, stream, tokenizer, extra)

    ckpt, step, state = run / "ckpt.pt", 0, None
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")
        step = state["step"]
        log(f"{name}: resumed at step {step}/{spec.steps}")
    model, opt = model_and_optimizer(spec, state)
    model.train()
    decay_start = int(spec.steps * (1 - spec.decay_fraction))
    end = min(spec.steps, stop_at or spec.steps)
    progress = Progress(*Progress.get_default_columns(), TextColumn("{task.fields[info]}"),
                        disable=not sys.stderr.isatty())  # log files get the lines below
    task = progress.add_task(f"training {name}", total=end, completed=step, info="")
    with open(run / "log.jsonl", "a") as logf, progress:
        t0 = time.time()
        while step < end:
            if spec.kv_heads_before and step >= spec.kv_heads_before[0] and kv_heads(model) != spec.num_key_value_heads:
                model, opt = regrouped(spec, model, opt)
                log(f"{name}: regrouped to {spec.num_key_value_heads} KV heads at step {step}")
            for group in opt.param_groups:
                group["lr"] = lr_at(spec, step)
            if hasattr(model, "residual_dropout"):  # the rate in force at this step (stages)
                model.residual_dropout = spec.at(step).dropout
            x = batches(step)
            torch.manual_seed(spec.seed * 1_000_003 + step)  # dropout masks: a function of the step too
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "loss": round(loss.item(), 4), "lr": lr_at(spec, step - 1),
                      "tok_s": round(x[:, 1:].numel() / (time.time() - t0)), "time": time.time()}
            t0 = time.time()
            if step % 100 == 0 or step == spec.steps:
                record["heldout_loss"], record["heldout_top1"] = heldout_loss(model, heldout, spec.context)
            logf.write(json.dumps(record) + "\n")
            logf.flush()
            progress.update(task, completed=step, info=f"loss {record['loss']:.3f}")
            if step % CHECKPOINT_EVERY == 0 or step in (end, decay_start):
                save_checkpoint(ckpt, model, opt, step)
                if step == decay_start:  # extendable: resume here with more steps
                    save_checkpoint(run / "ckpt-stable.pt", model, opt, step)
                log(f"{name}: step {step}/{spec.steps} loss {record['loss']:.3f}")
    return ckpt


if __name__ == "__main__":
    import sys

    train(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
