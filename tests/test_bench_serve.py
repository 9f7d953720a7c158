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
    from tokenlean.bench.serve import _free_port
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
    from tokenlean.bench.serve import parse_spec_counters, spec_block

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
