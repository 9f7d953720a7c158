"""`tokenlean bench serve`: a load generator for an OpenAI-compatible server, after
`vllm bench serve`.

Held-out code prompts of exactly `--prompt-tokens` token ids (sent as token ids, so
the server sees exactly that many) go to `/v1/completions` as streaming requests,
greedy, with `stream_options.include_usage`. Arrivals follow a Poisson process of
`--request-rate` requests/s (fixed seed; inf = all at once), and at most
`--max-concurrency` requests are in flight at a time. Per request: time to first
token (TTFT), the gaps between streamed chunks (ITL), time per output token after
the first (TPOT), end-to-end latency (E2E) and output tokens (from the usage chunk).
The speculative-decoding block is the difference of the server's `/metrics`
counters (tokenlean's or vLLM's names) before and after the run; a server without them
(llama.cpp's llama_cpp.server) gets throughput and latency only, and a note.

An external server that refuses token-id prompts (llama_cpp.server takes strings only)
gets the same prompts decoded to text, and one that streams no usage chunk has its
output tokens counted as the streamed text chunks; the result says so.

Without `--base-url` the benchmark starts its own `tokenlean serve` for
`--model/--method/--method-arg` on a free loopback port and stops it at the end.

This file is the command: a single run, the sweep (levels, servers, the long prompt,
the offline row) and the tables; the servers, the /metrics counters and the requests
themselves are in bench/serve_load.py.
"""

from __future__ import annotations

import asyncio
import math
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tokenlean.bench.report import _fmt, machine_info, table_console, utc_now, write_json
from tokenlean.bench.serve_load import (
    DEFAULT_PROMPTS,
    MIN_LEVEL_PROMPTS,
    SEED,
    RequestResult,
    Server,
    accepts_token_ids,
    level_prompts,
    parse_base_urls,
    parse_concurrency,
    read_spec_counters,
    run_load,
    served_model,
    spec_block,
    stats_ms,
    summarize,
)
from tokenlean.errors import UserError

# ---- one server under test ----

@dataclass
class Target:
    """A server ready for the load: where it listens, what it serves, how it takes prompts."""
    label: str
    base_url: str
    model: str  # the served model id
    started_here: bool
    as_text: bool = False  # it refused token-id prompts: they go decoded to text


@contextmanager
def open_target(httpx, args, label: str, url: str | None, probe: list[int], tokenizer,
                requests: int):
    """Our `tokenlean serve` (url None; stopped on exit) or the user's server, checked.
    A 1-token request with `probe` tells whether it takes token ids and warms it up."""
    server = Server(args, requests) if url is None else None
    try:
        if server is not None:
            server.wait_ready(httpx)
        base_url = server.base_url if server else url
        model, context = served_model(httpx, base_url, args.api_key)
        for option, tokens in (("--prompt-tokens", args.prompt_tokens),
                               ("--long-prompt-tokens", args.long_prompt_tokens)):
            if context is not None and tokens >= context:
                raise UserError(f"{option} {tokens} leaves no room to generate: "
                                f"the served model's context is {context} tokens")
        text = tokenizer.decode(probe, skip_special_tokens=False)
        as_text = not accepts_token_ids(httpx, base_url, model, probe, text, args.api_key)
        yield Target(label, base_url, model, server is not None, as_text)
    finally:
        if server is not None:
            server.stop()


def measure(httpx, target: Target, prompts: list[list[int]], args, concurrency: int,
            tokenizer, long_prompt: list[int] | None = None, description: str = "requests"):
    """One run of `prompts` at `concurrency` (and the long prompt mid-run, if given):
    (results, duration s, the speculative-decoding block of /metrics or None)."""
    def text(ids):
        return tokenizer.decode(ids, skip_special_tokens=False) if target.as_text else None

    texts = [text(ids) for ids in prompts] if target.as_text else None
    long_text = text(long_prompt) if long_prompt is not None else None
    before = read_spec_counters(httpx, target.base_url)
    results, duration = _run_with_progress(target, prompts, args, concurrency, texts,
                                           long_prompt, long_text, description)
    return results, duration, spec_block(before, read_spec_counters(httpx, target.base_url))


def _target_notes(target: Target, results: list[RequestResult], args,
                  spec: dict | None) -> list[str]:
    """What the reader of a server's figures must know: how prompts and tokens were counted."""
    notes = []
    if target.as_text:
        notes.append("the server refused token-id prompts: the prompts went as text (the "
                     "same ids decoded), so its own tokenizer set their length; "
                     "total_input_tokens counts the ids")
    ok = [r for r in results if r.ok]
    if any(not r.usage for r in ok):
        notes.append("the server streamed no usage chunk: output tokens are the streamed text "
                     "chunks (one token each on llama.cpp's server)")
    short = sum(1 for r in ok if r.output_tokens < args.max_tokens)
    if short:
        notes.append(f"{short} of {len(ok)} requests got fewer than --max-tokens "
                     f"{args.max_tokens} tokens: the server ended them (EOS, a stop rule; "
                     "llama_cpp.server also cuts a stream when another request arrives, "
                     "unless started with --interrupt_requests False)")
    if spec is None:
        notes.append("speculative decoding: unavailable, the server's /metrics has no "
                     "speculative-decoding counters (tokenlean's or vLLM's) or is missing")
    if not target.started_here:
        notes.append("an external server: its /metrics counters include any other traffic "
                     "during the run")
    return notes


# ---- the command ----

def _is_sweep(args) -> bool:
    return bool(args.levels or args.offline or args.long_prompt_tokens
                or len(args.base_urls) > 1)


def _command(args) -> str:
    parts = ["tokenlean", "bench", "serve"]
    if args.model:
        parts += ["--model", args.model]
    if not args.base_urls or args.offline:  # a model runs here: the server's, or offline
        parts += ["--device", args.device, "--dtype", args.dtype, "--method", args.method]
        for pair in args.method_arg:
            parts += ["--method-arg", pair]
        if args.threads:
            parts += ["--threads", str(args.threads)]
    for label, url in args.base_urls.items():
        parts += ["--base-url", url if label == urlsplit(url).netloc else f"{label}={url}"]
    if args.levels:
        parts += ["--concurrency", ",".join(map(str, args.levels))]
    else:
        parts += ["--max-concurrency", str(args.max_concurrency)]
    if args.num_prompts or not _is_sweep(args):
        parts += ["--num-prompts", str(args.num_prompts or DEFAULT_PROMPTS)]
    parts += ["--request-rate", str(args.request_rate), "--prompt-tokens", str(args.prompt_tokens),
              "--max-tokens", str(args.max_tokens)]
    if args.long_prompt_tokens:
        parts += ["--long-prompt-tokens", str(args.long_prompt_tokens)]
    if args.offline:
        parts.append("--offline")
    return shlex.join(parts + ["--out", str(args.out)])


def _check_args(args) -> None:
    """Every option checked before anything starts; sets args.base_urls and args.levels."""
    from tokenlean.spec_decode.registry import check_method, parse_method_args

    if not (args.request_rate > 0):
        raise UserError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    args.base_urls = parse_base_urls(args.base_url)
    args.levels = None if args.concurrency is None else parse_concurrency(args.concurrency)
    if not args.base_urls or args.offline:
        check_method(args.method)
        parse_method_args(args.method, args.method_arg)


def _header(args, started) -> dict:
    return {"benchmark": "serve", "command": _command(args), "argv": sys.argv,
            "date": started.isoformat(timespec="seconds"),
            "duration_s": round((utc_now() - started).total_seconds(), 3),
            "machine": machine_info()}


def _setup(args, **extra) -> dict:
    return {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "temperature": 0,
            "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
            **extra, "seed": SEED, "endpoint": "/v1/completions", "stream": True}


def _tokenizer(args):
    """(model name, folder, tokenizer): the prompts are token ids cut with the served
    model's tokenizer (no weights loaded)."""
    from tokenlean.lm import resolve_model
    from tokenlean.model.tokenizer import Tokenizer

    name, folder = resolve_model(args.model)
    return name, folder, Tokenizer(folder)


def run_serve_bench(args) -> dict:
    try:
        import httpx
    except ImportError:
        raise UserError("bench serve needs httpx: pip install 'tokenlean[serve]'") from None
    _check_args(args)
    return run_sweep(args, httpx) if _is_sweep(args) else run_single(args, httpx)


def run_single(args, httpx) -> dict:
    """One server, one concurrency: the full table, with the speculative-decoding block."""
    from tokenlean.bench.prompts import heldout_prompts

    started = utc_now()
    model_name, folder, tokenizer = _tokenizer(args)
    count = args.num_prompts or DEFAULT_PROMPTS
    prompts = heldout_prompts(tokenizer, count, args.prompt_tokens)
    label, url = next(iter(args.base_urls.items()), ("tokenlean", None))
    with open_target(httpx, args, label, url, prompts[0].ids, tokenizer, count) as target:
        results, duration, spec = measure(httpx, target, [p.ids for p in prompts], args,
                                          args.max_concurrency, tokenizer)
    result = {
        **_header(args, started),
        "model": {"name": model_name, "served_id": target.model, "tokenizer_folder": str(folder)},
        "server": {"base_url": target.base_url, "started_here": target.started_here,
                   "method": args.method if target.started_here else None,
                   "method_args": list(args.method_arg) if target.started_here else None},
        "setup": _setup(args, num_prompts=count, max_concurrency=args.max_concurrency),
        **summarize(results, duration),
        "spec_decode": spec,
        "prompts": [p.to_json() for p in prompts],
        "prompt_format": "text" if target.as_text else "token ids",
        "notes": _target_notes(target, results, args, spec),
    }
    path = write_json(result, args.out, "serve", started)
    print_serve_table(result, path)
    return result


# ---- the sweep: several concurrency levels, servers, a long prompt, the offline row ----

def run_sweep(args, httpx) -> dict:
    """Every level on every server with the same prompts (the first `level_prompts` of
    them), servers one after the other; then the offline reference. Table, JSON, PNG."""
    from tokenlean.bench.prompts import heldout_prompts
    from tokenlean.bench.serve_report import plot_sweep, print_sweep_table

    started = utc_now()
    model_name, folder, tokenizer = _tokenizer(args)
    levels = args.levels or [args.max_concurrency]
    most = max(level_prompts(c, args.num_prompts) for c in levels)
    # the long prompt: the held-out windows after the regular prompts', joined
    extra = math.ceil(args.long_prompt_tokens / args.prompt_tokens)
    windows = heldout_prompts(tokenizer, most + extra, args.prompt_tokens)
    prompts = windows[:most]
    long_ids = [t for p in windows[most:] for t in p.ids][:args.long_prompt_tokens] or None
    systems = {label: sweep_server(httpx, args, label, url, [p.ids for p in prompts],
                                   long_ids, tokenizer, levels)
               for label, url in (args.base_urls or {"tokenlean": None}).items()}
    offline = None
    if args.offline:  # after the servers stopped: nothing else runs meanwhile
        offline = run_offline(args, [p.ids for p in prompts[:level_prompts(levels[0],
                                                                           args.num_prompts)]])
    result = {
        **_header(args, started),
        "model": {"name": model_name, "tokenizer_folder": str(folder)},
        "setup": _setup(args, concurrency=levels, num_prompts=args.num_prompts,
                        num_prompts_rule=f"--num-prompts, else max({MIN_LEVEL_PROMPTS}, "
                                         "2 x concurrency)",
                        long_prompt_tokens=args.long_prompt_tokens,
                        method=args.method, method_args=list(args.method_arg),
                        threads=args.threads),
        "systems": systems,
        "offline": offline,
        "prompts": [p.to_json() for p in prompts],
        "long_prompt": {"tokens": len(long_ids), "sources": [p.to_json() for p in windows[most:]]}
                       if long_ids else None,
    }
    path = write_json(result, args.out, "serve-sweep", started)
    png, plot_note = plot_sweep(result, path.with_suffix(".png"))
    print_sweep_table(result, path, png, plot_note)
    return result


def sweep_server(httpx, args, label: str, url: str | None, prompts: list[list[int]],
                 long_ids: list[int] | None, tokenizer, levels: list[int]) -> dict:
    """One server through every level: a row per level, and with a long prompt a second
    run of the level with the long prompt sent mid-run."""
    rows, every = [], []
    with open_target(httpx, args, label, url, prompts[0], tokenizer, len(prompts) + 1) as target:
        for c in levels:
            ids = prompts[:level_prompts(c, args.num_prompts)]
            results, duration, spec = measure(httpx, target, ids, args, c, tokenizer,
                                              description=f"{label}, concurrency {c}")
            row = {"concurrency": c, "num_prompts": len(ids), **summarize(results, duration),
                   "spec_decode": spec}
            every += results
            if long_ids:
                results, duration, _ = measure(httpx, target, ids, args, c, tokenizer, long_ids,
                                               f"{label}, concurrency {c} + long prompt")
                row["long_prompt"] = long_prompt_block(results, duration)
                every += results
            rows.append(row)
    add_ratios(rows)
    spec = next((row["spec_decode"] for row in rows if row["spec_decode"]), None)
    return {"base_url": target.base_url, "started_here": target.started_here,
            "served_id": target.model, "method": args.method if target.started_here else None,
            "prompt_format": "text" if target.as_text else "token ids", "levels": rows,
            "notes": _target_notes(target, every, args, spec)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def long_prompt_block(results: list[RequestResult], duration_s: float) -> dict:
    """A run with the long prompt: the figures of the OTHER requests, and the long one's.
    `during`: the TTFT of the other requests that waited for their first token while the
    long prompt was being prefilled (their wait overlaps its own), the ones it could hold
    up; the run's first wave, sent all at once, is not among them."""
    others = [r for r in results if not r.injected]
    [long] = [r for r in results if r.injected]
    s = summarize(others, duration_s)
    window = long.waiting()
    waits = [(r.ttft_s, r.waiting()) for r in others if r.ok] if window else []
    overlap = [ttft for ttft, w in waits if w and w[0] < window[1] and w[1] > window[0]]
    return {"requests": len(results) - len(others), "prompt_tokens": long.prompt_tokens,
            "others": {k: s[k] for k in ("completed", "failed", "ttft_ms", "itl_ms", "e2e_ms",
                                          "errors")},
            "during": {"requests": len(overlap), "ttft_ms": stats_ms(overlap)},
            "request": {"ok": long.ok, "error": long.error, "ttft_ms": _ms(long.ttft_s),
                        "e2e_ms": _ms(long.e2e_s), "output_tokens": long.output_tokens}}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def add_ratios(rows: list[dict]) -> None:
    """Against the lowest level (concurrency 1 when swept): output tok/s speedup, and the
    other requests' TTFT p99 with the long prompt over the lowest level's without it."""
    base = rows[0]
    for row in rows:
        row["speedup"] = _ratio(row["output_throughput"], base["output_throughput"])
        if "long_prompt" in row:
            long = row["long_prompt"]
            long["ttft_p99_vs_lowest"] = _ratio(long["others"]["ttft_ms"]["p99"],
                                                base["ttft_ms"]["p99"])
            long["during"]["ttft_p99_vs_lowest"] = _ratio(long["during"]["ttft_ms"]["p99"],
                                                          base["ttft_ms"]["p99"])


def run_offline(args, prompts: list[list[int]]) -> dict:
    """The reference: the same requests one at a time through the in-process model
    (lm.stream, the loop lm.generate runs) in this main thread, with the server's model,
    method and threads; timed as the client times a stream."""
    import torch

    from tokenlean.lm import load
    from tokenlean.spec_decode.registry import parse_method_args

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model, device=args.device, dtype=args.dtype)
    method_args = parse_method_args(args.method, args.method_arg)

    def one(ids: list[int], max_tokens: int) -> RequestResult:
        res = RequestResult(prompt_tokens=len(ids), usage=True)
        start = last = time.perf_counter()
        generation = lm.stream(ids, max_tokens, method=args.method, method_args=method_args)
        for delta in generation:
            if not delta:  # the server streams only non-empty text
                continue
            now = time.perf_counter()
            if res.ttft_s is None:
                res.ttft_s = now - start
            else:
                res.itl_s.append(now - last)
            last = now
        res.e2e_s = time.perf_counter() - start
        res.ttft_s = res.e2e_s if res.ttft_s is None else res.ttft_s
        res.output_tokens, res.ok = generation.result.completion_tokens, True
        return res

    one(prompts[0], 1)  # warm-up, as the servers' probe request
    start = time.perf_counter()
    results = [one(ids, args.max_tokens) for ids in prompts]
    return {"num_prompts": len(prompts), "method": args.method,
            "threads": torch.get_num_threads(),
            **summarize(results, time.perf_counter() - start)}


def _run_with_progress(target: Target, prompts, args, concurrency: int, texts=None,
                       long_prompt=None, long_text=None, description: str = "requests"):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=len(prompts) + (long_prompt is not None))
        return asyncio.run(run_load(target.base_url, target.model, prompts, args.max_tokens,
                                    args.request_rate, concurrency, args.api_key,
                                    on_done=lambda _: progress.advance(task), texts=texts,
                                    long_prompt=long_prompt, long_text=long_text))


def print_serve_table(result: dict, json_path: Path | None = None, file=None) -> None:
    from rich.table import Table

    console = table_console(file)
    s, server = result["setup"], result["server"]
    rate = "inf" if s["request_rate"] is None else f"{s['request_rate']:g}"
    method = server["method"] or "external server"
    table = Table(title=f"serve: {result['model']['served_id']} ({method}), {s['num_prompts']} "
                        f"prompts x {s['prompt_tokens']} tokens -> {s['max_tokens']} new, "
                        f"rate {rate}/s, concurrency {s['max_concurrency']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("completed / failed", f"{result['completed']} / {result['failed']}")
    table.add_row("duration s", _fmt(result["duration_s"], ".2f"))
    table.add_row("request throughput req/s", _fmt(result["request_throughput"], ".2f"))
    table.add_row("output throughput tok/s", _fmt(result["output_throughput"], ".1f"))
    table.add_row("total output tokens", str(result["total_output_tokens"]))
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                       ("e2e_ms", "E2E")):
        st = result[key]
        table.add_row(f"{label} mean / median / p99 ms",
                      f"{_fmt(st['mean'], '.1f')} / {_fmt(st['median'], '.1f')} / "
                      f"{_fmt(st['p99'], '.1f')}")
    sd = result.get("spec_decode")
    if sd:
        table.add_section()
        table.add_row("drafts", str(sd["drafts"]))
        table.add_row("draft tokens / accepted", f"{sd['draft_tokens']} / {sd['accepted_tokens']}")
        table.add_row("acceptance rate", _fmt(sd["acceptance_rate"] and
                                              sd["acceptance_rate"] * 100, ".1f", " %"))
        table.add_row("mean acceptance length", _fmt(sd["mean_acceptance_length"], ".2f"))
        if sd["acceptance_rate_per_position"]:
            table.add_row("per-position acceptance", " ".join(
                f"{r:.2f}" for r in sd["acceptance_rate_per_position"]))
    console.print(table)
    for error, n in result.get("errors", {}).items():
        console.print(f"[yellow]failed[/yellow] x{n}: {error}")
    for note in result.get("notes", []):
        console.print(f"[dim]{note}[/dim]")
    if json_path is not None:
        console.print(f"results: {json_path}")
