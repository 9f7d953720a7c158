"""Every generation of `tokenlean bench kv` written down the moment it finishes.

An 8K-token sweep on a CPU runs for hours. With this log an interrupted run (Ctrl-C, a
closed terminal, a crash) loses nothing: `--resume FILE` reads the generations already
done and runs only the rest. The log is JSON lines: a first line naming what the runs
were made with (model, weights digest, dtype, device), then one line per generation,
keyed by the method's label, the sample's token-id digest and its new-token count. A
resumed run on other weights, another dtype or device is refused, and a sample that
changed (another seed, task wording or tokenizer) simply does not match.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenlean.errors import UserError

IDENTITY = ("model", "weights", "dtype", "device")


def _key(label: str, sample) -> str:
    return f"{label}|{sample.digest()}|{sample.max_new_tokens}"


class RunLog:
    def __init__(self, path: str | Path, identity: dict, resume: bool = False):
        self.path, self.done = Path(path), {}
        if resume:
            self._read(identity)
        else:
            try:
                with self.path.open("x", encoding="utf-8") as f:  # never over an earlier log
                    f.write(json.dumps({"identity": identity}) + "\n")
            except OSError as e:
                raise UserError(f"cannot write the run log {self.path}: {e.strerror or e}") from None

    def _read(self, identity: dict) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
            head = json.loads(lines[0])["identity"]
        except FileNotFoundError:
            raise UserError(f"--resume {self.path}: no such file") from None
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"--resume {self.path}: not a bench kv run log") from None
        for field in IDENTITY:
            if head.get(field) != identity.get(field):
                raise UserError(f"--resume {self.path}: its runs were made with {field} "
                                f"{head.get(field)!r}, this run has {identity.get(field)!r}")
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                self.done[entry["key"]] = entry["run"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the interruption: that run is redone

    def get(self, label: str, sample) -> dict | None:
        return self.done.get(_key(label, sample))

    def add(self, label: str, sample, run: dict) -> None:
        key = _key(label, sample)
        self.done[key] = run
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "run": run}) + "\n")
