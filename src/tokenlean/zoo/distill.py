"""FastDraft-style distillation data: the target's own continuations of corpus prompts.

FastDraft (Zafrir et al., "FastDraft: How to Train Your Draft", arXiv 2411.11055)
pretrains a small draft on the corpus, then aligns it to the target by training
on text the target generated. We do both at once: the draft's training mixture
holds corpus windows and target continuations side by side.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from tokenlean.progress import progress_bar
from tokenlean.sampling import SamplingParams, probabilities, sample


@torch.inference_mode()
def target_continuations(target, stream: np.ndarray, eos: int, n_tokens: int, prompt_len: int = 128,
                         new_len: int = 384, batch: int = 16, temperature: float = 0.7,
                         seed: int = 0) -> np.ndarray:
    """About n_tokens of (corpus prompt + sampled target continuation) rows, joined by EOS."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=temperature)
    rows, total = [], 0
    with progress_bar() as progress:
        task = progress.add_task("target continuations", total=n_tokens)
        while total < n_tokens:
            starts = rng.integers(0, len(stream) - prompt_len, batch)
            prompts = torch.from_numpy(np.stack([stream[s : s + prompt_len] for s in starts]).astype(np.int64))
            cache = target.new_cache(prompt_len + new_len, batch=batch)
            logits = target(prompts, cache=cache, last_n=1)[:, -1]  # (B, V)
            generated = []
            for _ in range(new_len):
                token = sample(probabilities(logits, params), generator)  # (B,)
                generated.append(token)
                logits = target(token[:, None], cache=cache)[:, -1]
            block = torch.cat([prompts, torch.stack(generated, 1)], 1).numpy()  # (B, prompt + new)
            for row in block:
                rows.append(np.append(row, eos))
            total += block.size
            progress.update(task, advance=block.size)
    return np.concatenate(rows).astype(np.uint16)


def cached_continuations(folder: Path, target_folder: Path, stream: np.ndarray, eos: int,
                         n_tokens: int) -> np.ndarray:
    """Generate once per target weights; later runs (and resumes) read the file."""
    from tokenlean.model.load import load_model

    weights = (target_folder / "model.safetensors").read_bytes()
    digest = hashlib.sha256(weights).hexdigest()[:12]
    path = folder / f"distill-{digest}-{n_tokens}.npy"
    if path.exists():
        return np.load(path)
    target = load_model(target_folder, device="cpu", dtype="fp32")
    data = target_continuations(target, stream, eos, n_tokens)
    np.save(path, data)
    return data
