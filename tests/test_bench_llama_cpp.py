"""llama.cpp as a benchmark peer, and memory bandwidth in `bench decode`.

Without llama-cpp-python: the bandwidth figures, the weight-bytes accounting, which GGUF
files the llama.cpp rows use, the skip notes, `bench serve` against a server without
/metrics. With it (skipped otherwise): llama.cpp's F32 greedy ids equal tokenlean's on
the tiny model, prompt lookup gives the same ids, every generation does its own prefill.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tokenlean.bench import llama_cpp as lcpp
from tokenlean.bench.bandwidth import gemv_bandwidth, model_weight_bytes, read_bandwidth
from tokenlean.bench.report import weights_digest
from tokenlean.errors import UserError

TL_CODE = Path(__file__).resolve().parents[1] / "src" / "tokenlean" / "zoo" / "models" / "tl-code"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private TOKENLEAN_HOME: GGUFs written by the tests go there, not to ~/.cache."""
    monkeypatch.setenv("TOKENLEAN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def no_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails


# ---- bandwidth ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_bandwidth_is_a_positive_figure(dtype):
    got = gemv_bandwidth(dtype, mbytes=8, repeats=3)
    assert got["gb_per_s"] > 0
    assert got["matrix_bytes"] == 8 << 20 and len(got["times_s"]) == 3


def test_read_bandwidth_is_a_positive_figure():
    got = read_bandwidth(mbytes=8, repeats=3)
    assert got["gb_per_s"] > 0 and got["bytes"] == 8 << 20


def _layer_elements(h: int, inter: int, heads: int, kv_heads: int, head_dim: int) -> int:
    q_o = 2 * h * heads * head_dim
    k_v = 2 * h * kv_heads * head_dim
    return q_o + k_v + 3 * h * inter + 2 * h  # + input and post-attention norms


def test_weight_bytes_of_the_tiny_untied_model(tiny_lm):
    """conftest's model: vocab V, h 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads; untied,
    so the input embedding is one row read per token and the lm_head all of it."""
    c = tiny_lm.model.config
    V, h = c.vocab_size, 64
    expected = 2 * _layer_elements(h, 128, 4, 2, 16) + h + V * h + h  # layers, norm, head, row
    assert model_weight_bytes(tiny_lm.model) == 4 * expected
    assert model_weight_bytes(tiny_lm.model, torch.bfloat16) == 2 * expected


def test_weight_bytes_of_tl_code_tied_and_prepacked():
    """tl-code: tied embedding counted once (as the lm_head read); its prepacked projections
    hold meta-device weights, counted by shape in the model's dtype."""
    from tokenlean.lm import load

    lm = load(str(TL_CODE), device="cpu", dtype="fp32")
    expected = 8192 * 384 + 8 * _layer_elements(384, 1024, 6, 2, 64) + 384
    assert expected == 15_735_168
    assert model_weight_bytes(lm.model) == 4 * expected


def test_tl_code_weight_bytes_equal_its_f32_gguf_tensor_bytes(tmp_path):
    from tokenlean.lm import load
    from tokenlean.model.gguf_write import write_gguf

    lm = load(str(TL_CODE), device="cpu", dtype="fp32")
    f32 = write_gguf(TL_CODE, tmp_path / "m-F32.gguf", "F32")
    assert lcpp.gguf_weight_bytes(f32) == model_weight_bytes(lm.model)
    assert lcpp.gguf_file_type(f32) == "F32"


# ---- which GGUF files ----

def _fake_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_gguf_subfolder_and_originals(tmp_path, home):
    folder = _fake_folder(tmp_path)
    (folder / "gguf").mkdir()
    for name in ("model-F32.gguf", "model-F16.gguf", "original-Q4_1.gguf"):
        (folder / "gguf" / name).write_bytes(b"x")
    rows = lcpp.plan_gguf_models(folder, "m")
    assert [r.label for r in rows] == ["llama.cpp F32", "llama.cpp F16",
                                       "llama.cpp Q4_1 (original, different weights)"]
    assert [r.path for r in rows] == [folder / "gguf" / n for n in
                                      ("model-F32.gguf", "model-F16.gguf", "original-Q4_1.gguf")]
    assert [r.same_weights for r in rows] == [True, True, False]
    assert "different weights" in rows[2].to_json()["weights"]
    assert [r.label for r in lcpp.plan_gguf_models(folder, "m", ("F16",), originals=False)] == [
        "llama.cpp F16"]
    assert not home.exists()  # nothing written


def test_gguf_written_once_into_the_cache(tmp_path, home, monkeypatch, capsys):
    import tokenlean.model.gguf_write as gw

    folder = _fake_folder(tmp_path)
    calls = []

    def fake_write(src, out, dtype):
        calls.append((Path(src), dtype))
        Path(out).write_bytes(b"gguf")
        return Path(out)

    monkeypatch.setattr(gw, "write_gguf", fake_write)
    cache = home / "gguf" / f"ckpt-{weights_digest(folder)}"
    rows = lcpp.plan_gguf_models(folder, "ckpt")
    assert [r.path for r in rows] == [cache / "model-F32.gguf", cache / "model-F16.gguf"]
    assert calls == [(folder, "F32"), (folder, "F16")]
    assert "writing F32 GGUF" in capsys.readouterr().err
    assert not list(cache.glob("*partial*"))
    assert lcpp.plan_gguf_models(folder, "ckpt")[0].path == cache / "model-F32.gguf"
    assert len(calls) == 2  # reused, not written again
    # a hub id's slash does not make a subfolder
    assert lcpp.gguf_cache_dir("org/model", folder).parent == home / "gguf"


def test_no_writer_is_a_note_not_an_error(tmp_path, home, monkeypatch):
    folder = _fake_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenlean.model.gguf_write", None)
    (row,) = lcpp.plan_gguf_models(folder, "m", ("F32",))
    assert row.path is None
    assert "llama.cpp F32: skipped" in row.note and "gguf/model-F32.gguf" in row.note


def _headless_gguf(path: Path) -> Path:
    """A readable GGUF of one tensor and no hyperparameters: no model llama.cpp can load."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_model_file_is_used_as_it_is(tmp_path, home):
    path = _headless_gguf(tmp_path / "x.gguf")
    (row,) = lcpp.plan_gguf_models(path, "x")
    assert row.path == path and row.label == "llama.cpp Q8_0"
    assert lcpp.gguf_weight_bytes(path) == 4 * 8 * 4  # tied (no output.weight): all of it


# ---- without llama-cpp-python ----

def test_peer_without_llama_cpp_is_a_user_error(no_llama_cpp):
    with pytest.raises(UserError, match=r"pip install 'tokenlean\[llamacpp\]'"):
        lcpp.LlamaCppPeer("x.gguf", 1, 64)
    assert lcpp.llama_cpp_version() is None
    run, note = lcpp.wanted("auto")
    assert run is False and "tokenlean[llamacpp]" in note
    assert lcpp.wanted("off") == (False, None)
    with pytest.raises(UserError, match="llama-cpp-python"):
        lcpp.wanted("on")


def _bench_decode(model, out, *extra):
    from tokenlean.cli import main

    code = main(["bench", "decode", "--model", str(model), "--device", "cpu", "--dtype", "fp32",
                 "--prompts", "1", "--prompt-tokens", "16", "--max-new-tokens", "8",
                 "--repeats", "1", "--out", str(out), *extra])
    files = sorted(Path(out).glob("decode-*.json")) if Path(out).is_dir() else []
    return code, json.loads(files[-1].read_text()) if files else None


def test_bench_decode_notes_the_skip_and_reports_bandwidth(tiny_model_dir, tmp_path, home,
                                                           no_llama_cpp, monkeypatch, capsys):
    pytest.importorskip("transformers")
    import tokenlean.bench.bandwidth as bw

    monkeypatch.setattr(bw, "GEMV_MBYTES", 8)
    code, result = _bench_decode(tiny_model_dir, tmp_path)
    assert code == 0
    assert set(result["systems"]) == {"tokenlean", "transformers"}
    assert result["llama_cpp"] is None
    assert any("llama.cpp: skipped" in n and "tokenlean[llamacpp]" in n for n in result["notes"])
    out = capsys.readouterr().out
    assert "llama.cpp: skipped" in out and "GB/s" in out
    gemv = result["bandwidth"]["gemv"]
    assert gemv["float32"]["gb_per_s"] > 0 and gemv["bfloat16"]["gb_per_s"] > 0
    assert result["bandwidth"]["read"]["gb_per_s"] > 0
    for s in result["systems"].values():
        assert s["weight_bytes_per_token"] == model_weight_bytes(
            __import__("tokenlean.lm").lm.load(str(tiny_model_dir), "cpu", "fp32").model)
        assert s["achieved_gb_per_s"] > 0 and s["gemv_reference"] == "float32"
        assert s["fraction_of_gemv"] > 0 and s["fraction_of_read"] > 0
    assert result["speedups"]["transformers"] == result["speedup"]
    code, _ = _bench_decode(tiny_model_dir, tmp_path, "--llama-cpp", "on")
    assert code == 2
    err = capsys.readouterr().err
    assert "tokenlean[llamacpp]" in err and len(err.strip().splitlines()) == 1


def test_bench_spec_default_peers_skip_llama_cpp_with_a_note(tiny_model_dir, tmp_path, home,
                                                             no_llama_cpp, capsys):
    pytest.importorskip("transformers")
    from tokenlean.cli import main

    base = ["bench", "spec", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype",
            "fp32", "--tasks", "random", "--prompts", "1", "--prompt-tokens", "16",
            "--max-new-tokens", "8", "--repeats", "1", "--out", str(tmp_path)]
    # hf-assisted's draft is the target itself (the zoo's draft has another vocabulary)
    assert main(base + ["--methods", f"greedy,draft:model={tiny_model_dir}"]) == 0
    result = json.loads(sorted(tmp_path.glob("spec-*.json"))[-1].read_text())
    assert not any(s.startswith("llama.cpp") for s in result["systems"])
    assert any("llama.cpp-pld: skipped" in n for n in result["notes"])
    capsys.readouterr()
    assert main(base + ["--methods", "greedy", "--peers", "llama.cpp"]) == 2  # asked by name
    err = capsys.readouterr().err
    assert "tokenlean[llamacpp]" in err and len(err.strip().splitlines()) == 1


# ---- bench serve against a server without /metrics (like llama_cpp.server) ----

def _fake_llama_server():
    """llama_cpp.server's behaviour: string prompts only (a token-id list is a 500), streamed
    chunks with no usage, no /metrics and no /health (404)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "fake.gguf", "object": "model"}]})

    async def completions(request):
        body = await request.json()
        if not isinstance(body["prompt"], str):
            return JSONResponse({"error": {"message": "1 validation error:\n prompt\n str"}},
                                status_code=500)
        n = body["max_tokens"]

        def stream():
            for _ in range(n):
                yield "data: " + json.dumps({"choices": [{"text": " x", "index": 0,
                                                          "finish_reason": None}]}) + "\n\n"
            yield "data: [DONE]\n\n"

        if not body.get("stream"):
            return JSONResponse({"choices": [{"text": " x" * n, "finish_reason": "length"}]})
        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models),
                             Route("/v1/completions", completions, methods=["POST"])])


def test_bench_serve_without_metrics_reports_and_does_not_crash(tiny_model_dir, tmp_path,
                                                                capsys):
    pytest.importorskip("starlette")
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from tokenlean.bench.serve_load import _free_port
    from tokenlean.cli import main

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(_fake_llama_server(), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        out = tmp_path / "out"
        rc = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model",
                   str(tiny_model_dir), "--num-prompts", "3", "--max-concurrency", "2",
                   "--prompt-tokens", "16", "--max-tokens", "5", "--out", str(out)])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert rc == 0
    (path,) = out.glob("serve-*.json")
    result = json.loads(path.read_text())
    assert result["completed"] == 3 and result["failed"] == 0, result["errors"]
    assert result["total_output_tokens"] == 15 and result["output_throughput"] > 0
    assert result["spec_decode"] is None and result["prompt_format"] == "text"
    notes = " ".join(result["notes"])
    assert "speculative decoding: unavailable" in notes
    assert "refused token-id prompts" in notes and "no usage chunk" in notes
    assert "speculative decoding: unavailable" in capsys.readouterr().out


# ---- with llama-cpp-python ----

@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")
    from tokenlean.model.gguf_write import write_gguf

    return write_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-F32.gguf", "F32")


def _prompts(lm, n=3, tokens=24):
    from tokenlean.bench.prompts import heldout_prompts

    return [p.ids for p in heldout_prompts(lm.tokenizer, n, tokens)]


def test_llama_cpp_f32_greedy_equals_tokenlean(tiny_lm, tiny_gguf):
    peer = lcpp.LlamaCppPeer(tiny_gguf, threads=1, context=64)
    assert peer.settings()["kv_cache_type"] == "F32" and peer.file_type == "F32"
    for ids in _prompts(tiny_lm):
        want = tiny_lm.generate(ids, 16, stop_token_ids=[]).token_ids
        for _ in range(2):  # the second run must not reuse the first one's KV cache
            got, elapsed = peer.generate(ids, 16)
            assert got == want and elapsed > 0
            assert peer.last_forwards == 16  # the prefill, then one per token but the last
            assert peer.last_eval_sizes[0] == len(ids)  # the whole prompt, every time
    peer.close()


def test_llama_cpp_prompt_lookup_gives_the_greedy_ids(tiny_lm, tiny_gguf):
    plain = lcpp.LlamaCppPeer(tiny_gguf, threads=1, context=96)
    pld = lcpp.LlamaCppPeer(tiny_gguf, threads=1, context=96, lookup=4)
    assert pld.lookup == {"num_pred_tokens": 4, "max_ngram_size": 2}
    repetitive = [tiny_lm.tokenizer.encode("for i in range(10):\n    print(i)\n") * 4]
    for ids in _prompts(tiny_lm) + repetitive:
        want, _ = plain.generate(ids, 24)
        got, _ = pld.generate(ids, 24)
        assert got == want
        assert pld.last_forwards <= plain.last_forwards == 24
    plain.close()
    pld.close()


def test_llama_cpp_bad_gguf_is_one_line_user_error(tmp_path):
    pytest.importorskip("llama_cpp")
    for bad, message in ((_headless_gguf(tmp_path / "headless.gguf"), "llama.cpp cannot load"),
                         (tmp_path / "bad.gguf", "cannot read GGUF")):
        if not bad.exists():
            bad.write_bytes(b"GGUF not really")
        with pytest.raises(UserError, match=message) as e:
            lcpp.LlamaCppPeer(bad, 1, 64)
        assert "\n" not in str(e.value)


def test_bench_decode_with_llama_cpp_rows(tiny_model_dir, tmp_path, home, monkeypatch, capsys):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("transformers")
    import tokenlean.bench.bandwidth as bw

    monkeypatch.setattr(bw, "GEMV_MBYTES", 8)
    code, result = _bench_decode(tiny_model_dir, tmp_path, "--llama-cpp", "on")
    assert code == 0
    assert set(result["systems"]) == {"tokenlean", "transformers", "llama.cpp F32",
                                      "llama.cpp F16"}
    f32, f16 = result["systems"]["llama.cpp F32"], result["systems"]["llama.cpp F16"]
    assert f32["exact"] is True and f32["same_weights"] and f32["kv_cache_type"] == "F32"
    assert f32["weight_bytes_per_token"] == result["systems"]["tokenlean"]["weight_bytes_per_token"]
    assert f16["gemv_reference"] == "float16" and f16["achieved_gb_per_s"] > 0
    assert result["bandwidth"]["gemv"]["float16"]["gb_per_s"] > 0
    assert set(result["speedups"]) == {"transformers", "llama.cpp F32", "llama.cpp F16"}
    (prompt,) = result["per_prompt"]
    assert prompt["llama_cpp"]["llama.cpp F32"]["ids"] == prompt["tokenlean_ids"]
    assert "--llama-cpp on" in result["command"]
    assert "speedup tokenlean / llama.cpp F32" in capsys.readouterr().out
    assert (home / "gguf").is_dir()  # written into the (test's) tokenlean home


def test_bench_spec_with_llama_cpp_peers(tiny_model_dir, tmp_path, home):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("transformers")
    from tokenlean.cli import main

    assert main(["bench", "spec", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype",
                 "fp32", "--tasks", "random", "--prompts", "1", "--prompt-tokens", "16",
                 "--max-new-tokens", "8", "--repeats", "1", "--methods", "greedy",
                 "--peers", "llama.cpp,llama.cpp-pld", "--prompt-lookup-num-tokens", "3",
                 "--out", str(tmp_path)]) == 0
    result = json.loads(sorted(tmp_path.glob("spec-*.json"))[-1].read_text())
    figures = result["results"]["random"]
    assert result["exact"]["llama.cpp"] is True and result["exact"]["llama.cpp-pld"] is True
    assert figures["llama.cpp"]["median_mat"] == 1.0 and figures["llama.cpp-pld"]["median_mat"] >= 1
    assert result["llama_cpp"]["peers"]["llama.cpp-pld"]["prompt_lookup"]["num_pred_tokens"] == 3
    assert result["llama_cpp"]["file_type"] == "F32"


def test_weights_digest_of_a_gguf_file_hashes_the_file(tmp_path):
    """A model loaded from a .gguf must not record the digest of nothing."""
    import hashlib

    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF one")
    b.write_bytes(b"GGUF two")
    assert weights_digest(a) == hashlib.sha256(b"GGUF one").hexdigest()[:16]
    assert weights_digest(a) != weights_digest(b)
