"""`tokenlean bench serve` end to end: its own server subprocess on loopback, tiny model."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

FIGURES = ("request_throughput", "output_throughput", "total_output_tokens", "duration_s")


def _run(tiny_model_dir, tmp_path, *extra):
    from tokenlean.cli import main

    out = tmp_path / "out"
    rc = main(["bench", "serve", "--model", str(tiny_model_dir), "--num-prompts", "4",
               "--max-concurrency", "2", "--prompt-tokens", "16", "--max-tokens", "8",
               "--threads", "1", "--out", str(out), *extra])
    assert rc == 0
    [path] = out.glob("serve-*.json")
    return json.loads(path.read_text())


def test_bench_serve_greedy(tiny_model_dir, tmp_path, capsys):
    result = _run(tiny_model_dir, tmp_path)
    assert result["completed"] == 4 and result["failed"] == 0, result["errors"]
    for key in FIGURES:
        assert result[key] is not None and result[key] > 0, key
    for key in ("ttft_ms", "itl_ms", "e2e_ms", "tpot_ms"):
        assert set(result[key]) == {"mean", "median", "p99"}
    assert 0 < result["ttft_ms"]["mean"] <= result["e2e_ms"]["p99"]
    assert result["total_input_tokens"] == 4 * 16
    assert result["command"].startswith("tokenlean bench serve") and result["machine"]["cpu"]
    assert result["server"]["started_here"] and result["server"]["method"] == "greedy"
    sd = result["spec_decode"]  # plain decoding drafts nothing
    assert sd is None or sd["drafts"] == 0
    out = capsys.readouterr().out
    assert "request throughput" in out and "results:" in out


def test_bench_serve_pld_spec_block(tiny_model_dir, tiny_lm, tmp_path):
    from tokenlean.bench.prompts import heldout_prompts
    from tokenlean.lm import LM

    result = _run(tiny_model_dir, tmp_path, "--method", "pld", "--request-rate", "50")
    assert result["completed"] == 4 and result["failed"] == 0, result["errors"]
    sd = result["spec_decode"]
    assert {"drafts", "draft_tokens", "accepted_tokens", "acceptance_rate",
            "mean_acceptance_length", "accepted_per_position",
            "acceptance_rate_per_position"} <= set(sd)
    # the block counts what the server drafted: the same requests run offline draft as much
    offline = [LM(tiny_lm.name, tiny_lm.folder, tiny_lm.model, tiny_lm.tokenizer)
               .generate(p.ids, 8, method="pld").stats
               for p in heldout_prompts(tiny_lm.tokenizer, 4, 16)]
    assert sd["drafts"] == sum(s["drafts"] for s in offline) > 0
    assert sd["draft_tokens"] == sum(s["drafted_tokens"] for s in offline)
    assert sd["accepted_tokens"] == sum(s["accepted_tokens"] for s in offline)
    assert sd["mean_acceptance_length"] == pytest.approx(1 + sd["accepted_tokens"] / sd["drafts"])
    assert sd["acceptance_rate"] == pytest.approx(sd["accepted_tokens"] / sd["draft_tokens"])


def test_bench_serve_bad_input(tiny_model_dir, tmp_path, capsys):
    from tokenlean.bench.serve_load import _free_port
    from tokenlean.cli import main

    base = ["bench", "serve", "--model", str(tiny_model_dir), "--num-prompts", "1",
            "--prompt-tokens", "8", "--max-tokens", "2", "--out", str(tmp_path)]
    cases = [
        ["--base-url", f"http://127.0.0.1:{_free_port()}"],  # nothing listens there
        ["--base-url", "not a url"],
        ["--method", "nope"],
        ["--request-rate", "0"],
        ["--prompt-tokens", "200"],  # longer than the tiny model's context (128)
    ]
    for extra in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("tokenlean: error:") and "\n" not in err, (extra, err)
    assert not list(tmp_path.glob("serve-*.json"))


def test_parse_spec_counters_and_block():
    from tokenlean.bench.serve_load import parse_spec_counters, spec_block

    text = ("# HELP x\n"
            "tokenlean:spec_decode_num_drafts_total 10.0\n"
            "tokenlean:spec_decode_num_draft_tokens_total 40.0\n"
            "tokenlean:spec_decode_num_accepted_tokens_total 20.0\n"
            'tokenlean:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 8.0\n'
            'tokenlean:spec_decode_num_accepted_tokens_per_pos_total{position="1"} 6.0\n')
    after = parse_spec_counters(text)
    before = parse_spec_counters(text.replace("10.0", "5.0").replace("40.0", "20.0"))
    sd = spec_block(before, after)
    assert sd["drafts"] == 5 and sd["draft_tokens"] == 20 and sd["accepted_tokens"] == 0
    sd = spec_block(None, after)
    assert sd["acceptance_rate"] == 0.5 and sd["mean_acceptance_length"] == 3.0
    assert sd["accepted_per_position"] == [8, 6]
    assert sd["acceptance_rate_per_position"] == [0.8, 0.6]
    assert parse_spec_counters("vllm:other 1\n") is None


# ---- sweeps: --concurrency, --long-prompt-tokens, --offline, several --base-url ----

SWEEP = ("--concurrency", "1,2", "--num-prompts", "3", "--prompt-tokens", "16",
         "--max-tokens", "8", "--threads", "1")
LEVEL_FIGURES = ("request_throughput", "output_throughput", "total_output_tokens", "duration_s")


def _sweep(tiny_model_dir, out, *extra):
    from tokenlean.cli import main

    assert main(["bench", "serve", "--model", str(tiny_model_dir), *SWEEP, "--out", str(out),
                 *extra]) == 0
    [path] = out.glob("serve-sweep-*.json")
    return path, json.loads(path.read_text())


def _table_rows(out: str, first_cell: str) -> list[list[str]]:
    """The cells of the rich table's rows whose first cell is `first_cell`."""
    rows = [[cell.strip() for cell in line.strip("│┃ ").split("│")] for line in out.splitlines()]
    return [row for row in rows if row and row[0] == first_cell]


def test_bench_serve_sweep_table_json_png(tiny_model_dir, tmp_path, capsys):
    path, result = _sweep(tiny_model_dir, tmp_path / "out", "--long-prompt-tokens", "40",
                          "--offline")
    assert result["setup"]["concurrency"] == [1, 2]
    system = result["systems"]["tokenlean"]
    assert system["started_here"] and system["method"] == "greedy"
    levels = system["levels"]
    assert [row["concurrency"] for row in levels] == [1, 2]
    for row in levels:
        assert row["num_prompts"] == row["completed"] == 3 and row["failed"] == 0, row["errors"]
        for key in LEVEL_FIGURES:
            assert row[key] > 0, key
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert row[key]["median"] is not None and row[key]["p99"] is not None
        assert row["speedup"] > 0
        long = row["long_prompt"]  # exactly one long request, the others all counted
        assert long["requests"] == 1 and long["prompt_tokens"] == 40 and long["request"]["ok"]
        assert long["others"]["completed"] == 3 and long["ttft_p99_vs_lowest"] > 0
    assert levels[0]["speedup"] == 1.0
    assert result["long_prompt"]["tokens"] == 40
    offline = result["offline"]
    assert offline["num_prompts"] == offline["completed"] == 3 and offline["threads"] == 1
    assert offline["output_throughput"] > 0 and offline["total_output_tokens"] == 3 * 8

    out = capsys.readouterr().out
    rows = _table_rows(out, "tokenlean")
    assert [row[1] for row in rows] == ["1", "2"] and all(len(row) == 15 for row in rows)
    assert len(_table_rows(out, "offline")) == 1
    assert "served / offline output tok/s at concurrency 1, tokenlean" in out
    png = path.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists() and "plot skipped" in out
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.name in out


def _counter(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(f"tokenlean:{name}"))


def test_long_prompt_block_counts_who_waited_during_its_prefill():
    from tokenlean.bench.serve import long_prompt_block
    from tokenlean.bench.serve_load import RequestResult

    def req(sent, ttft, injected=False):
        return RequestResult(ok=True, ttft_s=ttft, e2e_s=ttft + 1, output_tokens=4,
                             sent_s=sent, injected=injected)

    results = [req(0.0, 1.0),  # first token before the long prompt came: not held up
               req(9.0, 2.0),  # waiting when it arrived
               req(11.0, 0.5),  # arrived during its prefill
               req(13.0, 0.2),  # after its first token
               req(10.0, 2.0, injected=True)]  # the long prompt: prefilled 10 to 12
    block = long_prompt_block(results, 20.0)
    assert block["others"]["completed"] == 4
    assert block["during"]["requests"] == 2
    assert block["during"]["ttft_ms"]["p99"] == pytest.approx(2000.0)
    assert block["during"]["ttft_ms"]["median"] == pytest.approx(1250.0)


def test_bench_serve_sweep_named_base_url_one_long_prompt_per_level(tiny_model_dir, tmp_path):
    """Against a server of our own given as NAME=URL: its counters see, per level, the
    3 regular requests twice (without and with the long prompt) and ONE 40-token prompt."""
    import argparse

    import httpx

    from tokenlean.bench.serve_load import Server

    server = Server(argparse.Namespace(device="cpu", dtype="fp32", method="greedy",
                                       model=str(tiny_model_dir), method_arg=[], threads=1), 8)
    try:
        server.wait_ready(httpx)
        _, result = _sweep(tiny_model_dir, tmp_path, "--base-url", f"tiny={server.base_url}/v1",
                           "--long-prompt-tokens", "40")
        metrics = httpx.get(f"{server.base_url}/metrics").text
    finally:
        server.stop()
    assert list(result["systems"]) == ["tiny"]
    system = result["systems"]["tiny"]
    assert system["base_url"] == server.base_url and not system["started_here"]
    assert [row["long_prompt"]["requests"] for row in system["levels"]] == [1, 1]
    # the probe (16 tokens), then per level 2 x 3 regular requests and one long one
    assert _counter(metrics, 'requests_total{endpoint="/v1/completions",status="200"}') == 1 + 2 * 7
    assert _counter(metrics, "prompt_tokens_total") == 16 + 2 * (6 * 16 + 40)


def test_parse_base_urls_concurrency_and_level_prompts():
    from tokenlean.bench.serve_load import level_prompts, parse_base_urls, parse_concurrency
    from tokenlean.errors import UserError

    assert parse_base_urls(["http://127.0.0.1:8000/v1", "llama.cpp=http://h:8080/",
                            "http://h:9/x?a=b"]) == {
        "127.0.0.1:8000": "http://127.0.0.1:8000", "llama.cpp": "http://h:8080",
        "h:9": "http://h:9/x"}
    assert parse_base_urls(None) == {}
    for bad in (["=http://h:1"], ["a=http://h:1", "a=http://h:2"], ["a=not a url"]):
        with pytest.raises(UserError):
            parse_base_urls(bad)
    assert parse_concurrency("8,1,2,2") == [1, 2, 8]
    assert [level_prompts(c, None) for c in (1, 4, 16)] == [8, 8, 32]
    assert level_prompts(16, 3) == 3


def test_bench_serve_sweep_bad_input(tiny_model_dir, tmp_path, capsys):
    from tokenlean.cli import main

    base = ["bench", "serve", "--model", str(tiny_model_dir), "--out", str(tmp_path)]
    for extra in (["--concurrency", "0"], ["--concurrency", "a,b"], ["--concurrency", "1,,2"],
                  ["--base-url", "=http://127.0.0.1:8000"],
                  ["--base-url", "a=http://127.0.0.1:1", "--base-url", "a=http://127.0.0.1:2"]):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("tokenlean: error:") and "\n" not in err, (extra, err)
    assert not list(tmp_path.glob("serve*"))


@pytest.mark.parametrize("ending, ok", [("finish", True), ("done", True), ("cut", False)])
def test_a_stream_may_end_on_its_finish_reason_chunk(ending, ok):
    """transformers serve ends a stream with the chunk that carries finish_reason and sends
    no [DONE]: that is a complete answer; a stream cut before either is not."""
    import asyncio

    import httpx

    from tokenlean.bench.serve_load import _one

    def chunk(text, finish=None):
        choice = {"index": 0, "text": text, **({"finish_reason": finish} if finish else {})}
        return f"data: {json.dumps({'choices': [choice]})}\n\n"

    body = chunk("a") + chunk(" b")
    body += {"finish": chunk("", "length"), "done": chunk("", "length") + "data: [DONE]\n\n",
             "cut": ""}[ending]

    def handler(request):
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await _one(client, "http://x/v1/completions", {"prompt": [1, 2]}, {})

    res = asyncio.run(run())
    assert res.ok is ok and res.output_tokens == 2
    assert (res.error is None) is ok
