"""Benchmark plots as PNG (matplotlib, Agg backend; optional: skipped with a note if missing)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_spec(result: dict, path: Path) -> tuple[Path | None, str | None]:
    """Grouped bars per task, one bar per system: speedup over tokenlean greedy (top) and
    mean accepted tokens per target step (bottom). Returns (the PNG, or None; a note)."""
    plt = _pyplot()
    if plt is None:
        return None, "plot skipped: matplotlib is not installed (pip install 'tokenlean[bench]')"
    results = result["results"]
    tasks = list(results)
    systems = list(dict.fromkeys(label for task in tasks for label in results[task]))
    width = 0.8 / max(1, len(systems))
    fig, (ax_speed, ax_mat) = plt.subplots(2, 1, figsize=(max(6.0, 1.6 * len(tasks) + 3), 7.5),
                                           sharex=True)
    colors = plt.get_cmap("tab10")
    for j, label in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(tasks))]
        speed = [results[t].get(label, {}).get("speedup") or 0 for t in tasks]
        mat = [results[t].get(label, {}).get("median_mat") or 0 for t in tasks]
        ax_speed.bar(xs, speed, width, label=label, color=colors(j % 10))
        ax_mat.bar(xs, mat, width, label=label, color=colors(j % 10))
    ax_speed.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax_speed.set_ylabel("speedup vs tokenlean greedy")
    ax_mat.set_ylabel("mean accepted tokens / step")
    ax_mat.set_xticks(range(len(tasks)), tasks)
    columns = min(4, len(systems))
    rows = -(-len(systems) // columns)
    handles, labels = ax_speed.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize="small", frameon=False)
    setup = result["setup"]
    threads = f"{setup['threads']} thread{'s' if setup['threads'] != 1 else ''}"
    ax_speed.set_title(f"{Path(result['model']['name']).name}, {setup['dtype']} on "
                       f"{setup['device']}, {threads}, {setup['max_new_tokens']} new tokens, "
                       f"greedy, {result['date'][:10]}", fontsize="medium")
    fig.tight_layout(rect=(0, 0.035 * rows + 0.01, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, None
