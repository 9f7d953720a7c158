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
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tokenlean.bench.report import _fmt, machine_info, table_console, utc_now, write_json
from tokenlean.errors import UserError

SEED = 0
STARTUP_TIMEOUT_S = 180.0
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 300.0  # the longest wait for the next chunk (queued behind other requests)

SPEC_COUNTERS = {  # our name -> the Prometheus counter, after the `tokenlean:`/`vllm:` prefix
    "drafts": "spec_decode_num_drafts_total",
    "draft_tokens": "spec_decode_num_draft_tokens_total",
    "accepted_tokens": "spec_decode_num_accepted_tokens_total",
}
PER_POS = "spec_decode_num_accepted_tokens_per_pos_total"
_SAMPLE = re.compile(r'^(?:tokenlean|vllm):(\w+?)(?:\{([^}]*)\})?\s+(\S+)')


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    usage: bool = False  # the server reported usage; else output_tokens = streamed chunks


# ---- the server: ours (a subprocess) or the user's ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_base_url(url: str) -> str:
    """'http://host:port' (a trailing /v1 or / is dropped); anything else is a UserError."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--base-url must be an http(s) URL like http://127.0.0.1:8000, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise UserError(f"--base-url has a bad port: {url!r}") from None
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{parts.scheme}://{parts.netloc}{path}"


class Server:
    """A `tokenlean serve` subprocess on a free 127.0.0.1 port, stopped by `stop()`."""

    def __init__(self, args):
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tokenlean.cli", "serve", "--port", str(self.port),
               "--host", "127.0.0.1", "--device", args.device, "--dtype", args.dtype,
               "--method", args.method, "--max-queue", str(max(64, args.num_prompts))]
        if args.model:
            cmd += ["--model", args.model]
        for pair in args.method_arg:
            cmd += ["--method-arg", pair]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        self.log = tempfile.TemporaryFile("w+", prefix="tokenlean-bench-serve-")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def wait_ready(self, httpx, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"the server exited with status {self.proc.returncode}: "
                                f"{self.last_line() or 'no output'}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise UserError(f"the server did not answer /health within {timeout:.0f} s")

    def last_line(self) -> str:
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def served_model(httpx, base_url: str, api_key: str | None) -> tuple[str, int | None]:
    """The id and max_model_len (None if not given) of the server's first model; an
    unreachable or odd server is a UserError."""
    try:
        r = httpx.get(f"{base_url}/v1/models", headers=_headers(api_key),
                      timeout=CONNECT_TIMEOUT_S)
    except httpx.HTTPError as e:
        raise UserError(f"cannot reach the server at {base_url}: "
                        f"{type(e).__name__}: {e}".rstrip(": ")) from None
    if r.status_code != 200:
        raise UserError(f"{base_url}/v1/models answered HTTP {r.status_code}"
                        + (" (wrong or missing --api-key?)" if r.status_code == 401 else ""))
    try:
        first = r.json()["data"][0]
        context = first.get("max_model_len")
        return first["id"], context if isinstance(context, int) else None
    except (ValueError, KeyError, IndexError, TypeError):
        raise UserError(f"{base_url}/v1/models did not list a model") from None


# ---- /metrics: the speculative-decoding counters ----

def read_spec_counters(httpx, base_url: str) -> dict | None:
    """{'drafts', 'draft_tokens', 'accepted_tokens', 'per_pos': {pos: n}} summed over label
    sets, or None when /metrics is missing or has no speculative-decoding counters."""
    try:
        r = httpx.get(f"{base_url}/metrics", timeout=CONNECT_TIMEOUT_S)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    return parse_spec_counters(r.text)


def parse_spec_counters(text: str) -> dict | None:
    names = {v: k for k, v in SPEC_COUNTERS.items()}
    out: dict = {"per_pos": {}}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        try:
            v = float(value)
        except ValueError:
            continue
        if name in names:
            out[names[name]] = out.get(names[name], 0.0) + v
        elif name == PER_POS:
            pos = re.search(r'position="(\d+)"', labels or "")
            if pos:
                out["per_pos"][int(pos.group(1))] = out["per_pos"].get(int(pos.group(1)), 0) + v
    if not any(k in out for k in SPEC_COUNTERS):
        return None
    return out


def spec_block(before: dict | None, after: dict | None) -> dict | None:
    """vLLM's speculative-decoding figures from the counters' growth during the run."""
    if after is None:
        return None
    before = before or {"per_pos": {}}
    d = {k: int(round(after.get(k, 0) - before.get(k, 0))) for k in SPEC_COUNTERS}
    positions = range(max(after["per_pos"], default=-1) + 1)  # a missing label counted 0
    per_pos = [int(round(after["per_pos"].get(p, 0) - before["per_pos"].get(p, 0)))
               for p in positions]
    drafts, draft_tokens, accepted = d["drafts"], d["draft_tokens"], d["accepted_tokens"]
    return {
        **d,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        "accepted_per_position": per_pos,
        "acceptance_rate_per_position": [n / drafts for n in per_pos] if drafts else [],
    }


# ---- the load ----

def _payload(model: str, prompt: list[int] | str, max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


def _one_line(message: str, limit: int = 300) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit] + "..."


def accepts_token_ids(httpx, base_url: str, model: str, ids: list[int], text: str,
                      api_key: str | None) -> bool:
    """Whether /v1/completions takes a token-id prompt: a 1-token request with `ids` (it also
    warms the server up); if that fails and the same prompt as `text` succeeds, no.
    (llama_cpp.server answers a token-id prompt with HTTP 500, its validation error.)"""
    def ok(prompt) -> bool:
        try:
            r = httpx.post(f"{base_url}/v1/completions", headers=_headers(api_key),
                           json={"model": model, "prompt": prompt, "max_tokens": 1,
                                 "temperature": 0}, timeout=READ_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    return ok(ids) or not ok(text)


async def _one(client, url: str, payload: dict, headers: dict,
               prompt_tokens: int | None = None) -> RequestResult:
    res = RequestResult(prompt_tokens=len(payload["prompt"]) if prompt_tokens is None
                        else prompt_tokens)
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode("utf-8", "replace")
                try:
                    message = json.loads(body)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = body[:200]
                res.error = _one_line(f"HTTP {r.status_code}: {message}")
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    res.ok = res.error is None
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message", chunk["error"]))
                    break
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"].get("completion_tokens", 0)
                    res.usage = True
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    chunks += 1
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
            else:
                res.error = res.error or "the stream ended without [DONE]"
    except Exception as e:  # a failed request is counted, never fatal
        res.error = f"{type(e).__name__}: {e}"
    res.e2e_s = time.perf_counter() - start
    if not res.usage:
        res.output_tokens = chunks
    if res.ok and res.ttft_s is None:  # nothing streamed (e.g. an immediate stop)
        res.ttft_s = res.e2e_s
    return res


async def run_load(base_url: str, model: str, prompts: list[list[int]], max_tokens: int,
                   request_rate: float, max_concurrency: int, api_key: str | None,
                   on_done=None, seed: int = SEED,
                   texts: list[str] | None = None) -> tuple[list[RequestResult], float]:
    """`texts`: send these (the prompts decoded) instead of the token ids."""
    import httpx

    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency)
    url, headers = f"{base_url}/v1/completions", _headers(api_key)
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def limited(ids, text):
            async with limit:
                res = await _one(client, url, _payload(model, ids if text is None else text,
                                                       max_tokens), headers, len(ids))
            if on_done:
                on_done(res)
            return res

        start = time.perf_counter()
        tasks = []
        for i, ids in enumerate(prompts):
            if i and math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.create_task(limited(ids, texts[i] if texts else None)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def _stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ms = sorted(v * 1e3 for v in values)
    p99 = ms[min(len(ms) - 1, max(0, math.ceil(0.99 * len(ms)) - 1))]
    return {"mean": statistics.fmean(ms), "median": statistics.median(ms), "p99": p99}


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
            if r.output_tokens > 1 and r.ttft_s is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else None,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else None,
        "ttft_ms": _stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": _stats_ms(tpot),
        "itl_ms": _stats_ms([g for r in ok for g in r.itl_s]),
        "e2e_ms": _stats_ms([r.e2e_s for r in ok]),
        "errors": errors,
    }


# ---- the command ----

def _command(args, started_here: bool) -> str:
    parts = ["tokenlean", "bench", "serve"]
    if started_here:
        if args.model:
            parts += ["--model", args.model]
        parts += ["--device", args.device, "--dtype", args.dtype, "--method", args.method]
        for pair in args.method_arg:
            parts += ["--method-arg", pair]
        if args.threads:
            parts += ["--threads", str(args.threads)]
    else:
        parts += ["--base-url", args.base_url]
        if args.model:
            parts += ["--model", args.model]
    parts += ["--num-prompts", str(args.num_prompts), "--max-concurrency",
              str(args.max_concurrency), "--request-rate", str(args.request_rate),
              "--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens),
              "--out", str(args.out)]
    return shlex.join(parts)


def _check_args(args) -> None:
    if not (args.request_rate > 0):
        raise UserError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")


def run_serve_bench(args) -> dict:
    try:
        import httpx
    except ImportError:
        raise UserError("bench serve needs httpx: pip install 'tokenlean[serve]'") from None
    from tokenlean.bench.prompts import heldout_prompts
    from tokenlean.lm import resolve_model
    from tokenlean.model.tokenizer import Tokenizer
    from tokenlean.spec_decode.registry import check_method, parse_method_args

    _check_args(args)
    started = utc_now()
    started_here = args.base_url is None
    if started_here:
        check_method(args.method)  # bad options fail before anything starts
        parse_method_args(args.method, args.method_arg)
    else:
        args.base_url = check_base_url(args.base_url)
    # the prompts are token ids, cut with the served model's tokenizer (no weights loaded)
    model_name, folder = resolve_model(args.model)
    prompts = heldout_prompts(Tokenizer(folder), args.num_prompts, args.prompt_tokens)

    server = Server(args) if started_here else None
    try:
        if server is not None:
            server.wait_ready(httpx)
        base_url = server.base_url if server else args.base_url
        model, context = served_model(httpx, base_url, args.api_key)
        if context is not None and args.prompt_tokens >= context:
            raise UserError(f"--prompt-tokens {args.prompt_tokens} leaves no room to generate: "
                            f"the served model's context is {context} tokens")
        texts, notes = None, []
        tokenizer = Tokenizer(folder)
        first = tokenizer.decode(prompts[0].ids, skip_special_tokens=False)
        if not started_here and not accepts_token_ids(httpx, base_url, model, prompts[0].ids,
                                                      first, args.api_key):
            texts = [tokenizer.decode(p.ids, skip_special_tokens=False) for p in prompts]
            notes.append("the server refused token-id prompts: the prompts went as text (the "
                         "same ids decoded), so its own tokenizer set their length; "
                         "total_input_tokens counts the ids")
        before = read_spec_counters(httpx, base_url)
        results, duration = _run_with_progress(base_url, model, [p.ids for p in prompts], args,
                                               texts)
        after = read_spec_counters(httpx, base_url)
    finally:
        if server is not None:
            server.stop()

    summary = summarize(results, duration)
    if any(r.ok and not r.usage for r in results):
        notes.append("the server streamed no usage chunk: output tokens are the streamed text "
                     "chunks (one token each on llama.cpp's server)")
    short = sum(1 for r in results if r.ok and r.output_tokens < args.max_tokens)
    if short:
        notes.append(f"{short} of {summary['completed']} requests got fewer than --max-tokens "
                     f"{args.max_tokens} tokens: the server ended them (EOS, a stop rule; "
                     "llama_cpp.server also cuts a stream when another request arrives, "
                     "unless started with --interrupt_requests False)")
    spec = spec_block(before, after)
    if spec is None:
        notes.append("speculative decoding: unavailable, the server's /metrics has no "
                     "speculative-decoding counters (tokenlean's or vLLM's) or is missing")
    if not started_here:
        notes.append("an external server: its /metrics counters include any other traffic "
                     "during the run")
    result = {
        "benchmark": "serve",
        "command": _command(args, started_here),
        "argv": sys.argv,
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((utc_now() - started).total_seconds(), 3),
        "machine": machine_info(),
        "model": {"name": model_name, "served_id": model, "tokenizer_folder": str(folder)},
        "server": {"base_url": base_url, "started_here": started_here,
                   "method": args.method if started_here else None,
                   "method_args": list(args.method_arg) if started_here else None},
        "setup": {"num_prompts": args.num_prompts, "prompt_tokens": args.prompt_tokens,
                  "max_tokens": args.max_tokens, "temperature": 0,
                  "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
                  "max_concurrency": args.max_concurrency, "seed": SEED,
                  "endpoint": "/v1/completions", "stream": True},
        **summary,
        "spec_decode": spec,
        "prompts": [p.to_json() for p in prompts],
        "prompt_format": "token ids" if texts is None else "text",
        "notes": notes,
    }
    path = write_json(result, args.out, "serve", started)
    print_serve_table(result, path)
    return result


def _run_with_progress(base_url, model, prompts, args, texts=None):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("requests", total=len(prompts))
        return asyncio.run(run_load(base_url, model, prompts, args.max_tokens, args.request_rate,
                                    args.max_concurrency, args.api_key,
                                    on_done=lambda _: progress.advance(task), texts=texts))


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
