"""`bench serve` sweeps: one table (a row per server and concurrency level) and a PNG."""

from __future__ import annotations

import math
from pathlib import Path

from tokenlean.bench.plot import _pyplot
from tokenlean.bench.report import _fmt, table_console

PLOT_MISSING = "plot skipped: matplotlib is not installed (pip install 'tokenlean[bench]')"


def _p50_p99(stats: dict) -> list[str]:
    return [_fmt(stats["median"]), _fmt(stats["p99"])]


def _cells(row: dict, speedup: str) -> list[str]:
    """The columns a served level and the offline row share, from 'reqs' to 'E2E p99'."""
    return [str(row["completed"]), _fmt(row["request_throughput"], ".2f"),
            _fmt(row["output_throughput"]), speedup, *_p50_p99(row["ttft_ms"]),
            *_p50_p99(row["itl_ms"]), *_p50_p99(row["e2e_ms"])]


def _long_cells(row: dict) -> list[str]:
    long = row.get("long_prompt")
    if long is None:
        return ["-", "-", "-"]
    def p99(block: dict) -> str:  # TTFT p99 and its ratio to the lowest level's
        ratio = block["ttft_p99_vs_lowest"]
        return _fmt(block["ttft_ms"]["p99"]) + (f" ({ratio:.2f}x)" if ratio else "")

    others = {**long["others"], "ttft_p99_vs_lowest": long["ttft_p99_vs_lowest"]}
    during = long.get("during") or {"requests": 0}
    waited = f"{p99(during)} n={during['requests']}" if during["requests"] else "-"
    return [p99(others), waited, _fmt(long["others"]["itl_ms"]["p99"])]


def print_sweep_table(result: dict, json_path: Path | None = None, png_path: Path | None = None,
                      plot_note: str | None = None, file=None) -> None:
    from rich.table import Table

    console = table_console(file)
    s = result["setup"]
    rate = "inf" if s["request_rate"] is None else f"{s['request_rate']:g}"
    lowest = s["concurrency"][0]
    title = (f"serve sweep: {Path(result['model']['name']).name}, {s['prompt_tokens']}-token "
             f"prompts -> {s['max_tokens']} new, greedy, rate {rate}/s; latencies in ms")
    if s["long_prompt_tokens"]:
        title += (f"; +long: a {s['long_prompt_tokens']}-token prompt arrives mid-run, figures "
                  f"of the other requests (x: over TTFT p99 at concurrency {lowest}; during long: "
                  f"those waiting for their first token while it was prefilled)")
    table = Table(title=title)
    headers = ["system", "conc", "reqs", "req/s", "out tok/s", f"speedup vs c={lowest}",
               "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99"]
    if s["long_prompt_tokens"]:
        headers += ["TTFT p99 +long", "TTFT p99 during long", "ITL p99 +long"]
    for i, name in enumerate(headers):
        table.add_column(name, justify="left" if i == 0 else "right")
    with_long = bool(s["long_prompt_tokens"])
    for label, system in result["systems"].items():
        for row in system["levels"]:
            table.add_row(label, str(row["concurrency"]),
                          *_cells(row, _fmt(row["speedup"], ".2f", "x")),
                          *(_long_cells(row) if with_long else []))
        table.add_section()
    offline = result.get("offline")
    if offline:
        table.add_row("offline", "1", *_cells(offline, "-"), *(["-", "-", "-"] if with_long else []))
    console.print(table)
    for line in _served_vs_offline(result):
        console.print(line)
    for label, system in result["systems"].items():
        for row in system["levels"]:
            errors = dict(row["errors"])
            for error, n in row.get("long_prompt", {}).get("others", {}).get("errors", {}).items():
                errors[error] = errors.get(error, 0) + n
            for error, n in errors.items():
                console.print(f"[yellow]failed[/yellow] {label} c={row['concurrency']} x{n}: "
                              f"{error}")
            long = row.get("long_prompt")
            if long and not long["request"]["ok"]:
                console.print(f"[yellow]failed[/yellow] {label} c={row['concurrency']}: the "
                              f"long prompt: {long['request']['error']}")
        for note in system["notes"]:
            console.print(f"[dim]{label}: {note}[/dim]")
    if plot_note:
        console.print(f"[dim]{plot_note}[/dim]")
    if json_path is not None:
        console.print(f"results: {json_path}" + (f", plot: {png_path}" if png_path else ""))


def _served_vs_offline(result: dict) -> list[str]:
    """'served / offline output tok/s at concurrency 1' per server, when both exist."""
    offline = result.get("offline")
    if not offline or not offline["output_throughput"]:
        return []
    lines = []
    for label, system in result["systems"].items():
        row = next((r for r in system["levels"] if r["concurrency"] == 1), None)
        if row and row["output_throughput"]:
            lines.append(f"served / offline output tok/s at concurrency 1, {label}: [bold]"
                         f"{row['output_throughput'] / offline['output_throughput']:.2f}x"
                         "[/bold]")
    return lines


def _values(levels: list[dict], get) -> list[float]:
    """A curve's y values, NaN (a gap) where a figure is missing."""
    out = []
    for row in levels:
        try:
            value = get(row)
        except (KeyError, TypeError):
            value = None
        out.append(math.nan if value is None else value)
    return out


def plot_sweep(result: dict, path: Path) -> tuple[Path | None, str | None]:
    """Output tokens/s (left) and p99 TTFT and E2E latency (right) against concurrency, one
    colour per server; the offline row as a dotted line. Returns (the PNG or None, a note)."""
    plt = _pyplot()
    if plt is None:
        return None, PLOT_MISSING
    fig, (ax_tps, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.get_cmap("tab10")
    levels = result["setup"]["concurrency"]
    for j, (label, system) in enumerate(result["systems"].items()):
        rows, color = system["levels"], colors(j % 10)
        xs = [row["concurrency"] for row in rows]
        ax_tps.plot(xs, _values(rows, lambda r: r["output_throughput"]), "o-", color=color,
                    label=label)
        ax_lat.plot(xs, _values(rows, lambda r: r["ttft_ms"]["p99"]), "o-", color=color,
                    label=f"{label} TTFT p99")
        ax_lat.plot(xs, _values(rows, lambda r: r["e2e_ms"]["p99"]), "s--", color=color,
                    label=f"{label} E2E p99")
        if any("long_prompt" in row for row in rows):
            ax_lat.plot(xs, _values(rows, lambda r: r["long_prompt"]["others"]["ttft_ms"]["p99"]),
                        "^:", color=color, label=f"{label} TTFT p99, long prompt mid-run")
    offline = result.get("offline")
    if offline and offline["output_throughput"]:
        ax_tps.axhline(offline["output_throughput"], color="gray", linestyle=":",
                       label="offline, one at a time")
    for ax in (ax_tps, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    ax_tps.set_ylabel("output tokens/s")
    ax_tps.set_ylim(bottom=0)
    ax_lat.set_ylabel("p99 latency, ms")
    ax_lat.set_yscale("log")
    s = result["setup"]
    fig.suptitle(f"{Path(result['model']['name']).name}: {s['prompt_tokens']}-token prompts -> "
                 f"{s['max_tokens']} new, greedy, {result['date'][:10]}", fontsize="medium")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, None
