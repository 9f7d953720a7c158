"""Benchmark output: a rich table on stdout, and one JSON file per run."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def table_console(file=None):
    """A rich console for tables: a pipe or file gets 160 columns, not rich's 80, so that
    `tokenlean ... | tee log` keeps whole names and figures instead of squeezing them."""
    from rich.console import Console

    console = Console(file=file or sys.stdout)
    return console if console.is_terminal else Console(file=file or sys.stdout, width=160)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def cpu_name() -> str:
    """The CPU model (platform.processor() is often empty or just 'x86_64' on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | None = None) -> dict:
    from tokenlean.bench.peers import transformers_version

    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def new_path(out_dir: str | Path, kind: str, when: datetime, suffix: str = ".json") -> Path:
    """`out_dir/<kind>-YYYYMMDD-HHMMSS<suffix>` (UTC), `-2`, `-3`... if taken; the folder
    made if missing."""
    from tokenlean.errors import UserError

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}") from None
    stem = f"{kind}-{when.strftime('%Y%m%d-%H%M%S')}"
    path, n = out / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = out / f"{stem}-{n}{suffix}"
    return path


def write_json(result: dict, out_dir: str | Path, kind: str, when: datetime) -> Path:
    """`out_dir/<kind>-YYYYMMDD-HHMMSS.json` (UTC); never overwrites an earlier run."""
    path = new_path(out_dir, kind, when)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def print_decode_table(result: dict, json_path: Path | None = None, file=None) -> None:
    from rich.table import Table

    console = table_console(file)
    setup = result["setup"]
    title = (f"decode: {result['model']['name']}, {setup['dtype']} on {setup['device']}, "
             f"{setup['threads']} thread{'s' if setup['threads'] != 1 else ''}, {setup['prompts']} prompts x {setup['prompt_tokens']} "
             f"tokens -> {setup['max_new_tokens']} new, median of {setup['repeats']}")
    table = Table(title=title)
    table.add_column("system")
    table.add_column("tok/s", justify="right")
    table.add_column("min-max tok/s", justify="right")
    table.add_column("prefill ms", justify="right")
    table.add_column("decode tok/s", justify="right")
    table.add_column("GB/s (% GEMV)", justify="right")
    table.add_column("% read", justify="right")
    table.add_column("exact", justify="center")
    for name, s in result["systems"].items():
        spread = f"{_fmt(min(s['tokens_per_s']))}-{_fmt(max(s['tokens_per_s']))}"
        exact = {True: "yes", False: "no", None: "-"}[s.get("exact", result["exact"])]
        fraction = s.get("fraction_of_gemv")
        bandwidth = _fmt(s.get("achieved_gb_per_s")) + (
            f" ({fraction * 100:.0f} % {s['gemv_reference']})" if fraction is not None else "")
        read = s.get("fraction_of_read")
        table.add_row(name, _fmt(s["median_tokens_per_s"]), spread,
                      _fmt(s["median_prefill_s"] and s["median_prefill_s"] * 1e3),
                      _fmt(s["median_decode_tokens_per_s"]), bandwidth,
                      _fmt(read and read * 100, ".0f", " %"),
                      "ref" if name == "tokenlean" else exact)
    console.print(table)
    bw = result.get("bandwidth")
    if bw:
        console.print("measured here: GEMV " + ", ".join(
            f"{k} {v['gb_per_s']:.1f}" for k, v in bw["gemv"].items())
            + f" GB/s; read (sum) {bw['read']['gb_per_s']:.1f} GB/s. GB/s = weight bytes per "
            "token x decode tok/s")
    speedups = result.get("speedups") or {"transformers": result.get("speedup") or {}}
    for peer, sp in speedups.items():
        if sp.get("tokens_per_s") is not None:
            console.print(f"speedup tokenlean / {peer}: [bold]{sp['tokens_per_s']:.2f}x"
                          f"[/bold] end to end, {_fmt(sp.get('decode_tokens_per_s'), '.2f', 'x')}"
                          " decode only")
    if result["exact"] is False:
        bad = [p for p in result["per_prompt"] if not p["exact"]]
        console.print(f"[yellow]not exact[/yellow]: greedy ids differ on {len(bad)} of "
                      f"{len(result['per_prompt'])} prompts (first difference at new token "
                      + ", ".join(str(p["first_difference"]) for p in bad) + ")")
    for name, s in result["systems"].items():
        if s.get("exact") is False:
            bad = [p["llama_cpp"][name] for p in result["per_prompt"]
                   if not p.get("llama_cpp", {}).get(name, {}).get("exact", True)]
            console.print(f"[yellow]not exact[/yellow]: {name} differs from tokenlean on "
                          f"{len(bad)} of {len(result['per_prompt'])} prompts (first difference "
                          "at new token " + ", ".join(str(p["first_difference"]) for p in bad)
                          + ")" + ("" if s.get("same_weights", True) else ": different weights"))
    for note in result.get("notes", []):
        console.print(f"[dim]{note}[/dim]")
    if json_path is not None:
        console.print(f"results: {json_path}")


def print_spec_table(result: dict, json_path: Path | None = None, png_path: Path | None = None,
                     plot_note: str | None = None, file=None) -> None:
    """One row per (task, system): MAT, tokens/s, speedup over tokenlean greedy, exact."""
    from rich.table import Table

    console = table_console(file)
    setup = result["setup"]
    title = (f"spec: {result['model']['name']}, {setup['dtype']} on {setup['device']}, "
             f"{setup['threads']} thread{'s' if setup['threads'] != 1 else ''}, "
             f"{setup['prompts_per_task']} prompts per task -> {setup['max_new_tokens']} new "
             f"tokens, greedy, median of {setup['repeats']}")
    table = Table(title=title)
    for name, justify in (("task", "left"), ("system", "left"), ("MAT", "right"),
                          ("tok/s", "right"), ("speedup", "right"), ("exact", "center")):
        table.add_column(name, justify=justify)
    for i, (task, systems) in enumerate(result["results"].items()):
        if i:
            table.add_section()
        for label, s in systems.items():
            exact = "ref" if label == "greedy" else "yes" if s["exact"] else "[red]no[/red]"
            table.add_row(task, label, _fmt(s["median_mat"], ".2f"),
                          _fmt(s["median_tokens_per_s"]), _fmt(s["speedup"], ".2f", "x"), exact)
    console.print(table)
    for task, prompts in result["per_prompt"].items():
        for label in result["results"][task]:
            bad = [p for p in prompts if not p["systems"][label]["exact"]]
            if bad:
                console.print(f"[yellow]not exact[/yellow]: {task} / {label} differs from greedy "
                              f"on {len(bad)} of {len(prompts)} prompts (first difference at new "
                              "token " + ", ".join(str(p["systems"][label]["first_difference"])
                                                   for p in bad) + ")")
    for note in result.get("notes", []):
        console.print(f"[dim]{note}[/dim]")
    if plot_note:
        console.print(f"[dim]{plot_note}[/dim]")
    if json_path is not None:
        console.print(f"results: {json_path}" + (f", plot: {png_path}" if png_path else ""))


def weights_digest(folder) -> str:
    """First 16 hex digits of the sha256 of a checkpoint's safetensors files (or of the
    .gguf file a model was loaded from)."""
    h = hashlib.sha256()
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def run_header(benchmark: str, command: str, started, machine: dict, lm) -> dict:
    """What every result JSON starts with: what ran, when, where, on which weights."""
    return {
        "benchmark": benchmark,
        "command": command,
        "argv": sys.argv,
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((utc_now() - started).total_seconds(), 3),
        "machine": machine,
        "model": {
            "name": lm.name,
            "folder": str(lm.folder),
            "parameters": sum(p.numel() for p in lm.model.parameters()),
            "weights_sha256_16": weights_digest(lm.folder),
            "context": lm.context,
        },
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "device": str(lm.model.device),
    }
