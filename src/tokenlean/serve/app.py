"""The FastAPI app: OpenAI-compatible endpoints, /health and Prometheus /metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenlean.decode import check_prompt
from tokenlean.engine.scheduler import CacheFull, SchedulerConfig
from tokenlean.engine.sequence import TokenLogprob
from tokenlean.errors import UserError
from tokenlean.sampling import SamplingParams
from tokenlean.serve.engine import (
    ClientGone,
    Engine,
    Job,
    QueueFull,
    RequestTimeout,
    ServerShutdown,
)
from tokenlean.serve.schemas import (
    CHAT_MAX_TOKENS,
    COMPLETION_MAX_TOKENS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)

ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
# Open even with --api-key: load balancers and Prometheus scrapers send no key. Everything
# else needs it, FastAPI's /docs, /redoc and /openapi.json included (they map the API).
OPEN_PATHS = ("/health", "/metrics")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


class Metrics:
    """Prometheus metrics, named like vLLM's (prefix `tokenlean:`), in their own registry."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tokenlean:requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("tokenlean:time_to_first_token_seconds",
                              "Arrival to first text delta", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tokenlean:inter_token_latency_seconds",
                             "Time between consecutive text deltas", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.e2e = Histogram("tokenlean:e2e_request_latency_seconds",
                             "Arrival to the end of the generation", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.prompt_tokens = Counter("tokenlean:prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter("tokenlean:generation_tokens", "Tokens generated",
                                         registry=r)
        self.cancelled = Counter("tokenlean:requests_cancelled",
                                 "Generations stopped because the client went away", registry=r)
        self.timed_out = Counter("tokenlean:requests_timed_out",
                                 "Requests stopped by the server's request timeout", registry=r)
        self.waiting = Gauge("tokenlean:num_requests_waiting", "Requests in the queue", registry=r)
        self.running = Gauge("tokenlean:num_requests_running",
                             "Requests in the running batch", registry=r)
        self.drafts = Counter("tokenlean:spec_decode_num_drafts",
                              "Speculative steps that drafted at least one token", registry=r)
        self.draft_tokens = Counter("tokenlean:spec_decode_num_draft_tokens",
                                    "Draft tokens proposed", registry=r)
        self.accepted_tokens = Counter("tokenlean:spec_decode_num_accepted_tokens",
                                       "Draft tokens accepted", registry=r)
        self.accepted_per_pos = Counter("tokenlean:spec_decode_num_accepted_tokens_per_pos",
                                        "Steps that accepted a draft token at this position",
                                        ["position"], registry=r)

    def watch(self, engine: Engine) -> None:
        """Count what the engine's scheduler counts (prefix cache, batched steps), read at
        each scrape."""
        self.registry.register(SchedulerCollector(engine))

    def observe_result(self, result, e2e_s: float) -> None:
        self.e2e.observe(e2e_s)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.completion_tokens)
        stats = result.stats or {}
        if "drafts" in stats:
            self.drafts.inc(stats.get("drafts", 0))
            self.draft_tokens.inc(stats.get("drafted_tokens", 0))
            self.accepted_tokens.inc(stats.get("accepted_tokens", 0))
            for pos, n in enumerate(stats.get("accepted_at_depth") or []):
                self.accepted_per_pos.labels(position=str(pos)).inc(n)


class SchedulerCollector:
    """The scheduler's own counters as Prometheus counters, read when /metrics is scraped
    (the worker thread only adds to plain ints; nothing is copied on its hot path)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        s = self.engine.scheduler
        values = {
            "prefix_cache_hits": ("Requests that reused cached KV entries of a shared prefix",
                                  s.prefix.hits if s else 0),
            "prefix_cache_misses": ("Requests that found no cached prefix",
                                    s.prefix.misses if s else 0),
            "prefix_cache_reused_tokens": ("Prompt tokens whose KV entries came from the "
                                           "prefix cache", s.prefix.reused_tokens if s else 0),
            "batch_steps": ("Batched forward steps", s.steps if s else 0),
            "batch_step_tokens": ("Tokens fed over all batched steps (divide by "
                                  "batch_steps for the mean step size)",
                                  s.batch_tokens if s else 0),
        }
        for name, (doc, value) in values.items():
            yield CounterMetricFamily(f"tokenlean:{name}", doc, value=value)


def served_name(name: str) -> str:
    """The model id clients send: a zoo name as is, a checkpoint folder by its last part."""
    return Path(name).name if ("/" in name or Path(name).exists()) else name


def create_app(lm, method: str = "greedy", method_args: dict | None = None, kv=None,
               api_key: str | None = None, max_queue: int = 64,
               model_id: str | None = None, request_timeout: float | None = 300.0,
               scheduler: SchedulerConfig | None = None,
               max_body_bytes: int = 8 * 2**20) -> FastAPI:
    """`request_timeout`: seconds from arrival after which a request still waiting or
    generating is cancelled and answered with a 504 `timeout` error (None or <= 0: no limit).
    `max_body_bytes`: larger request bodies get a 413 before they are read in full.
    `kv`: the server's KV-cache policy (kv.registry.KVConfig), the same for every request.
    `scheduler`: continuous batching's limits (batch size, step tokens, KV memory, prefix
    cache)."""
    metrics = Metrics()
    engine = Engine(lm, method, method_args, kv=kv, max_queue=max_queue, metrics=metrics,
                    config=scheduler)
    metrics.watch(engine)
    model_id = model_id or served_name(lm.name)
    accepted_names = {model_id, lm.name, str(lm.folder)}
    created = int(time.time())
    if request_timeout is not None and request_timeout <= 0:
        request_timeout = None

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="tokenlean", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    # ---- errors: always OpenAI's shape, never a 5xx for bad input ----
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        message = first.get("msg", "invalid request")
        if not loc:
            message = f"the request body must be a JSON object ({message})"
        param = loc[0] if loc else None
        where = ".".join(loc)
        return error_response(400, f"{where}: {message}" if where else message, param=param,
                              code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(UserError)
    async def _user(request: Request, exc: UserError):
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    app.add_middleware(AuthAndCount, api_key=api_key, metrics=metrics)
    # A prompt of more characters than this has more tokens than the context can hold
    # (no token is longer): refused before it is tokenized.
    longest_token = max(len(t) for t in lm.tokenizer.tok.get_vocab())
    max_prompt_chars = lm.context * max(longest_token, 1)

    # ---- endpoints ----
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "waiting": engine.waiting,
                "running": engine.running, "busy": engine.busy}

    @app.get("/metrics")
    async def prometheus():
        metrics.waiting.set(engine.waiting)
        metrics.running.set(engine.running)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": created, "owned_by": "tokenlean",
            "max_model_len": lm.context, "method": method,
            "kv_policy": str(kv) if kv is not None else "none"}]}

    def check_common(body: SamplingFields) -> SamplingParams:
        if body.model is not None and body.model not in accepted_names:
            raise ApiError(404, f"The model `{body.model}` does not exist; this server serves "
                           f"`{model_id}`", param="model", code="model_not_found")
        refused = body.unsupported()
        if refused:
            name, why = refused
            raise ApiError(400, f"{name}={json.dumps(getattr(body, name))} is not supported: "
                           f"{why}", param=name, code="unsupported_value")
        stops = body.stop_list()
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"at most {MAX_STOPS} stop sequences, got {len(stops)}",
                           param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"a stop sequence may have at most {MAX_STOP_CHARS} "
                           "characters", param="stop")
        for s in stops:
            check_text(s, "stop")
        try:
            return SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=max(body.top_k or 0, 0),
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=body.seed, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty)
        except UserError as e:
            raise ApiError(400, str(e), code="invalid_value") from None

    async def tokenize(text: str, param: str) -> list[int]:
        """Off the event loop: a long prompt must not stall other requests and /health."""
        check_text(text, param)
        if len(text) > max_prompt_chars:
            raise ApiError(400, f"the prompt has {len(text)} characters, more than the "
                           f"{lm.context}-token context can hold", param=param,
                           code="context_length_exceeded")
        return await asyncio.to_thread(lm.encode, text)

    def make_job(prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                 stop: list[str], param: str, logprobs: int | None = None,
                 prompt_logprobs: bool = False) -> Job:
        try:
            check_prompt(prompt_ids, lm.context, max_tokens)
        except UserError as e:
            raise ApiError(400, str(e), param=param,
                           code="context_length_exceeded" if prompt_ids else "invalid_value"
                           ) from None
        if any(t < 0 or t >= lm.model.config.vocab_size for t in prompt_ids):
            raise ApiError(400, "prompt token ids must be in [0, vocab size)", param=param)
        job = Job(prompt_ids, max_tokens, sampling, stop, asyncio.get_running_loop(),
                  timeout=request_timeout, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(503, str(e), "server_error", code="queue_full") from None
        return job

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        sampling = check_common(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (a list of one string is accepted)",
                               param="prompt", code="unsupported_value")
            prompt = prompt[0]
        ids = await tokenize(prompt, "prompt") if isinstance(prompt, str) else list(prompt)
        max_tokens = body.max_tokens or COMPLETION_MAX_TOKENS
        scores_prompt = body.echo and body.logprobs is not None  # the prompt's own logprobs
        job = make_job(ids, max_tokens, sampling, body.stop_list(), "prompt", body.logprobs,
                       scores_prompt)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = (prompt if isinstance(prompt, str) else lm.tokenizer.decode(ids)) if body.echo else ""
        offset = [0 if scores_prompt else len(echo)]  # text_offset of the next token

        def with_first(prompt_lps: list) -> list:  # the first prompt token has no logprob
            return [TokenLogprob(ids[0], None, None), *prompt_lps]

        def chunk(text: str, finish: str | None, logprobs=None) -> dict:
            return {"id": rid, "object": "text_completion", "created": now, "model": model_id,
                    "choices": [{"index": 0, "text": text,
                                 "logprobs": completion_logprobs(logprobs, offset)
                                 if body.logprobs is not None else None,
                                 "finish_reason": finish}]}

        if body.stream:  # the echo goes first; with logprobs, once the prompt is scored
            first = chunk(echo, None) if echo and not scores_prompt else None
            on_prompt = (lambda lps: chunk(echo, None, with_first(lps))) if scores_prompt else None
            return _sse(job, metrics, body.include_usage, lambda d, lp: chunk(d, None, lp),
                        lambda r: chunk("", r.finish_reason, []),
                        {"id": rid, "object": "text_completion", "created": now,
                         "model": model_id, "choices": []}, first, on_prompt)
        result = await _collect(job, metrics, request)
        logprobs = result.logprobs
        if scores_prompt:
            logprobs = with_first(result.prompt_logprobs) + logprobs
        out = chunk(echo + result.text, result.finish_reason, logprobs)
        out["usage"] = _usage(result)
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        sampling = check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        for m in messages:
            check_text(m["content"], "messages")
        try:
            prompt = lm.tokenizer.apply_chat_template(messages)
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = await tokenize(prompt, "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_MAX_TOKENS
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = make_job(ids, max_tokens, sampling, body.stop_list(), "messages", top)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id}
        first = [True]

        def logprobs_of(lps) -> dict | None:
            return chat_logprobs(lps) if body.logprobs else None

        def delta_chunk(text: str, lps=None) -> dict:
            delta = {"content": text}
            if first[0]:
                delta["role"], first[0] = "assistant", False
            return {**base, "choices": [{"index": 0, "delta": delta,
                                         "logprobs": logprobs_of(lps),
                                         "finish_reason": None}]}

        def final_chunk(result) -> dict:
            delta = {"role": "assistant", "content": ""} if first[0] else {}
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": result.finish_reason}]}

        if body.stream:
            return _sse(job, metrics, body.include_usage, delta_chunk, final_chunk,
                        {**base, "choices": []})
        result = await _collect(job, metrics, request)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": logprobs_of(result.logprobs),
                             "finish_reason": result.finish_reason}],
                "usage": _usage(result)}

    def token_text(token: int) -> str:
        return lm.tokenizer.decode([token], skip_special_tokens=False)

    def completion_logprobs(lps, offset: list[int]) -> dict:
        """OpenAI's legacy shape: parallel lists; `offset[0]`, the next token's
        text_offset, moves on as chunks go out."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps or []:
            text = token_text(lp.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append(None if lp.top is None
                                       else {token_text(t): v for t, v in lp.top})
            out["text_offset"].append(offset[0])
            offset[0] += len(text)
        return out

    def chat_logprobs(lps) -> dict:
        def entry(token: int, logprob: float) -> dict:
            text = token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(lp.token, lp.logprob),
                             "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps or []]}

    return app


class AuthAndCount:
    """Pure ASGI middleware (streaming and disconnects pass through untouched): checks the
    Bearer key on every path but OPEN_PATHS when one is set, and counts responses by endpoint
    and status."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = [500]
        try:
            if self.api_key is not None and path not in OPEN_PATHS:
                header = dict(scope.get("headers") or []).get(b"authorization", b"")
                scheme, _, token = header.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                        token.strip().encode("latin-1"), self.api_key.encode()):
                    status[0] = 401
                    response = error_response(401, "invalid or missing API key "
                                              "(Authorization: Bearer KEY)",
                                              code="invalid_api_key")
                    return await response(scope, receive, send)

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(_endpoint(path), str(status[0])).inc()


class LimitBody:
    """Pure ASGI middleware: a request body over `max_bytes` gets a 413 (by its
    Content-Length at once, else as soon as the streamed body passes the limit)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:  # read the body here, so an oversized one never reaches a handler
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(message)
            if not message.get("more_body", False):
                break

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(413, f"the request body is larger than the server's limit "
                                  f"of {self.max_bytes / 2**20:g} MB (--max-body-mb)",
                                  code="request_too_large")
        await response(scope, receive, send)


def check_text(text: str, param: str) -> None:
    """Text from JSON may hold a lone UTF-16 surrogate ("\\ud800"), which is not Unicode
    text and which no tokenizer takes: a 400, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param} holds a lone UTF-16 surrogate "
                       f"({text[e.start]!a} at character {e.start}); send valid Unicode text",
                       param=param, code="invalid_value") from None


def run(app: FastAPI, sock, shutdown_timeout: float | None = 30.0) -> None:
    """Serve on a bound socket until SIGINT/SIGTERM (see graceful_server)."""
    graceful_server(app, shutdown_timeout).run(sockets=[sock])


def graceful_server(app: FastAPI, shutdown_timeout: float | None = 30.0, **config):
    """A uvicorn server that, on SIGINT/SIGTERM, refuses new connections and gives the
    requests in flight `shutdown_timeout` seconds to finish; those still waiting or
    generating after it are stopped and answered with a 503 `server_shutdown` error (a
    streaming client gets it as its last event). None: wait for them without a limit."""
    import threading

    import uvicorn

    engine = app.state.engine

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if shutdown_timeout is not None and not self.should_exit:
                timer = threading.Timer(shutdown_timeout, engine.cancel_all)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    # uvicorn's own limit, a backstop a few seconds after ours: it drops the connections
    backstop = None if shutdown_timeout is None else shutdown_timeout + 5
    return GracefulServer(uvicorn.Config(app, log_level="warning",
                                         timeout_graceful_shutdown=backstop, **config))


def _endpoint(path: str) -> str:
    return path if path in ENDPOINTS else "other"


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


TIMEOUT_STATUS = 504


def _timeout_body(job: Job) -> dict:
    return error_body(str(job.timeout_error()), "timeout", None, "request_timeout")


async def _next_event(job: Job, metrics: Metrics):
    """The job's next (kind, value); a RequestTimeout error once its deadline has passed
    (the job is cancelled: the worker stops at its next token). Counted once in metrics."""
    deadline = job.deadline
    try:
        if deadline is None:
            kind, value = await job.out.get()
        else:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise asyncio.TimeoutError
            kind, value = await asyncio.wait_for(job.out.get(), remaining)
    except asyncio.TimeoutError:
        kind, value = "error", job.timeout_error()
    if kind == "error" and isinstance(value, RequestTimeout):
        job.cancel()
        metrics.timed_out.inc()
    return kind, value


def _raise_job_error(exc: Exception):
    if isinstance(exc, RequestTimeout):
        raise ApiError(TIMEOUT_STATUS, str(exc), "timeout", code="request_timeout")
    if isinstance(exc, UserError):
        raise ApiError(400, str(exc))
    if isinstance(exc, CacheFull):
        raise ApiError(503, str(exc), "server_error", code="kv_cache_full")
    if isinstance(exc, ServerShutdown):
        raise ApiError(503, str(exc), "server_error", code="server_shutdown")
    if isinstance(exc, ClientGone):  # nobody reads this answer; nginx's code for it
        raise ApiError(499, "the client closed the request", code="client_closed_request")
    raise ApiError(500, f"generation failed: {type(exc).__name__}", "server_error")


DISCONNECT_POLL_S = 0.25


async def _collect(job: Job, metrics: Metrics, request: Request | None = None):
    """The job's result; the generation stops if the client goes away meanwhile (checked
    every DISCONNECT_POLL_S: a non-streaming client sends nothing else to notice)."""
    watcher = asyncio.create_task(_watch_disconnect(job, request)) if request else None
    try:
        while True:
            kind, value = await _next_event(job, metrics)
            if kind == "done":
                return value
            if kind == "error":
                _raise_job_error(value)
    finally:
        job.cancel()  # a no-op once done; stops the generation if the client went away
        if watcher:
            watcher.cancel()


async def _watch_disconnect(job: Job, request: Request) -> None:
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def _error_event(exc: Exception) -> dict:
    """A generation's error as the body its status code would carry, for an SSE event."""
    try:
        _raise_job_error(exc)
    except ApiError as e:
        return error_body(e.message, e.type, e.param, e.code)


def _sse(job: Job, metrics: Metrics, include_usage: bool, on_delta, on_final, usage_base: dict,
         first: dict | None = None, on_prompt=None):
    """Server-sent events: `first` (e.g. the echoed prompt), the chunk `on_prompt` makes of
    the prompt's logprobs when they were asked for, a chunk per delta (text, and the
    logprobs of the tokens behind it when asked for), the final chunk, usage, [DONE]."""
    def line(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def content(obj: dict) -> str:  # a content chunk: "usage": null while usage is on
        if include_usage:
            obj["usage"] = None
        return line(obj)

    async def events():
        try:
            if first is not None:
                yield content(first)
            while True:
                kind, value = await _next_event(job, metrics)
                if kind == "prompt":
                    if on_prompt is not None:
                        yield content(on_prompt(value))
                elif kind == "delta":
                    text, logprobs = value
                    if text or logprobs:
                        yield content(on_delta(text, logprobs))
                elif kind == "done":
                    yield content(on_final(value))
                    if include_usage:
                        yield line({**usage_base, "usage": _usage(value)})
                    break
                elif isinstance(value, RequestTimeout):
                    yield line(_timeout_body(job))
                    break
                else:
                    yield line(_error_event(value))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # client disconnected (or finished): the worker stops between tokens

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
