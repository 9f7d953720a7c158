"""`tokenlean serve --replicas N`: the same OpenAI-compatible app on Ray Serve replicas.

The end-to-end test runs the real command (its own local Ray instance) with 2 replicas of the
embedded tl-code model; without Ray installed (CI) only the one-line error is checked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tokenlean.cli import main

httpx = pytest.importorskip("httpx")

KEY = "ray-key"
MAX_TOKENS = 24
PROMPTS = [
    "def add(a, b):\n",
    "class Point:\n",
    "for i in range(10):\n",
    "import os\n",
    "# café\n",
    "while True:\n",
    "def f(x):\n    return",
    "emoji: 🙂",
    "def main():\n",
    "x = [",
    "if __name__ == '__main__':\n",
    "return",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_replicas_without_ray_is_one_line(monkeypatch, capsys):
    pytest.importorskip("fastapi")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as uninstalled
    monkeypatch.delitem(sys.modules, "tokenlean.serve.ray_serve", raising=False)
    assert main(["serve", "--replicas", "2"]) == 2
    assert capsys.readouterr().err == ("tokenlean: error: --replicas needs Ray Serve: "
                                       "pip install 'tokenlean[ray]'\n")


def test_help_does_not_import_ray():
    code = ("import sys\nfrom tokenlean.cli import main\ntry:\n    main(['serve', '--help'])\n"
            "except SystemExit:\n    pass\nassert 'ray' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--replicas" in out.stdout and "--ray-address" in out.stdout


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    """`tokenlean serve --replicas 2` on a free loopback port, stopped with SIGTERM."""
    pytest.importorskip("ray.serve")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("2 replicas need 2 CPUs")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve-ray") / "server.log"
    log = open(log_path, "w+")
    cmd = [sys.executable, "-m", "tokenlean.cli", "serve", "--replicas", "2", "--threads", "1",
           "--max-ongoing-requests", "4", "--api-key", KEY, "--host", "127.0.0.1",
           "--port", str(port)]
    # A dead cluster to join: the server starts its own Ray all the same (as it does when
    # /tmp/ray/ray_current_cluster names a `ray start` cluster that is gone).
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    # its own session: the finalizer can stop Ray's processes even if the server hangs
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    state = {"proc": proc, "log": log_path}
    try:
        deadline = time.monotonic() + 120
        while "with 2 replicas" not in log_path.read_text():  # printed once all answer
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server not ready (exit {proc.poll()}):\n{log_path.read_text()}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}", state
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                state["rc"] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def _complete(base: str, prompt: str, stream: bool = False) -> tuple[str, str]:
    """(text, replica) of one greedy completion."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=headers,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        replica = r.headers["x-tokenlean-replica"]
        if not stream:
            return json.loads(r.read())["choices"][0]["text"], replica
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]), replica


def test_two_replicas_answer_like_offline(ray_server):
    base, _ = ray_server
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: _complete(base, p), PROMPTS))
    from tokenlean.lm import load

    lm = load()  # tl-code, the server's default
    offline = [lm.generate(p, max_new_tokens=MAX_TOKENS).text for p in PROMPTS]
    assert [text for text, _ in answers] == offline  # greedy: each replica as offline
    assert len({replica for _, replica in answers}) == 2  # Ray routed to both
    text, _ = _complete(base, PROMPTS[0], stream=True)  # SSE through Ray's proxy
    assert text == offline[0]


def test_health_metrics_and_auth_through_ray(ray_server):
    base, _ = ray_server
    health = httpx.get(f"{base}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.headers["x-tokenlean-replica"]
    metrics = httpx.get(f"{base}/metrics", timeout=10)  # open, like /health
    assert metrics.status_code == 200 and "tokenlean:requests_total" in metrics.text
    denied = httpx.get(f"{base}/v1/models", timeout=10)
    assert denied.status_code == 401
    assert denied.json()["error"]["code"] == "invalid_api_key"
    models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"},
                       timeout=10)
    assert [m["id"] for m in models.json()["data"]] == ["tl-code"]


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_local_ray_listens_on_loopback_only(ray_server):
    """--host 127.0.0.1: the private Ray's GCS and raylet are a 127.0.0.1 node, not reachable
    from the network (Ray would otherwise bind them on every interface)."""
    _, state = ray_server
    sockets = {}
    for pid in _session_processes(state["proc"].pid):
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm in ("gcs_server", "raylet"):
            sockets.setdefault(comm, []).extend(_listening(pid))
    assert set(sockets) == {"gcs_server", "raylet"} and all(sockets.values()), sockets
    outside = {name: [ip for ip in ips if not _loopback(ip)] for name, ips in sockets.items()}
    assert outside == {"gcs_server": [], "raylet": []}


def test_loopback_hosts():
    ray_serve = pytest.importorskip("tokenlean.serve.ray_serve")
    assert all(map(ray_serve._is_loopback, ["127.0.0.1", "127.0.1.1", "localhost", "::1"]))
    assert not any(map(ray_serve._is_loopback, ["0.0.0.0", "::", "192.0.2.2", "example.org"]))


def _listening(pid: str) -> list:
    """The addresses process `pid` listens on over TCP (Linux /proc/net)."""
    import ipaddress

    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])  # 32-bit words, each little-endian
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(ipaddress.ip_address(packed))
    return found


def _loopback(ip) -> bool:
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def test_sigterm_shuts_ray_down(ray_server):
    """Last in the file: stops the module's server and checks it went cleanly."""
    _, state = ray_server
    proc = state["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "shutting down the replicas" in state["log"].read_text()
    deadline = time.monotonic() + 20
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _session_processes(proc.pid) == []  # Ray's own processes are gone too


def _session_processes(sid: int) -> list[str]:
    """The processes left in session `sid` (the server's, so Ray's too), on Linux."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            left.append(stat.parent.name)
    return left
