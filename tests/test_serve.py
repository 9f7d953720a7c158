"""`tokenlean serve` end to end: real server processes on loopback, the official openai client."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key"
PROMPTS = [
    "def add(a, b):\n",
    "class Point:\n",
    "for i in range(10):\n",
    "import os\n",
    "# café\n",
    "while True:\n",
    "def f(x):\n    return",
    "emoji: 🙂",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir, tmp_path, *extra):
    port = _free_port()
    log = open(tmp_path / f"server-{port}.log", "w+")
    cmd = [sys.executable, "-m", "tokenlean.cli", "serve", "--model", str(model_dir),
           "--port", str(port), "--threads", "1", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail("server did not answer /health within 60 s")


def _stop(proc, log):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    log.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    proc, base, log = _start(tiny_model_dir, tmp_path_factory.mktemp("serve"))
    yield base
    _stop(proc, log)


@pytest.fixture(scope="module")
def pld_server(tiny_model_dir, tmp_path_factory):
    proc, base, log = _start(tiny_model_dir, tmp_path_factory.mktemp("serve-pld"),
                             "--method", "pld", "--api-key", KEY)
    yield base
    _stop(proc, log)


def _client(base, key="any", **kw):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, timeout=30, max_retries=0, **kw)


def _model(tiny_model_dir) -> str:
    return tiny_model_dir.name


def test_models_and_health(server, tiny_model_dir):
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [_model(tiny_model_dir)]
    assert httpx.get(f"{server}/health", timeout=5).json()["status"] == "ok"


def test_completion_equals_offline(server, tiny_model_dir, tiny_lm):
    prompt = PROMPTS[0]
    out = _client(server).completions.create(model=_model(tiny_model_dir), prompt=prompt,
                                             max_tokens=24, temperature=0)
    offline = tiny_lm.generate(prompt, max_new_tokens=24)
    assert out.choices[0].text == offline.text
    assert out.choices[0].finish_reason == offline.finish_reason
    assert out.usage.prompt_tokens == offline.prompt_tokens
    assert out.usage.completion_tokens == offline.completion_tokens
    assert out.usage.total_tokens == offline.prompt_tokens + offline.completion_tokens


def test_chat_completion(server, tiny_model_dir, tiny_lm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = _client(server).chat.completions.create(model=_model(tiny_model_dir),
                                                  messages=messages, max_tokens=12,
                                                  temperature=0, stop=["\n\n"])
    prompt = tiny_lm.tokenizer.apply_chat_template(messages)
    offline = tiny_lm.generate(prompt, max_new_tokens=12, stop=["\n\n"])
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == offline.text
    assert out.usage.completion_tokens == offline.completion_tokens


def test_streaming_with_usage(server, tiny_model_dir, tiny_lm):
    client = _client(server)
    stream = client.chat.completions.create(
        model=_model(tiny_model_dir), messages=[{"role": "user", "content": "count"}],
        max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].choices == []
    prompt = tiny_lm.tokenizer.apply_chat_template([{"role": "user", "content": "count"}])
    offline = tiny_lm.generate(prompt, max_new_tokens=10)
    assert text == offline.text
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(tiny_lm.encode(prompt))
    assert usage.completion_tokens == len(offline.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    stream = client.completions.create(model=_model(tiny_model_dir), prompt=PROMPTS[1],
                                       max_tokens=10, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream)
    assert text == tiny_lm.generate(PROMPTS[1], max_new_tokens=10).text


def test_raw_sse_format(server):
    body = {"prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0, "stream": True}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ") and json.loads(e[6:])["object"] == "text_completion"


def _error(exc_info, status):
    err = exc_info.value
    assert err.status_code == status
    body = err.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_errors_in_openai_shape(server, tiny_model_dir):
    client, model = _client(server), _model(tiny_model_dir)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", temperature=-1)
    assert _error(e, 400)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", top_p=0)
    _error(e, 400)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", temperature=1, seed=2**64)
    assert "seed" in _error(e, 400)["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x")
    assert _error(e, 404)["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x " * 400)
    assert "context" in _error(e, 400)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       n=2)
    assert _error(e, 400)["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="")
    _error(e, 400)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", max_tokens=0)
    _error(e, 400)
    for raw in (b"{bad json", b"[]", b'{"prompt": 5}', b'{"messages": []}'):
        path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
        r = httpx.post(f"{server}{path}", content=raw, timeout=10,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{server}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200  # still up


def test_concurrent_streams_equal_offline(server, tiny_model_dir, tiny_lm):
    client, model = _client(server), _model(tiny_model_dir)

    def one(prompt):
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=16,
                                           temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream)

    # 32 clients at once, each with its own prompt: every response completes, none is
    # mixed with another, and each equals its offline result
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}# case {i}\n" for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        # the server stays responsive while it generates
        while not all(f.done() for f in futures):
            assert httpx.get(f"{server}/health", timeout=2).status_code == 200
            assert httpx.get(f"{server}/metrics", timeout=2).status_code == 200
        texts = [f.result(timeout=120) for f in futures]
    for prompt, text in zip(prompts, texts):
        assert text == tiny_lm.generate(prompt, max_new_tokens=16).text


def test_api_key(pld_server, tiny_model_dir):
    with pytest.raises(openai.AuthenticationError) as e:
        _client(pld_server, key="wrong").models.list()
    assert _error(e, 401)["code"] == "invalid_api_key"
    r = httpx.get(f"{pld_server}/v1/models", timeout=5)  # no Authorization header at all
    assert r.status_code == 401 and r.json()["error"]["type"]
    assert _client(pld_server, key=KEY).models.list().data[0].id == _model(tiny_model_dir)
    assert httpx.get(f"{pld_server}/health", timeout=5).status_code == 200  # open
    assert httpx.get(f"{pld_server}/metrics", timeout=5).status_code == 200  # open


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_api_docs_need_the_key(pld_server, path):
    """FastAPI's API map is no more public than the API."""
    r = httpx.get(f"{pld_server}{path}", timeout=5)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{pld_server}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert r.status_code == 200
    if path == "/openapi.json":
        assert "/v1/completions" in r.json()["paths"]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_metrics_with_pld(pld_server, tiny_model_dir, tiny_lm):
    prompt = "def add(a, b):\n    return a + b\n" * 3
    out = _client(pld_server, key=KEY).completions.create(
        model=_model(tiny_model_dir), prompt=prompt, max_tokens=24, temperature=0)
    offline = tiny_lm.generate(prompt, max_new_tokens=24, method="pld")
    assert offline.stats["drafts"] > 0
    assert out.choices[0].text == offline.text
    text = httpx.get(f"{pld_server}/metrics", timeout=5).text
    assert _metric(text, "tokenlean:spec_decode_num_drafts_total") == offline.stats["drafts"]
    assert (_metric(text, "tokenlean:spec_decode_num_draft_tokens_total")
            == offline.stats["drafted_tokens"])
    assert (_metric(text, "tokenlean:spec_decode_num_accepted_tokens_total")
            == offline.stats["accepted_tokens"])
    assert _metric(text, "tokenlean:e2e_request_latency_seconds_count") == 1
    assert _metric(text, "tokenlean:time_to_first_token_seconds_count") == 1
    assert 'tokenlean:requests_total{endpoint="/v1/completions",status="200"} 1.0' in text


def test_serve_cli_checks_method_before_loading(capsys):
    from tokenlean.cli import main

    assert main(["serve", "--model", "no-such-model", "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["serve", "--model", "no-such-model", "--method", "pld",
                 "--method-arg", "bogus=1"]) == 2
    assert "unknown option 'bogus'" in capsys.readouterr().err


def _serve_exits(model_dir, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tokenlean.cli", "serve", "--model", str(model_dir),
           "--threads", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_serve_on_a_port_in_use(tiny_model_dir):
    with socket.create_server(("127.0.0.1", 0)) as held:  # listening, as another server would
        port = held.getsockname()[1]
        proc = _serve_exits(tiny_model_dir, "--port", str(port))
    assert proc.returncode == 2, proc.stderr
    # one line, and no "serving ..." before it: the server never listened
    assert proc.stderr.strip() == (f"tokenlean: error: cannot listen on 127.0.0.1:{port}: "
                                   "Address already in use")
    assert proc.stdout == ""


def test_serve_on_an_invalid_host(tiny_model_dir):
    proc = _serve_exits(tiny_model_dir, "--host", "256.1.1.1", "--port", str(_free_port()))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "tokenlean: error: cannot listen on 256.1.1.1:"), proc.stderr
    assert proc.stdout == ""


class _SlowModel:
    """The embedded model, 10 ms slower a step, so queueing and cancelling are observable."""

    def __init__(self, model, delay: float = 0.01):
        self._model, self._delay, self.steps = model, delay, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward_packed(self, segments):
        time.sleep(self._delay)
        self.steps += 1
        return self._model.forward_packed(segments)


class _EndlessTokenizer:
    """No end-of-text token: a generation runs to its max_tokens."""

    eos_ids: list[int] = []

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _slow_lm():
    import dataclasses

    from tokenlean.lm import load

    lm = load()
    return dataclasses.replace(lm, model=_SlowModel(lm.model),
                               tokenizer=_EndlessTokenizer(lm.tokenizer), drafters={})


def test_engine_queue_full_and_cancel():
    import asyncio

    from tokenlean.engine.scheduler import SchedulerConfig
    from tokenlean.sampling import SamplingParams
    from tokenlean.serve.engine import Engine, Job, QueueFull

    lm = _slow_lm()
    engine = Engine(lm, max_queue=1, config=SchedulerConfig(max_batch=1))  # one at a time
    engine.start()

    async def main():
        loop = asyncio.get_running_loop()
        a = Job([1, 2], 200, SamplingParams(), [], loop)
        b = Job([1, 2], 3, SamplingParams(), [], loop)
        engine.submit(a)
        assert (await asyncio.wait_for(a.out.get(), 5))[0] == "delta"  # a is running
        engine.submit(b)  # b waits: the batch holds one
        with pytest.raises(QueueFull):
            engine.submit(Job([1, 2], 3, SamplingParams(), [], loop))
        a.cancel()  # as a disconnected client does
        kind, result = None, None
        while kind != "done":
            kind, result = await asyncio.wait_for(b.out.get(), 5)
        assert result.completion_tokens == 3
        kinds = []
        while not a.out.empty():
            kinds.append(a.out.get_nowait()[0])
        assert "done" not in kinds

    try:
        asyncio.run(main())
    finally:
        engine.stop()
    assert lm.model.steps < 100  # a stopped early: 200 + 3 steps had it run to its end


# --- property-based fuzzing of the request schema: no input gets a 5xx ---

ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.lists(st.one_of(st.integers(-5, 10**6), st.text(max_size=5)), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                 "content": st.one_of(st.text(max_size=30), ANY)})
COMMON = {"model": ANY, "max_tokens": ANY, "temperature": ANY,
          "top_p": ANY, "top_k": ANY, "seed": ANY, "stop": ANY, "n": ANY, "stream": ANY,
          "stream_options": ANY}
COMPLETION = st.fixed_dictionaries({}, optional={"prompt": st.one_of(st.text(max_size=40), ANY),
                                                 **COMMON})
CHAT = st.fixed_dictionaries({}, optional={"messages": st.one_of(st.lists(MESSAGE, max_size=3), ANY),
                                           **COMMON})


def _post(url: str, body: dict) -> httpx.Response:
    # json.dumps writes NaN / Infinity as Python does: the server must refuse them cleanly
    return httpx.post(url, content=json.dumps(body), timeout=30,
                      headers={"content-type": "application/json"})


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=COMPLETION)
def test_fuzzed_completions_never_5xx(server, body):
    _check(_post(f"{server}/v1/completions", body))


@FUZZ
@given(body=CHAT)
def test_fuzzed_chat_never_5xx(server, body):
    _check(_post(f"{server}/v1/chat/completions", body))


# --- the request timeout: a request still generating at its deadline is cancelled ---

def test_engine_request_timeout_cancels():
    import asyncio

    from tokenlean.sampling import SamplingParams
    from tokenlean.serve.engine import Engine, Job, RequestTimeout

    lm = _slow_lm()
    engine = Engine(lm, max_queue=2)
    engine.start()

    async def main():
        job = Job([1], 500, SamplingParams(), [], asyncio.get_running_loop(), timeout=0.05)
        engine.submit(job)
        kinds = []
        while True:
            kind, value = await asyncio.wait_for(job.out.get(), 5)
            kinds.append(kind)
            if kind != "delta":
                return kinds, value

    try:
        kinds, value = asyncio.run(main())
    finally:
        engine.stop()
    assert kinds[-1] == "error" and isinstance(value, RequestTimeout)
    assert "timeout" in str(value)
    assert lm.model.steps < 250  # stopped early


def test_server_request_timeout():
    from starlette.testclient import TestClient

    from tokenlean.serve.app import create_app

    lm = _slow_lm()
    app = create_app(lm, request_timeout=0.3)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 500})
        assert r.status_code == 504, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "timeout"

        body = {"prompt": "hi", "max_tokens": 500, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = [e for e in r.read().decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["type"] == "timeout"
        assert all("error" not in json.loads(e[6:]) for e in events[:-2])

        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        metrics = client.get("/metrics").text
        assert _metric(metrics, "tokenlean:requests_timed_out_total") == 2
    assert lm.model.steps < 500  # both timed-out requests stopped early
