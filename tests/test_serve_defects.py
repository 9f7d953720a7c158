"""The server defects found by trying it as a user would (issue 16), one test each.

Each test fails on the server as it was: a 500 for a lone surrogate, a generation that
outlives its non-streaming client, a tokenizer that blocks /health, unbounded stop
strings, OpenAI fields accepted and ignored, a SIGTERM that waits for everything.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_serve import _slow_lm  # noqa: E402
from test_serve_batch import _free_port, _metric, _Server  # noqa: E402


class _Running(_Server):
    """A server (tokenlean.serve.app.graceful_server) in a thread, on loopback."""

    def __init__(self, app, shutdown_timeout: float | None = 30.0):
        from tokenlean.serve.app import graceful_server

        self.port = _free_port()
        self.server = graceful_server(app, shutdown_timeout, host="127.0.0.1", port=self.port)
        self.thread = threading.Thread(target=self.server.run, daemon=True)


@pytest.fixture(scope="module")
def slow():
    return _slow_lm()


def _app(lm, **kw):
    from tokenlean.serve.app import create_app

    return create_app(lm, **kw)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def _raw_post(url: str, body: str) -> httpx.Response:
    return httpx.post(url, content=body, headers={"content-type": "application/json"},
                      timeout=30)


# --- 1. a lone UTF-16 surrogate is a 400, streaming or not -----------------------------------

def test_lone_surrogate_is_a_400(slow):
    lone = json.dumps("def f(\ud800):")  # JSON's own escape: "def f(\ud800):"
    bodies = {
        "/v1/completions": [
            ('{"prompt": LONE, "max_tokens": 2}'.replace("LONE", lone), "prompt"),
            ('{"prompt": [LONE], "max_tokens": 2}'.replace("LONE", lone), "prompt"),
            ('{"prompt": LONE, "max_tokens": 2, "stream": true}'.replace("LONE", lone), "prompt"),
            ('{"prompt": "ok", "stop": [LONE], "max_tokens": 2}'.replace("LONE", lone), "stop"),
        ],
        "/v1/chat/completions": [
            ('{"messages": [{"role": "user", "content": LONE}], "max_tokens": 2}'.replace("LONE", lone),
             "messages"),
            ('{"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}], '
             '"max_tokens": 2, "stream": true}'.replace("LONE", lone), "messages"),
        ],
    }
    with _Running(_app(slow)) as base:
        with httpx.Client(base_url=base, timeout=30) as client:  # one keep-alive connection
            for path, cases in bodies.items():
                for body, param in cases:
                    r = client.post(path, content=body,
                                    headers={"content-type": "application/json"})
                    err = _error(r, 400)
                    assert err["param"] == param and "surrogate" in err["message"], body
            # the connection was not reset: the next request on it is served
            ok = client.post("/v1/completions", json={"prompt": "x = 1", "max_tokens": 2})
            assert ok.status_code == 200


# --- 2. a non-streaming client that goes away stops its generation ---------------------------

def test_non_streaming_disconnect_stops_the_generation(slow):
    slow.model.steps = 0
    with _Running(_app(slow)) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json={"prompt": "def f(x):", "max_tokens": 2000},
                       timeout=0.5)
        deadline = time.time() + 20
        while _metric(httpx.get(f"{base}/metrics").text, "tokenlean:requests_cancelled_total") < 1:
            assert time.time() < deadline, "the generation was not cancelled"
            time.sleep(0.1)
        assert httpx.get(f"{base}/health").json()["running"] == 0
    assert slow.model.steps < 1500  # 2000 steps had it run to the end


# --- 3. body size capped; tokenizing a prompt does not block the server ----------------------

class _GatedTokenizer:
    """Encoding waits for `gate`, as a huge prompt keeps a tokenizer busy."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.gate, self.entered, self.calls = threading.Event(), threading.Event(), 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, text, **kw):
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(30)
        return self._tokenizer.encode(text, **kw)


def test_body_cap_is_a_413(slow):
    with _Running(_app(slow, max_body_bytes=10_000)) as base:
        big = json.dumps({"prompt": "x" * 20_000, "max_tokens": 2})
        err = _error(_raw_post(f"{base}/v1/completions", big), 413)  # by Content-Length
        assert err["code"] == "request_too_large"

        def chunked():  # no Content-Length: counted as it arrives
            yield big[:5000].encode()
            yield big[5000:].encode()

        r = httpx.post(f"{base}/v1/completions", content=chunked(), timeout=30,
                       headers={"content-type": "application/json"})
        _error(r, 413)
        small = json.dumps({"prompt": "x = 1", "max_tokens": 2})
        assert _raw_post(f"{base}/v1/completions", small).status_code == 200


def test_tokenizing_does_not_block_health(slow):
    import dataclasses

    gated = _GatedTokenizer(slow.tokenizer)
    lm = dataclasses.replace(slow, tokenizer=gated, drafters={})
    with _Running(_app(lm)) as base:
        result = {}

        def send():
            result["r"] = httpx.post(f"{base}/v1/completions",
                                     json={"prompt": "def f(x):", "max_tokens": 2}, timeout=30)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            assert gated.entered.wait(10)
            # the tokenizer is still busy: the event loop must answer meanwhile
            assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        finally:
            gated.gate.set()
            sender.join(30)
        assert result["r"].status_code == 200

        # far more characters than the context holds tokens: refused without tokenizing
        calls = gated.calls
        r = httpx.post(f"{base}/v1/completions", timeout=30,
                       json={"prompt": "y" * (lm.context * 200), "max_tokens": 2})
        assert _error(r, 400)["code"] == "context_length_exceeded"
        assert gated.calls == calls


# --- 4. stop strings: capped, and matched the same however the text is split ----------------

def test_stop_string_caps(slow):
    with _Running(_app(slow)) as base:
        url = f"{base}/v1/completions"
        err = _error(httpx.post(url, json={"prompt": "a", "stop": ["x"] * 17}, timeout=30), 400)
        assert err["param"] == "stop"
        err = _error(httpx.post(url, json={"prompt": "a", "stop": ["x" * 1001]}, timeout=30), 400)
        assert err["param"] == "stop" and "1000" in err["message"]
        ok = httpx.post(url, json={"prompt": "a", "stop": ["x" * 1000] * 16, "max_tokens": 2},
                        timeout=30)
        assert ok.status_code == 200


def _reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the stop string that completes first (earliest end, then longest)."""
    hits = [(i + len(s), i) for s in stops if s and (i := text.find(s)) >= 0]
    if not hits:
        return text, False
    # a later occurrence may end earlier than the first occurrence of a longer string
    ends = []
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        while i >= 0:
            ends.append((i + len(s), i))
            i = text.find(s, i + 1)
    return text[: min(ends)[1]], True


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc", max_size=40),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=6), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_stop_strings_match_a_reference_however_split(text, stops, cuts):
    from tokenlean.engine.text import StopStrings

    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    s, out, hit = StopStrings(stops), [], False
    for a, b in zip(bounds, bounds[1:]):
        emitted, hit = s.feed(text[a:b])
        out.append(emitted)
        if hit:
            break
    if not hit:
        out.append(s.flush())
    assert ("".join(out), hit) == _reference_cut(text, stops)


# --- 6. OpenAI fields: implemented (logprobs, echo, penalties) or refused by name -----------

@pytest.mark.parametrize("path,field,value", [
    ("/v1/completions", "best_of", 2),
    ("/v1/completions", "logit_bias", {"5": 10}),
    ("/v1/completions", "suffix", "return x"),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "auto"),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
])
def test_unsupported_fields_are_refused_by_name(slow, path, field, value):
    from starlette.testclient import TestClient

    body = ({"prompt": "def f(x):"} if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": "hi"}]})
    with TestClient(_app(slow)) as client:
        err = _error(client.post(path, json={**body, field: value, "max_tokens": 2}), 400)
        assert err["param"] == field and field in err["message"]
        off = {"best_of": 1, "logit_bias": {}, "suffix": None, "tools": [], "tool_choice": "none",
               "functions": [], "response_format": {"type": "text"}}[field]
        assert client.post(path, json={**body, field: off, "max_tokens": 2}).status_code == 200


def _offline(lm, prompt: str, n: int, **sampling):
    from tokenlean.sampling import SamplingParams

    return lm.generate(prompt, n, sampling=SamplingParams(**sampling))


def test_completion_logprobs_echo_and_penalties(slow):
    from starlette.testclient import TestClient

    prompt = "def add(a, b):\n"
    with TestClient(_app(slow)) as client:
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8,
                                                 "logprobs": 3, "temperature": 0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        n = r.json()["usage"]["completion_tokens"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
        assert "".join(lp["tokens"]) == choice["text"]
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(n)]
        for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
            assert 1 <= len(top) <= 3 and chosen <= 0
            assert chosen == pytest.approx(max(top.values()))  # greedy takes the most likely

        # streamed: the same tokens and logprobs, spread over the chunks
        body = {"prompt": prompt, "max_tokens": 8, "logprobs": 3, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as s:
            events = [json.loads(e[6:]) for e in s.read().decode().split("\n\n")
                      if e.startswith("data: {")]
        streamed = [t for e in events for c in e["choices"] if c["logprobs"]
                    for t in c["logprobs"]["token_logprobs"]]
        assert streamed == pytest.approx(lp["token_logprobs"])

        # echo: the prompt before the completion, streaming or not
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "echo": True,
                                                 "temperature": 0})
        text = r.json()["choices"][0]["text"]
        assert text == prompt + _offline(slow, prompt, 4, temperature=0).text
        body = {"prompt": prompt, "max_tokens": 4, "echo": True, "stream": True, "temperature": 0}
        with client.stream("POST", "/v1/completions", json=body) as s:
            events = [json.loads(e[6:]) for e in s.read().decode().split("\n\n")
                      if e.startswith("data: {")]
        assert "".join(c["text"] for e in events for c in e["choices"]) == text

        # penalties: applied as offline applies them, and range-checked
        prompt = "import os\n"
        plain = _offline(slow, prompt, 24, temperature=0).text
        penalized = _offline(slow, prompt, 24, temperature=0, frequency_penalty=2.0,
                             presence_penalty=1.0).text
        assert penalized != plain  # else the test would show nothing
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24,
                                                 "temperature": 0, "frequency_penalty": 2.0,
                                                 "presence_penalty": 1.0})
        assert r.json()["choices"][0]["text"] == penalized
        err = _error(client.post("/v1/completions", json={"prompt": prompt,
                                                          "presence_penalty": 2.5}), 400)
        assert err["param"] == "presence_penalty"


def _sse_events(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/completions", json=body) as s:
        return [json.loads(e[6:]) for e in s.read().decode().split("\n\n")
                if e.startswith("data: {")]


def test_echo_with_logprobs_scores_the_prompt(slow):
    """echo + logprobs: every prompt token's logprob (the first has none: null), then the
    completion's, as one full-prompt forward gives them, however the prompt is chunked,
    streamed or not, and never from a reused cached prefix (which has no logits)."""
    import torch
    from starlette.testclient import TestClient

    from tokenlean.engine.scheduler import SchedulerConfig

    prompt = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n" \
             "        self.x = x\n        self.y = y\n\n    def norm(self):\n"
    ids = slow.encode(prompt)
    assert len(ids) > 32  # two prefix-cache blocks: a cached prefix would be found
    with torch.inference_mode():
        logp = slow.model._model(torch.tensor([ids]))[0].float().log_softmax(-1)
    want = [logp[i, t].item() for i, t in enumerate(ids[1:])]
    best = [logp[i].max().item() for i in range(len(ids) - 1)]
    config = SchedulerConfig(prefill_chunk=5)  # the prompt goes in over several steps
    with TestClient(_app(slow, scheduler=config)) as client:
        body = {"prompt": prompt, "max_tokens": 4, "echo": True, "logprobs": 2, "temperature": 0}
        plain = client.post("/v1/completions", json={**body, "echo": False}).json()
        for _ in range(2):  # the second finds the prompt in the prefix cache: not reused
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            lp = choice["logprobs"]
            n = len(ids) + r.json()["usage"]["completion_tokens"]
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-4)
            tops = lp["top_logprobs"][1 : len(ids)]
            assert [max(t.values()) for t in tops] == pytest.approx(best, abs=1e-4)
            assert all(1 <= len(t) <= 2 for t in tops)
            assert lp["token_logprobs"][len(ids):] == plain["choices"][0]["logprobs"]["token_logprobs"]
            assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(n)]
            assert choice["text"] == prompt + plain["choices"][0]["text"]
        events = _sse_events(client, {**body, "stream": True})
        chunks = [c for e in events for c in e["choices"]]
        assert chunks[0]["text"] == prompt  # the echo, with the prompt's logprobs
        assert len(chunks[0]["logprobs"]["tokens"]) == len(ids)
        streamed = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["token_logprobs"]]
        assert streamed == pytest.approx(lp["token_logprobs"], abs=1e-6)
        assert "".join(c["text"] for c in chunks) == choice["text"]


def test_prompt_logprobs_refused_with_a_kv_policy(slow):
    from tokenlean.engine.sequence import Sequence
    from tokenlean.errors import UserError
    from tokenlean.kv.registry import KVConfig
    from tokenlean.sampling import SamplingParams

    policy = KVConfig("streaming", 0.5).make()
    with pytest.raises(UserError, match="echo with logprobs"):
        Sequence(slow.model, [1, 2, 3], 4, SamplingParams(), policy=policy, prompt_logprobs=True)


def test_chat_logprobs(slow):
    from starlette.testclient import TestClient

    if not slow.tokenizer.chat_template:
        pytest.skip("the model has no chat template")
    messages = [{"role": "user", "content": "write a function"}]
    with TestClient(_app(slow)) as client:
        r = client.post("/v1/chat/completions", json={
            "messages": messages, "max_tokens": 6, "logprobs": True, "top_logprobs": 2})
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert len(content) == r.json()["usage"]["completion_tokens"]
        for entry in content:
            assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
            assert entry["bytes"] == list(entry["token"].encode())
            assert 1 <= len(entry["top_logprobs"]) <= 2
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
        assert r.json()["choices"][0]["logprobs"] is None
        err = _error(client.post("/v1/chat/completions", json={
            "messages": messages, "top_logprobs": 2}), 400)
        assert err["param"] == "top_logprobs"


# --- 7. SIGTERM: a grace period, then the rest is answered with an error --------------------

def test_shutdown_timeout_cancels_what_is_left(slow):
    slow.model.steps = 0
    running = _Running(_app(slow), shutdown_timeout=0.5)
    results = {}

    async def clients(base):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            started = asyncio.Event()

            async def plain():
                r = await client.post("/v1/completions",
                                      json={"prompt": "def f(x):", "max_tokens": 3000})
                results["plain"] = (r.status_code, r.json())

            async def stream():
                body = {"prompt": "def g(y):", "max_tokens": 3000, "stream": True}
                events = []
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if len(events) == 2:
                                started.set()
                results["stream"] = events

            tasks = [asyncio.create_task(plain()), asyncio.create_task(stream())]
            await asyncio.wait_for(started.wait(), 20)
            running.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's handler calls
            await asyncio.wait_for(asyncio.gather(*tasks), 20)

    with running as base:
        asyncio.run(clients(base))
        running.thread.join(20)
        assert not running.thread.is_alive()  # the server stopped after the grace period
    status, body = results["plain"]
    assert status == 503 and body["error"]["code"] == "server_shutdown"
    events = results["stream"]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "server_shutdown"
    assert slow.model.steps < 3000  # each request would have run 3000 steps
