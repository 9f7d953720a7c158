"""The batching server under a mixed concurrent load, as clients really send it.

Sixteen requests at once: greedy and seeded-sampled, streaming and not, short and long,
some cancelled mid-stream by their client, some running past the server's request
timeout. No stream may carry another's text, every finished greedy output equals
offline generation, sampled outputs equal their offline seeded run (they do not depend
on the batch), and afterwards the server is healthy and its metrics add up.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from test_serve import _slow_lm  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app):
        self.port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            if re.match(re.escape(name) + r"(\{.*\})? ", line):
                total += float(line.rsplit(" ", 1)[1])
    return total


PROMPTS = ["def add(a, b):\n", "import os\n", "class Stack:\n", "def f(x):\n    return",
           "for i in range(10):\n", "x = [", "def main():\n", "while True:\n"]


@pytest.fixture(scope="module")
def slow():
    return _slow_lm()


def _requests():
    """16 request bodies: kind in (greedy, sampled) x (stream, not), a cancel or timeout
    flag on some."""
    out = []
    for i in range(16):
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 6 + 5 * (i % 5),
                "temperature": 0.0 if i % 2 == 0 else 0.8, "stream": i % 4 >= 2}
        if body["temperature"]:
            body["seed"] = 100 + i
        role = "finish"
        if i in (3, 10):  # the client goes away after two chunks
            body.update(stream=True, max_tokens=400)
            role = "cancel"
        elif i in (5, 12):  # runs past the request timeout
            body.update(max_tokens=2000)
            role = "timeout"
        out.append((role, body))
    return out


async def _send(client, role, body):
    if not body["stream"]:
        r = await client.post("/v1/completions", json=body)
        data = r.json()
        if r.status_code != 200:
            return r.status_code, data, None
        return 200, data["choices"][0]["text"], data["usage"]
    text, usage, chunks = "", None, 0
    body = {**body, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return 504 if event["error"]["type"] == "timeout" else 500, event, None
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                text += choice["text"]
            chunks += 1
            if role == "cancel" and chunks >= 2:
                return "cancelled", text, None
    return 200, text, usage


def test_sixteen_mixed_concurrent_requests(slow):
    from tokenlean.sampling import SamplingParams
    from tokenlean.serve.app import create_app

    app = create_app(slow, request_timeout=4.0)
    requests = _requests()
    with _Server(app) as url:
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await asyncio.gather(*(_send(client, role, body) for role, body in requests))

        results = asyncio.run(main())
        health = httpx.get(f"{url}/health").json()
        metrics = httpx.get(f"{url}/metrics").text

    offline = slow.__class__(slow.name, slow.folder, slow.model._model, slow.tokenizer)
    finished_tokens = 0
    for (role, body), (status, text, usage) in zip(requests, results):
        if role == "cancel":
            assert status == "cancelled"
            continue
        if role == "timeout":
            assert status == 504, (status, text)
            continue
        assert status == 200, (body, text)
        sampling = SamplingParams(body["temperature"], seed=body.get("seed"))
        want = offline.generate(body["prompt"], body["max_tokens"], sampling)
        assert text == want.text, body  # nobody else's tokens, and the offline ones
        assert usage["completion_tokens"] == want.completion_tokens
        finished_tokens += usage["completion_tokens"]
    assert health["status"] == "ok" and health["waiting"] == 0
    assert _metric(metrics, "tokenlean:requests_cancelled_total") == 2
    assert _metric(metrics, "tokenlean:requests_timed_out_total") == 2
    assert _metric(metrics, "tokenlean:generation_tokens_total") == finished_tokens
    assert _metric(metrics, "tokenlean:num_requests_running") == 0
    # they ran side by side: more than one token per batched step on average
    assert _metric(metrics, "tokenlean:batch_step_tokens_total") > \
        1.5 * _metric(metrics, "tokenlean:batch_steps_total")
    # every prompt differs from the others' first 16-token block: no prefix reuse
    assert _metric(metrics, "tokenlean:prefix_cache_hits_total") == 0


def test_shared_prefix_is_reused_and_counted(slow):
    from tokenlean.serve.app import create_app

    system = "# a helper module shared by every request below\n" * 6
    app = create_app(slow, request_timeout=30.0)
    offline = slow.__class__(slow.name, slow.folder, slow.model._model, slow.tokenizer)
    with _Server(app) as url:
        for tail in ("def add(a, b):\n", "class Stack:\n", "import os\n"):
            body = {"prompt": system + tail, "max_tokens": 6, "temperature": 0}
            got = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
            assert got["choices"][0]["text"] == offline.generate(system + tail, 6).text
        metrics = httpx.get(f"{url}/metrics").text
    prompt_len = len(slow.encode(system))
    assert _metric(metrics, "tokenlean:prefix_cache_misses_total") == 1
    assert _metric(metrics, "tokenlean:prefix_cache_hits_total") == 2
    reused = _metric(metrics, "tokenlean:prefix_cache_reused_tokens_total")
    assert 2 * (prompt_len - 16) <= reused <= 2 * prompt_len
