"""The zoo's corpus: the running interpreter's standard-library source.

Test suites are excluded, and a fixed list of modules is held out for
evaluation (and for benchmarks: code the zoo never trained on). Synthetic
long-range retrieval documents (a value defined at the top of a long code
file, asked for at its end) teach the models to use their whole context.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

# Held out of training, fixed so every run of the recipe holds out the same code.
HELD_OUT = (
    "argparse.py", "bisect.py", "calendar.py", "csv.py", "difflib.py", "fractions.py",
    "heapq.py", "ipaddress.py", "json/decoder.py", "json/encoder.py", "shlex.py",
    "statistics.py", "string.py", "textwrap.py", "tomllib/_parser.py", "uuid.py",
    "zipfile/__init__.py", "zipfile.py", "email/_header_value_parser.py", "ftplib.py",
)
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "lib2to3", "pydoc_data", "turtledemo", "ensurepip", "venv"}
MAX_FILE_BYTES = 400_000  # skip generated data files


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(split: str = "train") -> list[Path]:
    """Sorted .py files of the standard library for `split` ("train" or "heldout")."""
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & EXCLUDED_DIRS or rel.name.startswith("test_"):
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        if (rel.as_posix() in HELD_OUT) == (split == "heldout"):
            files.append(path)
    return files


def read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# --- synthetic long-range retrieval -------------------------------------------------

_WORDS = ("alpha", "beta", "cache", "delta", "epoch", "field", "gamma", "index", "magic",
          "node", "offset", "pass", "port", "quota", "secret", "seed", "token", "user",
          "limit", "level", "code", "key", "salt", "tag", "build", "mode", "retry", "shard")


def random_value(rng: random.Random) -> str:
    """A value as retrieval asks for it: a 5-digit number (70 %) or a quoted 6-character string."""
    if rng.random() < 0.7:
        return str(rng.randint(10_000, 99_999))
    return repr("".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6)))


def retrieval_pair(rng: random.Random, style: str = "repeat") -> tuple[str, str, str]:
    """(header, question, answer): `NAME = VALUE` at the top, asked for at the end.

    style "repeat" (passkey-style, the evaluation's): the question restates `NAME =`
    token for token, so the model must find the earlier `NAME =` and copy what followed.
    style "assert" (tl-code run 1's first 1025 steps): `assert NAME ==`, whose tokens
    (" NAME", " ==") differ from the definition's; no run learned it.
    """
    name = "_".join(rng.sample(_WORDS, rng.choice((1, 2)))).upper()
    value = random_value(rng)
    header = f"{name} = {value}\n\n"
    if style == "assert":
        return header, f"\n\nassert {name} ==", " " + value
    if style == "repeat":
        return header, f"\n\n{name} =", " " + value
    raise ValueError(f"unknown retrieval style {style!r}")
