"""Token Recycling's warm start: an adjacency matrix that exists before the first request.

Luo et al. (arXiv 2408.08696) keep the matrix across all queries; a process that starts
empty pays for that on every short generation (MAT 1.8 on held-out code at 64 tokens).
So each model gets a base matrix:

- a zoo model ships one beside its weights (`recycling-matrix.npy`), built from its own
  training corpus by `build_matrix`;
- any other model gets one built on first use from code of the standard library (the
  zoo's training split), kept in the state directory, keyed by the weights' fingerprint.

What a model then learns while it generates is saved in the state directory too (the
`warm="auto"` mode), and loaded in place of the base matrix by the next process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from tokenlean.zoo import state_dir

SHIPPED_NAME = "recycling-matrix.npy"
BUILD_TOKENS = 16_384  # first-use build for models without a shipped matrix (~25 s on SmolLM2)
WINDOW = 512


_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(model) -> str:
    """A short id of the weights: the config and a sample of the embedding and head
    (computed once per model: the state files of recycling and the cost curve use it)."""
    if model not in _fingerprints:
        _fingerprints[model] = _fingerprint(model)
    return _fingerprints[model]


def _fingerprint(model) -> str:
    h = hashlib.sha1(json.dumps(vars(model.config), sort_keys=True, default=str).encode())
    weights = [(n, t) for n, t in model.state_dict().items() if not t.is_meta]
    for name, tensor in weights[:1] + weights[-1:]:
        h.update(name.encode())
        h.update(tensor.flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def learned_path(lm) -> Path:
    """Where what this model learned while generating is kept between processes."""
    return state_dir() / "recycling" / f"{Path(lm.name).name}-{fingerprint(lm.model)}.npy"


def base_path(lm) -> Path:
    """The matrix every process starts from: shipped beside a zoo model, else built here."""
    folder = Path(lm.folder)
    if folder.is_dir() and (folder / SHIPPED_NAME).is_file():
        return folder / SHIPPED_NAME
    return state_dir() / "recycling" / f"{Path(lm.name).name}-{fingerprint(lm.model)}-base.npy"


def corpus_ids(tokenizer, tokens: int, seed: int = 0) -> list[int]:
    """`tokens` ids of standard-library code (the zoo's training split, never its held-out
    modules), files in a fixed shuffled order."""
    from tokenlean.zoo.corpus import read_source, source_files

    files = source_files("train")
    random.Random(seed).shuffle(files)
    ids: list[int] = []
    for path in files:
        ids += tokenizer.encode(read_source(path))
        if len(ids) >= tokens:
            break
    return ids[:tokens]


@torch.inference_mode()
def build_matrix(model, ids: list[int], k: int, progress: bool = True) -> np.ndarray:
    """(vocab, k) int32: for each token, the k next tokens with the most target probability
    summed over every place it occurs in `ids` (-1 where it never occurs). The summed
    prior is steadier than Token Recycling's own last-seen rule, which then refines it."""
    vocab = model.config.vocab_size
    window = min(WINDOW, model.config.max_position_embeddings)
    rows, cands, probs = [], [], []
    starts = range(0, max(1, len(ids) - 1), window)
    bar = _bar(progress, len(starts), model)
    for start in starts:
        chunk = ids[start : start + window]
        logits = model(torch.tensor([chunk], device=model.device))[0].float()
        top = logits.softmax(-1).topk(k, dim=-1)
        rows.append(np.asarray(chunk))
        cands.append(top.indices.cpu().numpy())
        probs.append(top.values.cpu().numpy())
        bar(1)
    bar(None)
    row = np.repeat(np.concatenate(rows), k)
    cand = np.concatenate(cands).reshape(-1)
    keys, inverse = np.unique(row.astype(np.int64) * vocab + cand, return_inverse=True)
    score = np.bincount(inverse, weights=np.concatenate(probs).reshape(-1))
    order = np.lexsort((-score, keys // vocab))  # by row, best candidate first
    keys = keys[order]
    key_rows = keys // vocab
    rank = np.arange(len(keys)) - np.searchsorted(key_rows, key_rows)  # rank within its row
    keep = rank < k
    matrix = np.full((vocab, k), -1, dtype=np.int32)
    matrix[key_rows[keep], rank[keep]] = (keys % vocab)[keep]
    return matrix


def _bar(enabled: bool, total: int, model):
    """A progress callback: n -> advance, None -> done."""
    if not enabled or total < 4:
        return lambda n: None
    from tokenlean.progress import progress_bar

    bar = progress_bar()
    bar.start()
    task = bar.add_task("building Token Recycling's warm matrix (once per model)", total=total)

    def advance(n):
        if n is None:
            bar.stop()
        else:
            bar.advance(task, n)
    return advance


def base_matrix(lm, k: int) -> np.ndarray | None:
    """The base matrix of `lm` with k columns: loaded, or built and kept on first use.
    None for a model without a text tokenizer (nothing to build from)."""
    path = base_path(lm)
    if path.is_file():
        matrix = np.load(path, allow_pickle=False)
        if matrix.shape[1] >= k:
            return matrix[:, :k].astype(np.int32)  # columns are ranked: the first k are top-k
    if not hasattr(lm.tokenizer, "encode"):
        return None
    ids = corpus_ids(lm.tokenizer, BUILD_TOKENS)
    if len(ids) < 2:
        return None
    if sys.stderr.isatty():
        print(f"tokenlean: building Token Recycling's warm matrix for {lm.name} from "
              f"{len(ids)} tokens of code; kept in {path}", file=sys.stderr)
    matrix = build_matrix(lm.model, ids, k)
    save_atomic(path, matrix)
    return matrix


def save_atomic(path: Path, matrix: np.ndarray) -> None:
    """Write through a temporary file and rename, so a reader (another process, a crash
    mid-write) never sees half a matrix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, matrix)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a shipped file from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_shipped_matrix(lm, name: str, tokens: int = 400_000, k: int = 8) -> Path:
    """Build the matrix a zoo model ships (`tokenlean zoo matrix tl-code`) from `tokens`
    of its corpus; another model's goes where a built one is kept. Returns the path."""
    from tokenlean.zoo import zoo_path

    folder = zoo_path(name)
    out = folder / SHIPPED_NAME if folder else base_path(lm)
    save_atomic(out, build_matrix(lm.model, corpus_ids(lm.tokenizer, tokens), k))
    return out
