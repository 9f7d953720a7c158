"""Turn a training run into a shipped zoo model: export (HF format) and model card."""

from __future__ import annotations

import json
import platform
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokenlean.errors import UserError
from tokenlean.progress import progress_bar
from tokenlean.zoo import ZOO_DIR
from tokenlean.zoo.corpus import HELD_OUT, retrieval_pair
from tokenlean.zoo.recipe import SPECS, token_stream, tokenizer_files, work_dir

RETRIEVAL_LENGTHS = (512, 1024, 2048)
# Prompts end at the colon, not a newline: the tokenizer merges a newline with the indent
# after it, so a lone trailing "\n" reads as a blank line and derails the completion.
SAMPLE_PROMPTS = (
    "def fibonacci(n):",
    "class Stack:\n    \"\"\"A last-in first-out stack.\"\"\"\n\n    def __init__(self):",
    "import os\n\n\ndef list_python_files(root):",
)


def _spec(name: str):
    if name not in SPECS:
        raise UserError(f"unknown zoo model {name!r}; the recipe has: {', '.join(SPECS)}")
    return SPECS[name]


def export(name: str, out: Path | None = None) -> Path:
    """The run's last checkpoint -> zoo/models/NAME (config, fp16 safetensors, tokenizer)."""
    from tokenlean.model.load import save_model
    from tokenlean.zoo.train import new_model

    spec = _spec(name)
    ckpt = work_dir() / name / "ckpt.pt"
    if not ckpt.exists():
        raise UserError(f"no checkpoint for {name} at {ckpt}; run: tokenlean zoo train {name}")
    model = new_model(spec)
    model.load_state_dict(torch.load(ckpt, map_location="cpu")["model"])
    folder = Path(out) if out else ZOO_DIR / name
    save_model(model, folder, dtype=torch.float16)
    tokenizer_files(folder, work_dir() / "tokenizer.json", spec.context)
    print(f"exported {name} -> {folder}")
    return folder


def training_summary(name: str) -> dict:
    """Steps, tokens and compute time, read from the run's log (summed across sessions)."""
    log = work_dir() / name / "log.jsonl"
    if not log.exists():
        return {}
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in records}  # a resumed step logged twice counts once
    spec = SPECS[name]
    tokens_per_step = spec.batch * spec.context
    seconds = sum(tokens_per_step / r["tok_s"] for r in by_step.values() if r.get("tok_s"))
    last = max(by_step)
    return {"train_steps": last, "train_tokens": last * tokens_per_step,
            "train_hours": round(seconds / 3600, 2)}


@torch.no_grad()
def next_token_metrics(lm, stream: np.ndarray, context: int, starts) -> tuple[float, float, int]:
    """Mean loss, top-1 accuracy and token count over windows of `stream` at `starts`."""
    total_loss, hits, count = 0.0, 0, 0
    for start in starts:
        x = torch.from_numpy(stream[start : start + context + 1].astype(np.int64))[None]
        if x.shape[1] < 2:
            break
        logits = lm.model(x[:, :-1]).float()[0]
        total_loss += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        hits += (logits.argmax(-1) == x[0, 1:]).sum().item()
        count += x.shape[1] - 1
    return total_loss / count, hits / count, count


def heldout_metrics(lm, context: int) -> dict:
    """Loss, perplexity and next-token top-1 accuracy over every held-out token."""
    stream = token_stream("heldout", work_dir() / "tokenizer.json")
    loss, top1, count = next_token_metrics(lm, stream, context, range(0, len(stream) - 1, context))
    return {"heldout_tokens": count, "heldout_loss": round(loss, 4),
            "heldout_perplexity": round(float(np.exp(loss)), 3), "heldout_top1": round(top1, 4)}


def train_split_metrics(lm, context: int, windows: int = 32) -> dict:
    """The same on evenly spaced windows of the training split: the gap to the held-out
    figures shows how much of what the model predicts it has memorised."""
    stream = token_stream("train", work_dir() / "tokenizer.json")
    starts = np.linspace(0, len(stream) - context - 1, windows).astype(int)
    loss, top1, count = next_token_metrics(lm, stream, context, starts)
    return {"train_split_tokens": count, "train_split_loss": round(loss, 4),
            "train_split_top1": round(top1, 4)}


def retrieval_accuracy(lm, length: int, samples: int, seed: int = 1234) -> float:
    """Passkey-style: `NAME = VALUE` at the top of ~length tokens of held-out code, asked at the end."""
    stream = token_stream("heldout", work_dir() / "tokenizer.json")
    rng = random.Random(seed + length)
    correct = 0
    for _ in range(samples):
        header, question, answer = retrieval_pair(rng)
        head, tail = lm.tokenizer.encode(header), lm.tokenizer.encode(question)
        room = len(lm.tokenizer.encode(answer)) + 1  # prompt + answer fit in `length`
        n_filler = length - len(head) - len(tail) - room
        start = rng.randrange(len(stream) - n_filler)
        prompt = head + stream[start : start + n_filler].tolist() + tail
        out = lm.generate(prompt, max_new_tokens=room)
        correct += bool(re.match(rf"\s*{re.escape(answer.strip())}(?!\w)", out.text))
    return correct / samples


@torch.no_grad()
def copy_probability(lm, samples: int = 16, span: int = 32, seed: int = 99) -> float:
    """Induction check: 100 tokens of held-out code, 32 random tokens, 200 more tokens of
    code, the same 32 again. The mean probability the model gives the repeat's tokens (its
    first excepted): chance is 1/vocab; a model that copies gets near 1. Retrieval needs
    this mechanism. (Code comes first because a document never opens with random tokens in
    training: opened that way, run 3 gave the repeat chance probability.)"""
    stream = token_stream("heldout", work_dir() / "tokenizer.json")
    rng = np.random.default_rng(seed)
    vocab = lm.model.config.vocab_size
    total = 0.0
    for _ in range(samples):
        tokens = rng.integers(16, vocab, span)
        start = int(rng.integers(0, len(stream) - 300))
        before, between = stream[start : start + 100], stream[start + 100 : start + 300]
        ids = np.concatenate([before, tokens, between, tokens]).astype(np.int64)
        x = torch.from_numpy(ids)[None]
        probs = lm.model(x[:, :-1])[0, -span + 1 :].float().softmax(-1)  # the repeat's rows
        total += probs.gather(1, x[0, -span + 1 :, None]).mean().item()
    return total / samples


def write_card(name: str, quick: bool = False) -> dict:
    from tokenlean.lm import load

    spec = _spec(name)
    lm = load(name, device="cpu", dtype="fp32")
    t0 = time.time()
    card = {
        "name": name,
        "architecture": "llama",
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "context": spec.context,
        "vocab_size": lm.model.config.vocab_size,
        **training_summary(name),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"{platform.processor() or 'cpu'}; Python {platform.python_version()}",
    }
    samples = 20 if quick else 100
    card["retrieval_samples"] = samples
    stages = [
        ("held-out loss and top-1", lambda: heldout_metrics(lm, spec.context)),
        ("training-split loss and top-1",
         lambda: train_split_metrics(lm, spec.context, windows=4 if quick else 32)),
        ("copying probe", lambda: {"copy_probability": round(copy_probability(lm), 4)}),
        *[(f"retrieval at {n} tokens ({samples} prompts)",
           lambda n=n: {f"retrieval_{n}": retrieval_accuracy(lm, n, samples)})
          for n in RETRIEVAL_LENGTHS if n <= spec.context],
        ("sample completions", lambda: {"samples": [
            {"prompt": p, "completion": lm.generate(p, max_new_tokens=64).text}
            for p in SAMPLE_PROMPTS]}),
    ]
    # the evaluation takes minutes on a CPU: say which part is running (on stderr, transient)
    with progress_bar() as progress:
        bar = progress.add_task("", total=len(stages))
        for label, measure in stages:
            progress.update(bar, description=f"card {name}: {label}")
            card.update(measure())
            progress.advance(bar)
    card["eval_seconds"] = round(time.time() - t0, 1)
    folder = ZOO_DIR / name
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    render_card(name)
    print(json.dumps({k: v for k, v in card.items() if k != "samples"}, indent=2))
    return card


def render_card(name: str) -> None:
    """README.md of a zoo model from its card.json and the recipe's notes."""
    folder = ZOO_DIR / name
    card = json.loads((folder / "card.json").read_text())
    (folder / "README.md").write_text(card_markdown(card, _spec(name)))


def card_markdown(card: dict, spec) -> str:
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    lines = [
        f"# {card['name']}",
        "",
        f"A {card['parameters'] / 1e6:.1f} M-parameter Llama-architecture code model trained by "
        "tokenlean's deterministic zoo recipe (`tokenlean zoo train "
        f"{card['name']}`) on the Python standard library's source (test suites and a fixed "
        "held-out list excluded), with synthetic long-range retrieval documents mixed in.",
        "",
        "| | |", "|---|---|",
        f"| layers / hidden / heads / kv heads | {spec.num_hidden_layers} / {spec.hidden_size} / "
        f"{spec.num_attention_heads} / {spec.num_key_value_heads} |",
        f"| context | {card['context']} |",
        f"| vocabulary | {card['vocab_size']} (byte-level BPE) |",
        f"| training | {card.get('train_steps', '?')} steps, "
        f"{card.get('train_tokens', 0) / 1e6:.1f} M tokens, {card.get('train_hours', '?')} h |",
        f"| machine | {card['machine']} |",
        f"| held-out loss / perplexity | {card['heldout_loss']} / {card['heldout_perplexity']} "
        f"({card['heldout_tokens']} tokens) |",
        f"| held-out next-token top-1 | {pct(card['heldout_top1'])} |",
    ]
    if "train_split_top1" in card:
        lines.append(f"| training-split loss / top-1 (memorisation check) | "
                     f"{card['train_split_loss']} / {pct(card['train_split_top1'])} "
                     f"({card['train_split_tokens']} tokens) |")
    if "copy_probability" in card:
        lines.append(f"| copying: probability of a repeated random span | "
                     f"{card['copy_probability']:.3f} (chance {1 / card['vocab_size']:.5f}) |")
    for length in (n for n in RETRIEVAL_LENGTHS if f"retrieval_{n}" in card):
        lines.append(f"| retrieval accuracy @ {length} tokens | {pct(card[f'retrieval_{length}'])} "
                     f"({card['retrieval_samples']} prompts) |")
    lines += ["", "Held-out modules: " + ", ".join(f"`{m}`" for m in HELD_OUT), ""]
    if spec.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in spec.notes], ""]
    lines += ["## Samples (greedy, 64 tokens)", ""]
    for s in card["samples"]:
        lines += ["```python", s["prompt"] + s["completion"], "```", ""]
    return "\n".join(lines)


def train_command(name: str, steps: int | None, threads: int, then_export: bool = True) -> None:
    from tokenlean.zoo.train import train

    _spec(name)
    train(name, steps=steps, threads=threads)
    if then_export:
        export(name)
        write_card(name, quick=steps is not None and steps < 100)
