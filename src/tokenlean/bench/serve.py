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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tokenlean.bench.report import _fmt, machine_info, table_console, utc_now, write_json
from tokenlean.errors import UserError

SEED = 0
STARTUP_TIMEOUT_S = 180.0
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 300.0  # the longest wait for the next chunk (queued behind other requests)
DEFAULT_PROMPTS = 32  # --num-prompts of a single run
MIN_LEVEL_PROMPTS = 8  # the fewest requests of a sweep level (see level_prompts)

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
    injected: bool = False  # the long prompt sent mid-run (--long-prompt-tokens)


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


def parse_base_urls(values: list[str] | None) -> dict[str, str]:
    """`--base-url [NAME=]URL`, repeatable -> {label: checked URL}. A plain URL is labelled
    by its host:port; a NAME holds no '://' (so 'http://h/?a=b' stays a plain URL)."""
    urls: dict[str, str] = {}
    for value in values or []:
        name, sep, url = value.partition("=")
        if not sep or "://" in name:
            name, url = "", value
        elif not name.strip():
            raise UserError(f"--base-url NAME=URL needs a name before '=', got {value!r}")
        url = check_base_url(url)
        name = name.strip() or urlsplit(url).netloc
        if name in urls:
            raise UserError(f"--base-url: the label {name!r} is given twice")
        urls[name] = url
    return urls


def parse_concurrency(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (sorted, repeats dropped); anything else is a UserError."""
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--concurrency takes comma-separated integers like 1,2,4,8, "
                        f"got {text!r}") from None
    if min(levels) < 1:
        raise UserError(f"--concurrency levels must be >= 1, got {text!r}")
    return sorted(set(levels))


def level_prompts(concurrency: int, num_prompts: int | None) -> int:
    """Requests at one sweep level: --num-prompts if given, else two waves of `concurrency`
    requests and at least 8, so that every level fills its slots more than once."""
    return num_prompts or max(MIN_LEVEL_PROMPTS, 2 * concurrency)


class Server:
    """A `tokenlean serve` subprocess on a free 127.0.0.1 port, stopped by `stop()`."""

    def __init__(self, args, requests: int):
        """`requests`: the most the benchmark sends at once (the server queues them all)."""
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tokenlean.cli", "serve", "--port", str(self.port),
               "--host", "127.0.0.1", "--device", args.device, "--dtype", args.dtype,
               "--method", args.method, "--max-queue", str(max(64, requests))]
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
                   on_done=None, seed: int = SEED, texts: list[str] | None = None,
                   long_prompt: list[int] | None = None,
                   long_text: str | None = None) -> tuple[list[RequestResult], float]:
    """`texts`: send these (the prompts decoded) instead of the token ids. `long_prompt`
    (or `long_text`): one extra request, sent once half of the others have finished and
    outside the concurrency limit (it arrives while the others decode); it comes last in
    the results, marked `injected`."""
    import httpx

    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency)
    url, headers = f"{base_url}/v1/completions", _headers(api_key)
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    connections = max_concurrency + 1  # a connection for the long prompt too
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    half_done = asyncio.Event()
    finished = 0

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def send(ids, text):
            res = await _one(client, url, _payload(model, ids if text is None else text,
                                                   max_tokens), headers, len(ids))
            if on_done:
                on_done(res)
            return res

        async def limited(ids, text):
            nonlocal finished
            async with limit:
                res = await send(ids, text)
            finished += 1
            if finished >= len(prompts) // 2:
                half_done.set()
            return res

        async def injected():
            await half_done.wait()
            res = await send(long_prompt, long_text)
            res.injected = True
            return res

        start = time.perf_counter()
        if len(prompts) // 2 == 0:  # a single request: the long one comes with it
            half_done.set()
        tasks = []
        for i, ids in enumerate(prompts):
            if i and math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.create_task(limited(ids, texts[i] if texts else None)))
        if long_prompt is not None:
            tasks.append(asyncio.create_task(injected()))
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
    """A run with the long prompt: the figures of the OTHER requests, and the long one's."""
    others = [r for r in results if not r.injected]
    [long] = [r for r in results if r.injected]
    s = summarize(others, duration_s)
    return {"requests": len(results) - len(others), "prompt_tokens": long.prompt_tokens,
            "others": {k: s[k] for k in ("completed", "failed", "ttft_ms", "itl_ms", "e2e_ms",
                                          "errors")},
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
            row["long_prompt"]["ttft_p99_vs_lowest"] = _ratio(
                row["long_prompt"]["others"]["ttft_ms"]["p99"], base["ttft_ms"]["p99"])


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
