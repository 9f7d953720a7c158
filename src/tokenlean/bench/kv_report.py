"""`tokenlean bench kv`'s outputs: the table on stdout, accuracy against budget and
perplexity along the stream as PNGs."""

from __future__ import annotations

from pathlib import Path

from tokenlean.bench.kv_tasks import PPL

SHORT = {"niah_single": "single", "niah_multikey": "m-key", "niah_multivalue": "m-value"}


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def print_kv_table(result: dict, json_path=None, pngs=(), plot_note=None, file=None) -> None:
    from rich.table import Table

    from tokenlean.bench.report import _fmt, table_console

    console = table_console(file)
    setup = result["setup"]
    quality = [t for t in setup["tasks"] if t != PPL]
    if quality:
        title = (f"kv: {result['model']['name']}, {setup['dtype']} on {setup['device']}, "
                 f"{setup['threads']} threads, {setup['samples_per_task']} samples per task, "
                 f"{setup['style']} style; score % (RULER string match)")
        table = Table(title=title)
        table.add_column("context", justify="right")
        table.add_column("method", no_wrap=True)
        for name in (*[SHORT.get(t, t) for t in quality], "mean", "prefill s", "decode ms/tok",
                     "vs full", "KV MiB", "KV / full"):
            table.add_column(name, justify="right")
        table.add_column("note", max_width=40, no_wrap=True)
        last = None
        for s in result["summary"]:
            if last is not None and s["context"] != last:
                table.add_section()
            last = s["context"]
            table.add_row(str(s["context"]), s["method"],
                          *[_pct(s["tasks"].get(t)) for t in quality], _pct(s["mean_score"]),
                          _fmt(s["prefill_s"], ".3f"), _fmt(s["decode_ms_per_token"], ".2f"),
                          _fmt(s["decode_speedup_vs_full"], ".2f", "x"),
                          _mib(s["kv_bytes_allocated"]), _fmt(s["kv_ratio"], ".3f"),
                          "skipped" if s["skipped"] else "")
        console.print(table)
    ppl = [r for r in result["rows"] if r["task"] == PPL]
    if ppl:
        table = Table(title=f"streaming perplexity: {ppl[0]['source']}, chunks of "
                            f"{setup['ppl']['chunk']} tokens")
        for name in ("method", "tokens", "ppl", "first seg", "last seg", "tok/s", "KV MiB",
                     "note"):
            table.add_column(name, justify="left" if name in ("method", "note") else "right")
        for r in ppl:
            segs = r.get("segments") or []
            table.add_row(r["method"], str(r.get("tokens", "-")), _fmt(r.get("ppl"), ".2f"),
                          _fmt(segs[0]["ppl"] if segs else None, ".2f"),
                          _fmt(segs[-1]["ppl"] if segs else None, ".2f"),
                          _fmt(r.get("tokens_per_s"), ".0f"), _mib(r.get("kv_bytes_allocated")),
                          (r["skipped"] or ("cut at the model's context" if r.get("cut_at_context")
                                            else ""))[:60])
        console.print(table)
    for note in result.get("notes", []):
        console.print(f"[dim]{note}[/dim]")
    if plot_note:
        console.print(f"[dim]{plot_note}[/dim]")
    if json_path is not None:
        console.print(f"results: {json_path}" + "".join(f", plot: {p}" for p in pngs))


def plot_kv(result: dict, path: Path):
    """Mean score over tasks against the budget, one curve per method, one subplot per
    context; the full cache a dashed line, query-aware dotted, peers dash-dotted."""
    from tokenlean.bench.plot import _pyplot

    plt = _pyplot()
    if plt is None:
        return None, "plot skipped: matplotlib is not installed (pip install 'tokenlean[bench]')"
    summary = [s for s in result["summary"] if s["mean_score"] is not None]
    contexts = sorted({s["context"] for s in result["summary"]})
    if not contexts:
        return None, None
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4.8),
                             squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")
    curves = list(dict.fromkeys((s["kind"], s["method"].split("@")[0], s["query_aware"])
                                for s in summary if s["policy"] != "none"))
    for ax, context in zip(axes[0], contexts, strict=True):
        mine = [s for s in summary if s["context"] == context]
        for s in mine:
            if s["policy"] == "none" and s["kind"] == "tokenlean":
                ax.axhline(100 * s["mean_score"], color="black", linestyle="--",
                           label="full cache")
        for j, (kind, base, aware) in enumerate(curves):
            points = sorted((s["budget_fraction"], 100 * s["mean_score"]) for s in mine
                            if (s["kind"], s["method"].split("@")[0], s["query_aware"])
                            == (kind, base, aware))
            if not points:
                continue
            style = ":" if aware else "-." if kind != "tokenlean" else "-"
            label = base + (" (query-aware)" if aware else "")
            ax.plot(*zip(*points), style, marker="o", color=colors(j % 10), label=label)
        ax.set_title(f"context {context} tokens", fontsize="medium")
        ax.set_xlabel("KV budget (fraction of the prompt kept)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score % (mean over tasks)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    columns = min(4, max(1, len(labels)))
    rows = -(-len(labels) // columns)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize="small",
               frameon=False)
    setup = result["setup"]
    fig.suptitle(f"{Path(result['model']['name']).name}: kv policies, "
                 f"{setup['samples_per_task']} samples x {len(setup['max_new_tokens'])} tasks, "
                 f"{result['date'][:10]}", fontsize="medium")
    fig.tight_layout(rect=(0, 0.05 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend sits below the axes
    plt.close(fig)
    return Path(path), None


def plot_ppl(result: dict, path: Path):
    """Perplexity per segment against the position in the stream, one line per method."""
    from tokenlean.bench.plot import _pyplot

    plt = _pyplot()
    if plt is None:
        return None, "plot skipped: matplotlib is not installed"
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in result["rows"]:
        if r["task"] == PPL and r.get("segments"):
            xs = [s["end"] for s in r["segments"]]
            ax.plot(xs, [s["ppl"] for s in r["segments"]], marker=".", label=r["method"])
    ax.axvline(result["model"]["context"], color="gray", linestyle=":",
               label="model's context")
    ax.set_yscale("log")
    ax.set_xlabel("position in the stream (tokens)")
    ax.set_ylabel("perplexity per segment")
    ax.set_title(f"{Path(result['model']['name']).name}: streaming perplexity", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path), None
