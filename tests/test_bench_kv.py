"""`tokenlean bench kv`: the task generators, the scoring, and the harness end to end on
the tiny random Llama of conftest (its context raised to 512; same weights). It measures
nothing: the harness runs, writes its JSON, table and PNG, compares like with like (a
policy at budget 1 equals the full cache), and refuses bad input before loading a model."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from tokenlean.bench import kv as kvbench
from tokenlean.bench import kv_tasks
from tokenlean.bench.kv_tasks import KVSample, make_sample, string_match_all
from tokenlean.cli import add_kv_bench_args
from tokenlean.errors import UserError
from tokenlean.kv.policy import CachePolicy
from tokenlean.model.tokenizer import Tokenizer
from tokenlean.zoo import zoo_path

CONTEXT = 512
QUALITY = [t for t in kv_tasks.TASK_NAMES if t != kv_tasks.PPL]


@pytest.fixture(scope="module")
def code_tokenizer():
    return Tokenizer(zoo_path("tl-code"))


@pytest.fixture(scope="module")
def model(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-512") / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# --- task generators ----------------------------------------------------------------------

@pytest.mark.parametrize("style", kv_tasks.STYLES)
@pytest.mark.parametrize("task", QUALITY)
def test_sample_deterministic_sized_and_answerable(code_tokenizer, task, style):
    tok = code_tokenizer
    a = make_sample(task, tok, CONTEXT, 0, seed=3, style=style)
    assert a == make_sample(task, tok, CONTEXT, 0, seed=3, style=style)  # same arguments
    assert a.context_ids != make_sample(task, tok, CONTEXT, 1, seed=3, style=style).context_ids
    assert a.context_ids != make_sample(task, tok, CONTEXT, 0, seed=4, style=style).context_ids
    total = len(a.context_ids) + len(a.question_ids) + a.max_new_tokens
    slack = 8 if task == "cwe" else 0  # cwe: within one list entry
    assert CONTEXT - slack <= total <= CONTEXT, total
    context, question = tok.decode(a.context_ids), tok.decode(a.question_ids)
    for answer in a.answers:
        assert answer in context, (answer, task)
        assert answer not in question, (answer, task)  # the question gives nothing away
    assert KVSample.from_json(json.loads(json.dumps(a.to_json()))) == a


def test_needles_where_they_belong(code_tokenizer):
    s = make_sample("niah_multikey", code_tokenizer, 1024, 0, style="text")
    text = code_tokenizer.decode(s.context_ids)
    assert text.count("The special magic number for ") == 4
    assert s.answers[0] in text and len(s.answers) == 1
    s = make_sample("niah_multivalue", code_tokenizer, 1024, 0, style="code")
    assert len(s.answers) == 4 and all(f".append({v})" in code_tokenizer.decode(s.context_ids)
                                      for v in s.answers)
    for style, needle in (("text", "The pass key is {}. Remember it."), ("code", " = {}")):
        s = make_sample("passkey", code_tokenizer, 1024, 0, style=style)
        lines = code_tokenizer.decode(s.context_ids).splitlines()
        (hit,) = [line for line in lines if s.answers[0] in line]  # the one needle
        assert needle.format(s.answers[0]) in hit
        filler = [line for line in lines if kv_tasks.PASSKEY_FILLER.strip() in line]
        assert len(filler) > 0.8 * len(lines)  # the rest is the one sentence repeated
    s = make_sample("cwe", code_tokenizer, 1024, 0, style="text")
    words = [line.split(". ", 1)[1] for line in code_tokenizer.decode(s.context_ids).split("\n")
             if ". " in line and line.split(". ", 1)[0].isdigit()]
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=counts.get, reverse=True)[:10]
    assert set(top) == set(s.answers)


def test_chat_split_is_exact(tiny_lm):
    tok = tiny_lm.tokenizer
    s = make_sample("niah_single", tok, CONTEXT, 0, style="text", chat=True)
    head = tok.apply_chat_template([{"role": "user", "content": "X"}]).split("X")[0]
    assert tok.decode(s.context_ids, skip_special_tokens=False).startswith(head)
    question = tok.decode(s.question_ids, skip_special_tokens=False)
    assert "<|end|>\n<|assistant|>\n" in question and question.endswith("mentioned in the text is")


def test_string_match_all():
    assert string_match_all("The number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("ALPHA and beta", ["alpha", "Beta", "gamma", "delta"]) == 0.5
    assert string_match_all("nothing here", ["42"]) == 0.0
    assert string_match_all("12345678", ["1234567"]) == 1.0  # RULER's substring rule
    with pytest.raises(ValueError):
        string_match_all("x", [])


# --- the harness --------------------------------------------------------------------------

class Broken(CachePolicy):
    """A policy not written yet: what the harness must report, not crash on."""

    name, summary, paper = "broken", "raises", "-"

    def prefill(self, model, cache, prompt, room):
        raise UserError("kv policy 'broken' is not implemented yet")


class KeepAll(CachePolicy):
    """A decode-time policy that keeps everything: streaming ppl must equal the full cache."""

    name, summary, paper = "keepall", "keeps all", "-"
    decode_time = True

    @dataclass
    class Params:
        pass


def kv_args(model, out, *extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_kv_bench_args(parser)
    return parser.parse_args(["--model", str(model), "--device", "cpu", "--dtype", "fp32",
                              "--samples", "1", "--context", str(CONTEXT), "--threads", "1",
                              "--ppl-tokens", "320", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    from tokenlean.kv import registry

    out = tmp_path_factory.mktemp("kv-out")
    saved = dict(registry.POLICIES)
    registry.POLICIES.update(broken=Broken, keepall=KeepAll)
    try:
        args = kv_args(model, out, "--policies", "none,snapkv,broken,keepall",
                       "--budgets", "0.5,1", "--tasks", "niah_single,vt,ppl",
                       "--query-aware")
        result = kvbench.run_kv_bench(args)
    finally:
        registry.POLICIES.clear()
        registry.POLICIES.update(saved)
    return result, out


def _rows(result, method, task=None):
    return [r for r in result["rows"] if r["method"] == method and (task is None or r["task"] == task)]


def test_harness_writes_json_table_png(run, capsys):
    result, out = run
    (path,) = sorted(out.glob("kv-*.json"))
    on_disk = json.loads(path.read_text())
    for key in ("command", "date", "machine", "model", "setup", "samples", "summary", "rows",
                "notes"):
        assert key in on_disk, key
    assert on_disk["machine"]["cpu_count"] and on_disk["machine"]["max_rss_bytes"] > 0
    assert "tokenlean bench kv" in on_disk["command"]
    for row in on_disk["rows"]:
        for key in ("method", "policy", "budget", "task", "query_aware", "score", "skipped"):
            assert key in row, key
    full = _rows(result, "none", "niah_single")[0]
    assert full["n"] == 1 and full["prefill_s"] > 0 and full["decode_ms_per_token"] > 0
    assert full["kv_bytes_allocated"] == full["kv_bytes_full"]  # the full cache, measured
    half = _rows(result, "snapkv@0.5", "niah_single")[0]
    assert half["kv_bytes_allocated"] < full["kv_bytes_allocated"] and half["kv_ratio"] < 1
    assert _rows(result, "snapkv@0.5 (query-aware)", "niah_single")[0]["query_aware"] is True
    if importlib.util.find_spec("matplotlib") is not None:
        assert path.with_suffix(".png").stat().st_size > 0
        assert path.with_name(path.stem + "-ppl.png").stat().st_size > 0
    kvbench.print_kv_table(result)
    table = capsys.readouterr().out
    assert "snapkv@0.5" in table and "streaming perplexity" in table


def test_budget_one_is_the_full_cache(run):
    result, _ = run
    for task in ("niah_single", "vt"):
        full = _rows(result, "none", task)[0]["samples"]
        same = _rows(result, "snapkv@1", task)[0]["samples"]
        assert [s["text"] for s in same] == [s["text"] for s in full], task
        assert same[0]["kv_bytes_allocated"] == full[0]["kv_bytes_allocated"]


def test_unfinished_policy_is_a_skipped_row(run):
    result, _ = run
    for row in [r for r in _rows(result, "broken@0.5") if r["task"] != "ppl"]:
        assert row["score"] is None and "not implemented yet" in row["skipped"]
    assert any("broken@0.5" in n and "not implemented" in n for n in result["notes"])


def test_streaming_ppl_rows(run):
    result, _ = run
    (full,) = _rows(result, "none", "ppl")
    assert full["tokens"] == 320 and full["ppl"] > 1 and full["segments"]
    (keep,) = _rows(result, "keepall@0.5", "ppl")  # keeps all: the full cache's numbers
    assert keep["ppl"] == pytest.approx(full["ppl"], rel=1e-4)
    assert _rows(result, "snapkv@0.5", "ppl")[0]["skipped"].startswith("n/a")


def test_kvpress_peer_missing_is_a_note(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenlean.bench.kvpress_peer", None)  # import fails
    result = kvbench.run_kv_bench(kv_args(model, tmp_path, "--policies", "snapkv",
                                          "--budgets", "0.5", "--tasks", "niah_single",
                                          "--peers", "kvpress"))
    assert any(n.startswith("kvpress: skipped") for n in result["notes"])


def test_kvpress_peer_rows(model, tmp_path, monkeypatch):
    seen = {}

    def run_kvpress_peer(samples, model_folder, presses, budgets, python=None):
        seen.update(samples=samples, presses=presses, budgets=budgets)
        return [{"press": p, "budget": b, "sample": i, "text": " ".join(s.answers),
                 "prefill_s": 0.1, "decode_s": 0.2, "tokens": 3}
                for p in presses for b in budgets for i, s in enumerate(samples)]

    module = types.ModuleType("tokenlean.bench.kvpress_peer")
    module.run_kvpress_peer = run_kvpress_peer
    monkeypatch.setitem(sys.modules, "tokenlean.bench.kvpress_peer", module)
    result = kvbench.run_kv_bench(kv_args(model, tmp_path, "--policies", "none,snapkv",
                                          "--budgets", "0.5", "--tasks", "niah_single",
                                          "--peers", "kvpress"))
    assert seen["presses"] == ["full", "snapkv"] and seen["budgets"] == [0.5]
    assert all(isinstance(s, KVSample) for s in seen["samples"])
    (row,) = [r for r in result["rows"] if r["kind"] == "kvpress" and "snapkv" in r["method"]]
    assert row["method"] == "kvpress:snapkv@0.5" and row["score"] == 1.0
    assert row["decode_ms_per_token"] == pytest.approx(100.0)


def test_context_past_the_model_runs_with_a_streaming_policy(model, tmp_path):
    """Every method of a context past the model's runs past it; the warm-up too (it ran the
    plain cache, which refused the prompt, and so the whole run)."""
    args = kv_args(model, tmp_path, "--policies", "streaming", "--budgets", "0.25",
                   "--tasks", "passkey", "--max-new-tokens", "4")
    args.context = str(2 * CONTEXT)
    result = kvbench.run_kv_bench(args)
    (row,) = _rows(result, "streaming@0.25", "passkey")
    assert row["n"] == 1 and not row["skipped"]


def test_kvpress_duo_runs_on_our_calibration(model, tmp_path, monkeypatch):
    """duo's counterpart, DuoAttentionPress, gets the head scores of the calibration that
    tokenlean's duo policy reads (kvpress cannot download its own offline)."""
    from tokenlean.kv import calibrate

    seen = {}

    def run_kvpress_peer(samples, model_folder, presses, budgets, duo_patterns=None):
        seen.update(presses=presses, duo_patterns=duo_patterns)
        return []

    module = types.ModuleType("tokenlean.bench.kvpress_peer")
    module.run_kvpress_peer = run_kvpress_peer
    from tokenlean.bench.kvpress_peer import duo_patterns
    module.duo_patterns = duo_patterns
    monkeypatch.setitem(sys.modules, "tokenlean.bench.kvpress_peer", module)
    import tokenlean

    tiny = tokenlean.load(str(model), device="cpu", dtype="fp32").model
    path = tmp_path / "duo.json"
    scores = [[0.25, 0.75], [1.0, 0.0]]
    path.write_text(json.dumps({"model": "tiny", "digest": calibrate.model_digest(tiny),
                                "sinks": 2, "recent": 8, "scores": scores}))
    kvbench.run_kv_bench(kv_args(model, tmp_path, "--policies",
                                 f"none,duo:sinks=2:recent=8:calibration={path}",
                                 "--budgets", "0.5", "--tasks", "niah_single",
                                 "--peers", "kvpress"))
    assert seen["presses"] == ["full", "duo_attention"]
    assert seen["duo_patterns"] == {"sink_size": 2, "recent_size": 8, "head_scores": scores}


def test_an_interrupted_run_resumes_from_its_log(model, tmp_path, monkeypatch):
    """Every generation is logged as it finishes; --resume takes those from the log and runs
    only the rest, and a log made with other weights is refused."""
    real, calls = kvbench.generate_one, []

    def interrupted(lm, method, sample):
        calls.append(method.label)
        if len(calls) == 4:  # the warm-up and two generations done, then Ctrl-C
            raise KeyboardInterrupt
        return real(lm, method, sample)

    extra = ["--policies", "none,snapkv", "--budgets", "0.5", "--tasks", "niah_single,vt",
             "--max-new-tokens", "4"]
    monkeypatch.setattr(kvbench, "generate_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kvbench.run_kv_bench(kv_args(model, tmp_path, *extra))
    (log,) = tmp_path.glob("kv-*.runs.jsonl")
    assert len(log.read_text().splitlines()) == 1 + 2  # the identity and two generations

    calls.clear()
    monkeypatch.setattr(kvbench, "generate_one", lambda *a: calls.append(a[1].label) or real(*a))
    result = kvbench.run_kv_bench(kv_args(model, tmp_path, *extra, "--resume", str(log)))
    assert len(calls) == 1 + 4 - 2  # the warm-up, and the two generations not logged
    assert all(r["n"] == 1 and r["score"] is not None for r in result["rows"])
    assert any(n.startswith("resumed") for n in result["notes"])
    assert len(log.read_text().splitlines()) == 1 + 4  # the rest went into the same log

    lines = log.read_text().splitlines()
    head = json.loads(lines[0])
    head["identity"]["weights"] = "0123456789ab"
    log.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    with pytest.raises(UserError, match="weights"):
        kvbench.run_kv_bench(kv_args(model, tmp_path, *extra, "--resume", str(log)))


@pytest.mark.parametrize("extra, message", [
    (["--resume", "/nonexistent/kv.runs.jsonl"], "no such file"),
    (["--policies", "none,magic"], "unknown kv policy 'magic'"),
    (["--policies", "snapkv:windoww=3"], "windoww"),
    (["--budgets", "0"], "above 0"),
    (["--budgets", "lots"], "must be a fraction"),
    (["--budgets", "0.5,50%"], "twice"),
    (["--tasks", "niah_single,nope"], "unknown task 'nope'"),
    (["--context", "1024"], "longer than"),
    (["--context", "64"], "at least 128"),
    (["--context", "two"], "not a number"),
    (["--peers", "vllm"], "unknown peer"),
    (["--ppl-tokens", "100"], "two chunks"),
])
def test_bad_input_is_a_user_error_before_loading(model, tmp_path, monkeypatch, extra, message):
    import tokenlean.lm

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(tokenlean.lm, "load", no_load)
    with pytest.raises(UserError, match=message) as e:
        kvbench.run_from_args(kv_args(model, tmp_path, *extra))
    assert "\n" not in str(e.value)


def test_contexts_parse():
    assert kvbench.parse_contexts("2k,4K,8192") == [2048, 4096, 8192]


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_ppl_fraction_budget_counts_the_models_context(model, policy):
    """A stream has no prompt: 0.25 keeps a quarter of the context, not of the first chunk
    (policies with their own prefill used to size their cache on the 64-token chunk)."""
    from tokenlean.lm import load

    lm = load(str(model), device="cpu", dtype="fp32")
    ids = [10 + i % 300 for i in range(2 * CONTEXT)]
    out = kvbench.stream_ppl(lm, kvbench.Method(f"{policy}@0.25", policy, "0.25"), ids, 64, 256)
    c = lm.model.config
    per_entry = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    kept = out["kv_bytes_allocated"] / per_entry
    assert CONTEXT // 4 <= kept <= CONTEXT // 4 + 2 * 64 + 16
