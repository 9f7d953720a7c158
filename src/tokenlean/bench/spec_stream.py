"""`bench spec --stream`: a stream of requests served one after another by one process.

What a drafter learns across requests (online's distilled draft, Token Recycling's
matrix, SuffixDecoding's store) only shows over a stream. Every method starts from
what ships (fresh drafters on the same weights) and serves the task's prompts in order,
`--stream-passes` times over (passes > 1: the same kind of request again and again, a
repeated-task stream). Per request: MAT, acceptance (accepted / drafted tokens),
decode tokens/s and exactness against greedy on the same prompt. Per method: the
first and last quarter of the stream, and a PNG of MAT along it.
"""

from __future__ import annotations

import statistics
from pathlib import Path


def run_stream(lm, prompts: list[list[int]], systems, n_new: int, passes: int,
               progress=None) -> dict:
    """label -> {"requests": [...], summary figures}; greedy runs once per prompt."""
    from tokenlean.lm import LM

    reference = {}
    out: dict[str, dict] = {}
    for system in systems:
        served = LM(lm.name, lm.folder, lm.model, lm.tokenizer)  # fresh drafters: as shipped
        rows = []
        for p in range(passes):
            for i, ids in enumerate(prompts):
                if system.method == "greedy" and i in reference:
                    result = reference[i]  # greedy learns nothing: one run per prompt
                else:
                    result = served.generate(ids, n_new, method=system.method,
                                             method_args=system.options or None,
                                             stop_token_ids=[])
                if system.method == "greedy":
                    reference.setdefault(i, result)
                rows.append(_row(len(rows), p, i, result))
                if progress:
                    progress()
        out[system.label] = {"requests": rows}
    for entry in out.values():
        rows = entry["requests"]
        for row in rows:
            greedy = reference.get(row["prompt"])
            row["exact"] = greedy is not None and row.pop("_ids") == greedy.token_ids
            row["speedup"] = (round(row["tokens_per_s"] / _tps(greedy), 3)
                              if greedy is not None and _tps(greedy) else None)
        entry.update(summarize(rows))
    return out


def _tps(result) -> float:
    return result.stats.get("decode_tokens_per_s") or 0.0


def _row(index: int, p: int, prompt: int, result) -> dict:
    s = result.stats
    drafted = s.get("drafted_tokens", 0)
    return {"request": index, "pass": p, "prompt": prompt,
            "mat": round(s.get("mean_accepted_tokens", 1.0), 3),
            "acceptance": round(s.get("accepted_tokens", 0) / drafted, 3) if drafted else None,
            "tokens_per_s": round(_tps(result), 2), "_ids": result.token_ids}


def summarize(rows: list[dict]) -> dict:
    q = max(1, len(rows) // 4)

    def mean(values):
        values = [v for v in values if v is not None]
        return round(statistics.fmean(values), 3) if values else None

    return {"mat_first_quarter": mean(r["mat"] for r in rows[:q]),
            "mat_last_quarter": mean(r["mat"] for r in rows[-q:]),
            "acceptance_first_quarter": mean(r["acceptance"] for r in rows[:q]),
            "acceptance_last_quarter": mean(r["acceptance"] for r in rows[-q:]),
            "mat": mean(r["mat"] for r in rows),
            "speedup_median": (round(statistics.median(s), 3)
                               if (s := [r["speedup"] for r in rows if r["speedup"]]) else None),
            "speedup_last_quarter": mean(r["speedup"] for r in rows[-q:]),
            "exact": all(r["exact"] for r in rows)}


def stream_markdown(results: dict) -> str:
    rows = ["| method | MAT first 1/4 | MAT last 1/4 | acceptance first / last 1/4 | "
            "speedup (median) | speedup last 1/4 | exact |", "|---|---|---|---|---|---|---|"]

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    for label, r in results.items():
        rows.append(f"| {label} | {f(r['mat_first_quarter'])} | {f(r['mat_last_quarter'])} | "
                    f"{f(r['acceptance_first_quarter'])} / {f(r['acceptance_last_quarter'])} | "
                    f"{f(r['speedup_median'], '{:.2f}x')} | "
                    f"{f(r['speedup_last_quarter'], '{:.2f}x')} | "
                    f"{'yes' if r['exact'] else 'NO'} |")
    return "\n".join(rows)


def plot_stream(result: dict, path: Path) -> tuple[Path | None, str | None]:
    """MAT along the stream (a running mean over 4 requests), one line per method."""
    from tokenlean.bench.plot import _pyplot

    plt = _pyplot()
    if plt is None:
        return None, "plot skipped: matplotlib is not installed (pip install 'tokenlean[bench]')"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, entry in result["results"].items():
        mats = [r["mat"] for r in entry["requests"]]
        smooth = [statistics.fmean(mats[max(0, i - 3): i + 1]) for i in range(len(mats))]
        ax.plot(range(1, len(mats) + 1), smooth, label=label)
    passes = result["passes"]
    if passes > 1:
        per = len(next(iter(result["results"].values()))["requests"]) // passes
        for p in range(1, passes):
            ax.axvline(p * per + 0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("request in the stream" + (f" ({passes} passes over the prompts)"
                                             if passes > 1 else ""))
    ax.set_ylabel("mean accepted tokens / step (running mean of 4)")
    ax.set_title(f"{Path(result['model']).name}: {result['task']} stream, "
                 f"{result['max_new_tokens']} new tokens, {result['started_utc'][:10]}",
                 fontsize="medium")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, None
