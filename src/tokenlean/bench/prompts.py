"""Benchmark prompts: windows of held-out code, exactly `length` tokens each, deterministic.

The held-out modules of the zoo's corpus (code the zoo models never trained on) are
tokenized one file at a time, in sorted order, and cut into consecutive windows of
`length` tokens. Prompts are taken round-robin, window 0 of every file long enough,
then window 1 of every file, ..., so a few prompts already span several files.
The same interpreter (its standard library is the corpus) and the same tokenizer
give the same prompts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tokenlean.errors import UserError
from tokenlean.zoo.corpus import read_source, source_files, stdlib_root


@dataclass(frozen=True)
class Prompt:
    source: str  # the file, relative to the standard library's root
    offset: int  # index of the window's first token in the tokenized file
    ids: list[int]

    def digest(self) -> str:
        """A short fingerprint of the token ids (to tell whether two runs used the same prompts)."""
        return hashlib.sha256(",".join(map(str, self.ids)).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"source": self.source, "offset": self.offset, "tokens": len(self.ids),
                "sha256_16": self.digest()}


def heldout_prompts(tokenizer, count: int, length: int) -> list[Prompt]:
    """`count` prompts of exactly `length` token ids, cut from held-out code.

    `tokenizer` is a `tokenlean.model.tokenizer.Tokenizer` (anything with
    `encode(text, add_special_tokens=False) -> list[int]`). No special tokens are
    added: each prompt is a window in the middle of a file.
    """
    files = source_files("heldout")
    if not files:
        raise UserError("no held-out source files found in this interpreter's standard library")
    return code_windows(tokenizer, files, stdlib_root(), count, length, "the held-out code")


def code_windows(tokenizer, files: list[Path], root: Path, count: int, length: int,
                 what: str = "the source") -> list[Prompt]:
    """`count` windows of exactly `length` token ids from `files` (sorted, read as UTF-8),
    round-robin: window 0 of every file long enough, then window 1, ... Each file is
    tokenized on first use; `Prompt.source` is its path relative to `root`."""
    if count < 1 or length < 1:
        raise UserError(f"need at least one prompt of at least one token, got {count} x {length}")
    tokenized: dict[int, list[int]] = {}  # file index -> ids, tokenized on first use
    prompts: list[Prompt] = []
    window = 0
    while len(prompts) < count:
        found = False
        for i, path in enumerate(files):
            if i not in tokenized:
                tokenized[i] = tokenizer.encode(read_source(path), add_special_tokens=False)
            ids = tokenized[i]
            start = window * length
            if start + length > len(ids):
                continue
            found = True
            prompts.append(Prompt(path.relative_to(root).as_posix(), start,
                                  ids[start : start + length]))
            if len(prompts) == count:
                break
        if not found:
            raise UserError(f"{what} holds only {len(prompts)} windows of {length} "
                            f"tokens; ask for fewer prompts or shorter ones")
        window += 1
    return prompts
