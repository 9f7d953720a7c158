"""`tokenlean bench decode` end to end on a tiny random Llama checkpoint (CPU, fp32).

These check that the benchmark runs, writes its JSON and compares like with like
(same tokens on both sides, EOS off); they measure nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenlean.bench.prompts import heldout_prompts  # noqa: E402
from tokenlean.cli import main  # noqa: E402
from tokenlean.model.tokenizer import Tokenizer  # noqa: E402
from tokenlean.zoo import zoo_path  # noqa: E402

TL_CODE = Path(__file__).resolve().parents[1] / "src" / "tokenlean" / "zoo" / "models" / "tl-code"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        # Weights well above the default init, so greedy decoding does not sit on near-ties.
        initializer_range=0.2, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    source = zoo_path("tl-code") or TL_CODE
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, folder / name)
    return folder


def bench(model: Path, out: Path, *extra: str) -> tuple[int, dict | None]:
    code = main(["bench", "decode", "--model", str(model), "--device", "cpu", "--dtype", "fp32",
                 "--prompts", "1", "--prompt-tokens", "16", "--max-new-tokens", "8",
                 "--repeats", "1", "--out", str(out), "--llama-cpp", "off", *extra])
    files = sorted(out.glob("decode-*.json")) if out.is_dir() else []
    return code, json.loads(files[-1].read_text()) if files else None


def test_bench_decode_writes_json_and_is_exact(tiny_model, tmp_path, capsys):
    code, result = bench(tiny_model, tmp_path)
    assert code == 0
    assert result is not None
    for key in ("command", "argv", "date", "machine", "model", "dtype", "device", "setup",
                "systems", "speedup", "exact", "per_prompt"):
        assert key in result, key
    for key in ("platform", "processor", "cpu_count", "torch", "transformers", "threads"):
        assert key in result["machine"], key
    assert result["machine"]["threads"] == torch.get_num_threads()
    assert result["dtype"] == "float32" and result["device"] == "cpu"
    assert result["setup"] | {"prompts": 1, "prompt_tokens": 16, "max_new_tokens": 8,
                              "repeats": 1} == result["setup"]
    assert set(result["systems"]) == {"tokenlean", "transformers"}
    for system in result["systems"].values():
        assert len(system["tokens_per_s"]) == 1
        assert len(system["generation_time_s"]) == 1 and len(system["generation_time_s"][0]) == 1
        assert system["median_tokens_per_s"] > 0
    assert result["speedup"]["tokens_per_s"] > 0
    assert result["exact"] is True
    (prompt,) = result["per_prompt"]
    assert prompt["tokens"] == 16 and prompt["exact"] is True
    assert len(prompt["tokenlean_ids"]) == 8 and prompt["tokenlean_ids"] == prompt["transformers_ids"]
    assert "tokenlean bench decode" in result["command"]
    assert "transformers" in capsys.readouterr().out  # the table


def test_bench_decode_ignores_eos(tiny_model, tmp_path):
    """With EOS = the first greedy token, both sides still generate all 8 tokens, identically."""
    _, first = bench(tiny_model, tmp_path / "a", "--no-peers")
    eos = first["per_prompt"][0]["tokenlean_ids"][0]
    folder = tmp_path / "eos-model"
    shutil.copytree(tiny_model, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = eos
    (folder / "generation_config.json").write_text(json.dumps(gen))
    code, result = bench(folder, tmp_path / "b")
    assert code == 0
    (prompt,) = result["per_prompt"]
    assert prompt["tokenlean_ids"][0] == eos
    assert len(prompt["tokenlean_ids"]) == len(prompt["transformers_ids"]) == 8
    assert result["exact"] is True


def test_bench_decode_no_peers(tiny_model, tmp_path):
    code, result = bench(tiny_model, tmp_path, "--no-peers")
    assert code == 0
    assert set(result["systems"]) == {"tokenlean"}
    assert result["exact"] is None and result["speedup"] is None


def test_bench_decode_without_transformers(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import fails
    code, result = bench(tiny_model, tmp_path)
    assert code == 2 and result is None
    err = capsys.readouterr().err
    assert "pip install 'tokenlean[bench]'" in err and len(err.strip().splitlines()) == 1


def test_bench_decode_prompt_too_long(tiny_model, tmp_path, capsys):
    code = main(["bench", "decode", "--model", str(tiny_model), "--device", "cpu",
                 "--prompt-tokens", "250", "--max-new-tokens", "8", "--out", str(tmp_path)])
    assert code == 2
    assert "context" in capsys.readouterr().err


def test_heldout_prompts_exact_length_and_deterministic():
    tokenizer = Tokenizer(zoo_path("tl-code") or TL_CODE)
    a = heldout_prompts(tokenizer, 5, 64)
    b = heldout_prompts(tokenizer, 5, 64)
    assert [p.ids for p in a] == [p.ids for p in b]
    assert all(len(p.ids) == 64 for p in a)
    assert len({p.source for p in a}) == 5  # round-robin: one window per file first
