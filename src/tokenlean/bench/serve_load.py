"""The load side of `tokenlean bench serve`: the server under test (ours as a subprocess,
or the user's), its `/metrics` speculative-decoding counters, and the streaming requests
with their per-request timings and summaries. The command, sweeps and tables are in
bench/serve.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

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
    sent_s: float | None = None  # time.perf_counter() when the request was sent

    def waiting(self) -> tuple[float, float] | None:
        """(sent, first token) on the perf_counter clock, once both are known."""
        if self.sent_s is None or self.ttft_s is None:
            return None
        return self.sent_s, self.sent_s + self.ttft_s


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
    start = res.sent_s = time.perf_counter()
    last = None
    chunks = 0
    finished = False  # a chunk carried a finish_reason
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
                if choices and choices[0].get("finish_reason"):
                    finished = True
                if choices and choices[0].get("text"):
                    chunks += 1
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
            else:  # transformers serve ends with the finish_reason chunk and no [DONE]
                if finished and res.error is None:
                    res.ok = True
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


def stats_ms(values: list[float]) -> dict:
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
        "ttft_ms": stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": stats_ms(tpot),
        "itl_ms": stats_ms([g for r in ok for g in r.itl_s]),
        "e2e_ms": stats_ms([r.e2e_s for r in ok]),
        "errors": errors,
    }
