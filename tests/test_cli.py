"""The CLI: output formats, and every bad input -> one clear line and exit 2, never a traceback.

Most cases run `tokenlean.cli.main` in-process; a few run `python -m tokenlean.cli` in a
subprocess to check the real exit code, stdin, and that no traceback reaches stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from cli_run import assert_user_error
from cli_run import run_cli as run
from tokenlean.cli import build_parser

PROMPT = "def f("


def gen(model_dir, *extra) -> list:
    return ["generate", "--model", model_dir, "--device", "cpu", *extra]


def assert_usage_error(rc: int, out: str, err: str, *fragments: str) -> None:
    """An argparse error: the same one line as any other bad input, naming the argument."""
    assert_user_error(rc, out, err, "argument", "--help", *fragments)


def subprocess_cli(*argv, input: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tokenlean.cli", *map(str, argv)],
                          input=input, capture_output=True, text=True, timeout=120, env=env)


# --- generate: output -----------------------------------------------------------------------


def test_generate_json(capsys, tiny_model_dir, tiny_lm):
    rc, out, err = run(capsys, *gen(tiny_model_dir, "--prompt", PROMPT, "-n", 5, "--json"))
    assert rc == 0, err
    result = json.loads(out)
    assert {"text", "token_ids", "prompt_tokens", "completion_tokens", "stats"} <= set(result)
    # EOS may end it early; the random tiny model happens not to, but don't rely on it
    assert 1 <= result["completion_tokens"] <= 5
    assert result["completion_tokens"] == len(result["token_ids"])
    assert result["prompt_tokens"] == len(tiny_lm.encode(PROMPT))
    assert result["finish_reason"] in ("length", "stop")
    assert result["stats"]["method"] == "greedy"
    # the same thing as the library call
    expected = tiny_lm.generate(PROMPT, 5)
    assert result["token_ids"] == expected.token_ids
    assert result["text"] == expected.text


def test_generate_streams_text_and_no_stream_prints_it(capsys, tiny_model_dir, tiny_lm):
    expected = tiny_lm.generate(PROMPT, 6).text
    rc, out, _ = run(capsys, *gen(tiny_model_dir, "--prompt", PROMPT, "-n", 6))
    assert rc == 0 and out == expected + "\n"
    rc, out, _ = run(capsys, *gen(tiny_model_dir, "--prompt", PROMPT, "-n", 6, "--no-stream"))
    assert rc == 0 and out == expected + "\n"


def test_generate_prompt_file(capsys, tiny_model_dir, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT + "é", encoding="utf-8")
    rc, out, err = run(capsys, *gen(tiny_model_dir, "--prompt-file", path, "-n", 3, "--json"))
    assert rc == 0, err
    from_file = json.loads(out)
    rc, out, _ = run(capsys, *gen(tiny_model_dir, "--prompt", PROMPT + "é", "-n", 3, "--json"))
    assert from_file == {**json.loads(out), "stats": from_file["stats"]}


def test_generate_options(capsys, tiny_model_dir, tiny_lm):
    args = gen(tiny_model_dir, "--prompt", PROMPT, "-n", 4, "--json", "--temperature", "0.9",
               "--top-k", "20", "--top-p", "0.9", "--seed", "3")
    a = json.loads(run(capsys, *args)[1])
    b = json.loads(run(capsys, *args)[1])
    assert a["token_ids"] == b["token_ids"]
    assert a["stats"]["sampling"] == "sample"
    # every option reaches the sampler: the same draws as the library with those settings
    from tokenlean.sampling import SamplingParams

    want = tiny_lm.generate(PROMPT, 4, SamplingParams(0.9, top_k=20, top_p=0.9, seed=3))
    assert a["token_ids"] == want.token_ids
    others = [tiny_lm.generate(PROMPT, 4, SamplingParams(0.9, top_k=20, top_p=0.9, seed=s))
              for s in range(4, 12)]
    assert any(o.token_ids != a["token_ids"] for o in others)  # the seed matters
    rc, out, err = run(capsys, *gen(tiny_model_dir, "--prompt", "hi", "-n", 2, "--chat", "--json"))
    assert rc == 0, err
    chat_prompt = tiny_lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert json.loads(out)["prompt_tokens"] == len(tiny_lm.encode(chat_prompt))


def test_generate_stop_string(capsys, tiny_model_dir, tiny_lm):
    full = tiny_lm.generate(PROMPT, 12, stop_token_ids=[]).text
    stop = full[4:6]
    rc, out, _ = run(capsys, *gen(tiny_model_dir, "--prompt", PROMPT, "-n", 12, "--json",
                                  "--stop", stop))
    assert rc == 0
    text = json.loads(out)["text"]
    assert stop not in text and full.startswith(text)


def test_generate_stdin_subprocess(tiny_model_dir):
    proc = subprocess_cli(*gen(tiny_model_dir, "-n", 3, "--json"), input=PROMPT)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)
    assert 1 <= result["completion_tokens"] <= 3
    assert result["prompt_tokens"] == 3  # "def", " f", "("


def test_error_exit_code_subprocess(tmp_path):
    proc = subprocess_cli("generate", "--model", tmp_path / "missing", "--prompt", "x")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("tokenlean: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


# --- generate: bad input --------------------------------------------------------------------


def test_missing_model_folder(capsys, tmp_path):
    rc, out, err = run(capsys, "generate", "--model", tmp_path / "nope", "--prompt", "x")
    assert_user_error(rc, out, err, "no such model folder")


def test_unknown_model_name(capsys):
    rc, out, err = run(capsys, "generate", "--model", "no-such-model", "--prompt", "x")
    assert_user_error(rc, out, err, "unknown model 'no-such-model'")


def test_hub_id_downloads_or_says_why_not(capsys, monkeypatch, tiny_model_dir):
    """A hub id goes to huggingface_hub (here stood in for: these machines have no hub); what
    it returns is loaded, and a failure (offline, unknown repo) is one line."""
    import huggingface_hub

    asked = []

    def snapshot(name, **kwargs):
        asked.append(name)
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    rc, out, err = run(capsys, "generate", "--model", "some-org/some-model", "--device", "cpu",
                       "--prompt", "def f(x):", "-n", "2", "--json")
    assert rc == 0, err
    assert asked == ["some-org/some-model"] and json.loads(out)["completion_tokens"] >= 1

    def offline(name, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    rc, out, err = run(capsys, "generate", "--model", "some-org/some-model", "--prompt", "x")
    assert_user_error(rc, out, err, "cannot get 'some-org/some-model' from the Hugging Face hub",
                      "LocalEntryNotFoundError", "local checkpoint folder")


def test_model_path_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    rc, out, err = run(capsys, "generate", "--model", tmp_path / "f", "--prompt", "x")
    assert_user_error(rc, out, err, "is a file")


def test_folder_without_config(capsys, tmp_path):
    rc, out, err = run(capsys, "generate", "--model", tmp_path, "--prompt", "x")
    assert_user_error(rc, out, err, "no config.json")


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    rc, out, err = run(capsys, "generate", "--model", tmp_path, "--prompt", "x")
    assert_user_error(rc, out, err, "unsupported model_type 'gpt2'")


def broken_copy(src, dst, name: str, content: bytes | None):
    shutil.copytree(src, dst)
    if content is None:
        (dst / name).unlink()
    else:
        (dst / name).write_bytes(content)
    return dst


@pytest.mark.parametrize("name, content, fragment", [
    ("config.json", b"{", "cannot read model config"),
    ("model.safetensors", None, "no *.safetensors"),
    ("model.safetensors", b"\x00" * 100, "cannot read weights"),
    ("tokenizer.json", None, "no tokenizer.json"),
    ("tokenizer.json", b'{"x": 1', "cannot read"),
    ("tokenizer_config.json", b"{", "not valid JSON"),
])
def test_broken_model_folder(capsys, tiny_model_dir, tmp_path, name, content, fragment):
    folder = broken_copy(tiny_model_dir, tmp_path / "m", name, content)
    rc, out, err = run(capsys, *gen(folder, "--prompt", "x", "-n", 1))
    assert_user_error(rc, out, err, fragment)


def test_weights_not_matching_config(capsys, tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    rc, out, err = run(capsys, *gen(folder, "--prompt", "x", "-n", 1))
    assert_user_error(rc, out, err, "weights do not match the config")


@pytest.mark.parametrize("change, field", [
    ({"hidden_size": -5}, "hidden_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"num_attention_heads": -4}, "num_attention_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"intermediate_size": 12.5}, "intermediate_size"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"hidden_size": 66, "head_dim": None},
     "hidden_size (66) must be a multiple of num_attention_heads (4)"),
    ({"head_dim": 15}, "head_dim"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    # the fixture writes transformers 5's rope_parameters; older checkpoints the top-level keys
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta"),
    ({"rope_parameters": None, "rope_theta": "big"}, "rope_theta"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope_scaling.factor"),
    ({"rope_parameters": None, "rope_scaling": [2.0]}, "rope_scaling"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"eos_token_id": "</s>"}, "eos_token_id"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
])
def test_nonsense_config_values(capsys, tiny_model_dir, tmp_path, change, field):
    """Valid JSON, impossible model: one line naming the file and the field, not a traceback."""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    folder = broken_copy(tiny_model_dir, tmp_path / "m", "config.json",
                         json.dumps({**config, **change}).encode())
    rc, out, err = run(capsys, *gen(folder, "--prompt", "x", "-n", 1))
    assert_user_error(rc, out, err, f"bad model config {folder / 'config.json'}: ", field)


def test_config_not_an_object_subprocess(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    proc = subprocess_cli("generate", "--model", tmp_path, "--prompt", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"tokenlean: error: bad model config {tmp_path / 'config.json'}"
                                   ": the config must be a JSON object, got list")


def test_config_without_kv_heads_means_one_per_head():
    """transformers' default; the dataclass's own default (32) would be a wrong guess."""
    from tokenlean.model.config import ModelConfig

    config = ModelConfig.from_hf({"model_type": "llama", "hidden_size": 64,
                                  "num_attention_heads": 4})
    assert config.num_key_value_heads == 4 and config.head_dim == 16


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt(capsys, tiny_model_dir, prompt):
    rc, out, err = run(capsys, *gen(tiny_model_dir, "--prompt", prompt))
    assert_user_error(rc, out, err, "the prompt is empty")


def test_prompt_longer_than_context(capsys, tiny_model_dir, tiny_lm):
    prompt = "x " * 200
    assert len(tiny_lm.encode(prompt)) > 128
    rc, out, err = run(capsys, *gen(tiny_model_dir, "--prompt", prompt, "--json"))
    assert_user_error(rc, out, err, "context is 128")


@pytest.mark.parametrize("args, fragment", [
    (["--max-new-tokens", "0"], "must be >= 1"),
    (["--max-new-tokens", "-3"], "must be >= 1"),
    (["--max-new-tokens", "abc"], "not an integer"),
    (["-n", "2.5"], "not an integer"),
    (["--temperature", "-1"], "must be in [0, 100]"),
    (["--temperature", "nan"], "must be in [0, 100]"),
    (["--temperature", "hot"], "not a number"),
    (["--top-p", "0"], "must be in (0, 1]"),
    (["--top-p", "1.5"], "must be in (0, 1]"),
    (["--top-k", "-1"], "must be >= 0"),
    (["--seed", "x"], "--seed"),
    (["--seed", "-1"], "must be >= 0"),
    (["--seed", str(2**64)], "must be <= 18446744073709551615"),
])
def test_invalid_numbers(capsys, tiny_model_dir, args, fragment):
    rc, out, err = run(capsys, *gen(tiny_model_dir, "--prompt", "x", *args))
    assert_usage_error(rc, out, err, fragment)


def test_prompt_and_prompt_file_exclude_each_other(capsys, tmp_path):
    rc, out, err = run(capsys, "generate", "--prompt", "x", "--prompt-file", tmp_path / "p")
    assert_usage_error(rc, out, err, "not allowed with argument")


def test_missing_prompt_file(capsys, tiny_model_dir, tmp_path):
    rc, out, err = run(capsys, *gen(tiny_model_dir, "--prompt-file", tmp_path / "missing.txt"))
    assert_user_error(rc, out, err, "cannot read prompt file", "No such file")


def test_unreadable_prompt_files(capsys, tiny_model_dir, tmp_path):
    rc, out, err = run(capsys, *gen(tiny_model_dir, "--prompt-file", tmp_path))
    assert_user_error(rc, out, err, "cannot read prompt file")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    rc, out, err = run(capsys, *gen(tiny_model_dir, "--prompt-file", tmp_path / "bin"))
    assert_user_error(rc, out, err, "cannot read prompt file", "utf-8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable(capsys, tiny_model_dir):
    rc, out, err = run(capsys, "generate", "--model", tiny_model_dir, "--prompt", "x",
                       "--device", "cuda")
    assert_user_error(rc, out, err, "CUDA is not available")


@pytest.mark.parametrize("device", ["tpu", "mps", "meta", ""])
def test_unknown_device(capsys, tiny_model_dir, device):
    rc, out, err = run(capsys, "generate", "--model", tiny_model_dir, "--prompt", "x",
                       "--device", device)
    assert_user_error(rc, out, err, "unknown device")


def test_unknown_dtype(capsys, tiny_model_dir):
    rc, out, err = run(capsys, *gen(tiny_model_dir, "--prompt", "x", "--dtype", "fp8"))
    assert_user_error(rc, out, err, "unknown dtype 'fp8'")


# --- other commands -------------------------------------------------------------------------


def test_models_json(capsys):
    rc, out, _ = run(capsys, "models", "--json")
    assert rc == 0
    rows = json.loads(out)
    from tokenlean.zoo import card_summary, zoo_models

    zoo = [r for r in rows if r["kind"] == "zoo"]
    assert [r["name"] for r in zoo] == zoo_models() and zoo  # the shipped models, in order
    for row in zoo:  # each with its card's figures
        assert row == {"name": row["name"], "kind": "zoo", "installed": True,
                       **card_summary(row["name"])}
        assert 0 < row["heldout_top1"] < 1 and row["parameters"] > 0
    from tokenlean.zoo.real import REAL_MODELS

    assert [r["name"] for r in rows if r["kind"] == "real"] == list(REAL_MODELS)


def test_models_table_keeps_whole_names_in_a_pipe(capsys):
    """rich squeezes tables to 80 columns off a terminal; names must not become 'tl-code-dr…'."""
    rc, out, _ = run(capsys, "models")
    assert rc == 0 and "…" not in out
    from tokenlean.zoo import zoo_models

    assert all(name in out for name in zoo_models())
    assert "retrieval@2048" in out


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["models", "--help"],
                                  ["zoo", "--help"], ["bench", "decode", "--help"]])
def test_help_exits_zero(capsys, argv):
    rc, out, _ = run(capsys, *argv)
    assert rc == 0
    assert out.startswith("usage: tokenlean")


def walk_parsers(parser: argparse.ArgumentParser, name: str = "tokenlean"):
    """(command line, parser) for the top parser and every sub-command, however deep."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from walk_parsers(sub, f"{name} {sub_name}")


def test_every_command_and_option_is_described():
    for name, parser in walk_parsers(build_parser()):
        assert parser.description, f"{name} has no description"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{what} has no help"
            if action.default not in (None, False, []):  # a real default: the help says it
                assert "default" in action.help, f"{what}: help does not show the default"


def test_bench_decode_help(capsys):
    rc, out, _ = run(capsys, "bench", "decode", "--help")
    text = " ".join(out.split())  # argparse wraps to the terminal's width
    assert rc == 0
    assert "tokenlean vs transformers' generate on the same weights" in text
    assert "-n MAX_NEW_TOKENS tokens to generate per prompt (default 128)" in text


def test_top_help_says_what_exists(capsys):
    rc, out, _ = run(capsys, "--help")
    text = " ".join(out.split())
    assert rc == 0 and "lossless speculative decoding" in text and "OpenAI-compatible" in text
    assert "KV-cache compression" in text and "planned" not in text


def test_no_command_prints_help_and_fails(capsys):
    rc, out, _ = run(capsys)
    assert rc == 2 and out.startswith("usage: tokenlean")


@pytest.mark.parametrize("argv, fragment", [(["zoo"], "zoo needs a command"),
                                            (["bench"], "bench needs a command")])
def test_missing_subcommand(capsys, argv, fragment):
    rc, out, err = run(capsys, *argv)
    assert_user_error(rc, out, err, fragment)


def test_unknown_command(capsys):
    rc, _, err = run(capsys, "frobnicate")
    assert rc == 2 and "invalid choice" in err
