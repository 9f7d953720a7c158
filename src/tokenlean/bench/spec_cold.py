"""`bench spec --cold`: the case a user meets, a fresh `tokenlean generate` process per call.

The in-process benchmark repeats prompts and lets learned state (Token Recycling's
matrix) carry over between them. Here every (prompt, method) pair runs in a new
process with nothing warmed but what ships (`warm=base`), and the figures are those
the process reports itself: MAT, tokens/s over prefill and decode, exactness against
a cold greedy run of the same prompt.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenlean.errors import UserError


def generate_cold(model: str, prompt: str, n_new: int, method: str, options: list[str],
                  threads: int | None) -> dict:
    """One fresh process; its --json result."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(prompt)
    cmd = [sys.executable, "-m", "tokenlean.cli", "generate", "--model", model, "--prompt-file",
           f.name, "-n", str(n_new), "--method", method, "--json", "--no-stream"]
    cmd += [a for o in options for a in ("--method-arg", o)]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    finally:
        Path(f.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise UserError(f"cold run of {method} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def run_cold(model: str, prompts: dict[str, list[str]], systems, n_new: int,
             threads: int | None, progress=None) -> dict:
    """prompts: task -> prompt texts (a chat prompt already in its template). Returns task -> label -> figures (medians over the
    prompts: MAT, tokens/s, speedup vs greedy on the same prompt, exact on all)."""
    out: dict[str, dict] = {}
    for task, texts in prompts.items():
        rows: dict[str, list[dict]] = {s.label: [] for s in systems}
        for text in texts:
            greedy = None
            for system in systems:
                got = generate_cold(model, text, n_new, system.method, system.options, threads)
                if system.label == "greedy":
                    greedy = got
                rows[system.label].append({
                    "mat": got["stats"]["mean_accepted_tokens"],
                    "tokens_per_s": got["stats"]["tokens_per_s"],
                    "speedup": got["stats"]["tokens_per_s"] / greedy["stats"]["tokens_per_s"],
                    "exact": got["token_ids"] == greedy["token_ids"],
                    "tokens": len(got["token_ids"]),
                })
                if progress:
                    progress()
        out[task] = {label: {
            "mat": round(statistics.median(r["mat"] for r in runs), 3),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 2),
            "speedup": round(statistics.median(r["speedup"] for r in runs), 3),
            "exact": all(r["exact"] for r in runs),
            "runs": runs,
        } for label, runs in rows.items()}
    return out


def cold_markdown(results: dict, labels: list[str]) -> str:
    head = "| task | " + " | ".join(labels) + " |"
    rows = [head, "|" + "---|" * (len(labels) + 1)]
    for task, by_label in results.items():
        cells = []
        for label in labels:
            r = by_label[label]
            cell = f"{r['tokens_per_s']} tok/s" if label == "greedy" else \
                f"{r['speedup']:.2f}x (MAT {r['mat']:.2f})" + ("" if r["exact"] else " INEXACT")
            cells.append(cell)
        rows.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
