"""GGUF: reading (config, dequantized weights, tokenizer), writing, chat templates and stop ids.

Tiny random models of each family are saved by transformers, written to GGUF by our
`write_gguf`, then loaded by us and by transformers' own GGUF loader (which undoes
llama.cpp's q/k row interleaving for Llama as we do): both must give the same logits.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader, GGUFWriter  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from cli_run import assert_user_error, run_cli  # noqa: E402
from conftest import CHAT_TEMPLATE, SPECIAL_TOKENS, TRAIN_TEXT  # noqa: E402
from tokenlean.errors import UserError  # noqa: E402
from tokenlean.model import gguf_write  # noqa: E402
from tokenlean.model.gguf_read import LLAMA3_SPLIT, QWEN2_SPLIT, GGUFFile  # noqa: E402
from tokenlean.model.gguf_write import write_gguf  # noqa: E402
from tokenlean.model.load import load_model, read_state_dict  # noqa: E402
from tokenlean.model.tokenizer import Tokenizer  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "x = 12345 + 3.14159  # digits\n",
    "  two  spaces\n\n\ttab and newlines\r\n",
    "café naïve 日本語 🙂 🚀",
    "<|user|>\nhi<|end|>\n<|assistant|>\n",
    "",
]


def _config(kind: str, vocab: int, **extra):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  initializer_range=0.2, tie_word_embeddings=False)
    common.update(extra)
    if kind == "qwen3":  # transformers reads no head_dim from a qwen3 GGUF: its default, 128
        common.setdefault("head_dim", 128)
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
           "qwen3": "Qwen3Config"}[kind]
    return getattr(transformers, cls)(**common)


def make_folder(tiny_model_dir, folder, kind: str = "llama", **extra):
    """An HF folder of a random tiny `kind` model with conftest's tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, folder / name)
    tok = Tokenizer(folder)
    # the ids conftest gives (save_pretrained rewrites generation_config.json from these)
    config = _config(kind, tok.vocab_size, bos_token_id=None, pad_token_id=None,
                     eos_token_id=tok.tok.token_to_id(tok.eos_token), **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # nonzero biases / norm weights, so a mix-up in them shows
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None),
                         layer.input_layernorm):
                if norm is not None:
                    norm.weight.normal_(1, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory):
    """kind -> an HF folder, built once per module."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = make_folder(tiny_model_dir, tmp_path_factory.mktemp(kind), kind)
        return cache[kind]

    return get


def token_ids(folder) -> torch.Tensor:
    return torch.tensor([Tokenizer(folder).encode("def add(a, b):\n    return a + b\n# café 42")])


def ours(path, ids) -> torch.Tensor:
    return load_model(path, device="cpu", dtype="fp32")(ids)[0]


def hf_gguf(path, ids) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits[0]


def hf_folder(folder, ids) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits[0]


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# --- parity with transformers' GGUF loading ------------------------------------------------


@pytest.mark.parametrize("kind,dtype", [
    ("llama", "F32"), ("llama", "Q8_0"), ("llama", "Q4_1"),
    ("qwen2", "F32"), ("qwen2", "Q4_0"),
    ("qwen3", "F32"), ("qwen3", "Q8_0"),
])
def test_logits_equal_transformers_gguf_loading(folders, tmp_path, kind, dtype):
    folder = folders(kind)
    path = write_gguf(folder, tmp_path / f"{kind}.gguf", dtype)
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == Q[dtype]  # the quantized path really runs
    assert types["blk.0.attn_norm.weight"] == Q.F32
    ids = token_ids(folder)
    assert max_diff(ours(path, ids), hf_gguf(path, ids)) < 1e-4


def test_mistral_name_loads_as_mistral_and_matches_transformers(folders, tmp_path):
    path = write_gguf(folders("mistral"), tmp_path / "m.gguf", "F32")
    assert GGUFReader(path).fields["general.architecture"].contents() == "llama"  # llama.cpp's way
    assert GGUFFile(path).config().model_type == "mistral"
    ids = token_ids(folders("mistral"))
    assert max_diff(ours(path, ids), hf_gguf(path, ids)) < 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_llama_cpp_runs_the_written_file(folders, tmp_path, kind):
    """What the writer is for: llama.cpp loads the file, splits text into the folder's ids,
    gives the folder model's logits (F32 KV cache: only summation order differs) and stops
    where we do."""
    llama_cpp = pytest.importorskip("llama_cpp")
    folder = folders(kind)
    path = write_gguf(folder, tmp_path / f"{kind}.gguf", "F32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False,
                          n_threads=1, type_k=0, type_v=0)  # 0: GGML_TYPE_F32
    text = SAMPLES[0] + SAMPLES[1]
    ids = Tokenizer(folder).encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    assert max_diff(hf_folder(folder, torch.tensor([ids])), theirs) < 1e-4  # the source model
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    stops = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    assert stops == Tokenizer(path).eos_ids


def random_blocks(qtype: Q, rows: int, cols: int, rng) -> np.ndarray:
    """Valid blocks of a k-quant: random bits, small finite fp16 scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = rng.uniform(0.0002, 0.002, (rows, cols // block)).astype(np.float16).view(np.uint8)
    scale = scale.reshape(rows, cols // block, 2)
    if qtype == Q.Q4_K:  # d, dmin first
        data[..., 0:2], data[..., 2:4] = scale, scale
    else:  # Q6_K: d last
        data[..., -2:] = scale
    return data.reshape(rows, -1)


def test_k_quants_dequantize_as_transformers_does(tiny_model_dir, tmp_path, monkeypatch):
    """Q4_K projections and Q6_K embeddings/head (the writer cannot make k-quants: random
    blocks stand in); rows of 256 values, one k-quant super-block."""
    folder = make_folder(tiny_model_dir, tmp_path / "k", "llama", hidden_size=256,
                         intermediate_size=256, num_hidden_layers=1)
    rng = np.random.default_rng(0)
    add = gguf_write._add

    def k_quant_add(w, name, x, qtype):
        if x.ndim != 2:
            return add(w, name, x, qtype)
        q = Q.Q6_K if name in ("token_embd.weight", "output.weight") else Q.Q4_K
        w.add_tensor(name, random_blocks(q, *x.shape, rng), raw_dtype=q)

    monkeypatch.setattr(gguf_write, "_add", k_quant_add)
    path = write_gguf(folder, tmp_path / "k.gguf", "F32")
    types = {t.tensor_type for t in GGUFReader(path).tensors}
    assert {Q.Q4_K, Q.Q6_K} <= types
    ids = token_ids(folder)
    theirs = hf_gguf(path, ids)
    scale = theirs.abs().max().item()
    assert scale > 1  # the random blocks make a model that does something
    assert max_diff(ours(path, ids), theirs) < 1e-5 * scale  # logits of hundreds: relative


# --- round trip: HF folder -> GGUF F32 -> our reader -------------------------------------


@pytest.mark.parametrize("kind,extra", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("mistral", {"sliding_window": 4}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
])
def test_round_trip_is_exact(tiny_model_dir, tmp_path, kind, extra):
    folder = make_folder(tiny_model_dir, tmp_path / "hf", kind, **extra)
    path = write_gguf(folder, tmp_path / "out.gguf", "F32")
    gguf = GGUFFile(path)
    config = gguf.config()
    assert config.model_type == kind
    assert config.tie_word_embeddings == extra.get("tie_word_embeddings", False)
    assert config.sliding_window == extra.get("sliding_window")
    assert ("output.weight" in gguf.tensor_names) != config.tie_word_embeddings
    state = gguf.state_dict(config, torch.float32)
    want = {k: v for k, v in read_state_dict(folder).items()
            if not (config.tie_word_embeddings and k == "lm_head.weight")}
    assert state.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(state[k], v.float()), k  # F32: bit for bit, q/k rows included
    ids = token_ids(folder)
    assert max_diff(ours(path, ids), hf_folder(folder, ids)) < 1e-4


def test_interrupted_write_leaves_nothing(folders, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(folders("llama"), tmp_path / "x.gguf", "F16")
    assert list(tmp_path.iterdir()) == []


# --- tokenizer ----------------------------------------------------------------------------


def _trained_folder(tmp_path, pre) -> object:
    """A tokenizer.json with `pre` as pre-tokenizer, trained on conftest's text."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT * 20 + ["12345 678 90\n"] * 20, trainer=trainer)
    tmp_path.mkdir()
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def _split(regex):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_KINDS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "qwen2": lambda: _split(QWEN2_SPLIT),
    "llama-bpe": lambda: _split(LLAMA3_SPLIT),
}


@pytest.mark.parametrize("pre", PRE_KINDS)
def test_gguf_tokenizer_encodes_like_tokenizer_json_and_transformers(tiny_model_dir, tmp_path, pre):
    folder = make_folder(tiny_model_dir, tmp_path / "m", "llama")
    trained = _trained_folder(tmp_path / "t", PRE_KINDS[pre]())
    shutil.copy(trained / "tokenizer.json", folder / "tokenizer.json")
    path = write_gguf(folder, tmp_path / "m.gguf", "F16")
    assert GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    mine, want = Tokenizer(path), Tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in SAMPLES:
        assert (mine.tok.pre_tokenizer.pre_tokenize_str(text)
                == want.tok.pre_tokenizer.pre_tokenize_str(text)), (pre, text)
        ids = want.encode(text)
        assert mine.encode(text) == ids, (pre, text)
        assert mine.decode(ids, skip_special_tokens=False) == text
        if pre != "smollm":  # transformers gives smollm plain GPT-2 splitting (no Digits)
            assert theirs(text, add_special_tokens=False)["input_ids"] == ids, (pre, text)
    assert mine.tok.token_to_id("<|end|>") == want.tok.token_to_id("<|end|>")
    assert mine.decode(mine.encode("<|user|>x<|end|>")) == "x"  # control tokens are special


def test_gguf_tokenizer_metadata_comes_through(folders, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(folders("llama"), folder)
    want = Tokenizer(folder)
    eos, extra = (want.tok.token_to_id(t) for t in ("<|endoftext|>", "<|pad|>"))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, extra]}))
    want = Tokenizer(folder)
    path = write_gguf(folder, tmp_path / "m.gguf", "F16")
    mine = Tokenizer(path)
    assert mine.chat_template == want.chat_template == CHAT_TEMPLATE
    assert mine.eos_token == want.eos_token == "<|endoftext|>"
    # eos, generation_config's other stop id (as GGUF's eot), the template's <|end|>
    assert mine.eos_ids == want.eos_ids == sorted([eos, extra, want.tok.token_to_id("<|end|>")])
    assert mine.vocab_size == want.vocab_size
    msgs = [{"role": "user", "content": "hi"}]
    assert mine.apply_chat_template(msgs) == want.apply_chat_template(msgs)


def test_add_bos_token_comes_through(folders, tmp_path):
    """A tokenizer that prepends BOS (its post-processor) -> add_bos_token in the GGUF -> the
    GGUF tokenizer prepends it too, once."""
    folder = tmp_path / "m"
    shutil.copytree(folders("llama"), folder)
    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    bos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|endoftext|>"}))
    path = write_gguf(folder, tmp_path / "m.gguf", "F16")
    assert GGUFReader(path).fields["tokenizer.ggml.add_bos_token"].contents() is True
    mine, want = Tokenizer(path), Tokenizer(folder)
    assert mine.bos_token == want.bos_token == "<|endoftext|>"
    for text in SAMPLES:
        assert mine.encode(text) == want.encode(text) == [bos, *want.encode(text, False)]


# --- loading paths and errors -------------------------------------------------------------


def test_folder_with_one_gguf_loads_and_generates(folders, tmp_path, capsys):
    folder = folders("llama")
    (tmp_path / "only").mkdir()
    path = write_gguf(folder, tmp_path / "only" / "m.gguf", "F32")
    from tokenlean.lm import load

    lm = load(str(tmp_path / "only"), device="cpu", dtype="fp32")
    assert lm.folder == path
    ref = load(str(folder), device="cpu", dtype="fp32")
    assert lm.generate("def f(", 8).token_ids == ref.generate("def f(", 8).token_ids
    rc, out, err = run_cli(capsys, "generate", "--model", path, "--device", "cpu",
                           "--prompt", "def f(", "-n", 4, "--json")
    assert rc == 0, err
    assert json.loads(out)["token_ids"] == ref.generate("def f(", 4).token_ids


def test_bench_peer_loads_a_gguf(folders, tmp_path):
    from tokenlean.bench.peers import load_causal_lm

    path = write_gguf(folders("llama"), tmp_path / "m.gguf", "F32")
    model = load_causal_lm(path, torch.device("cpu"), torch.float32)
    ids = token_ids(folders("llama"))
    with torch.no_grad():
        assert max_diff(model(ids).logits[0], ours(path, ids)) < 1e-4


def _bad_type(monkeypatch):
    add = gguf_write._add

    def iq_add(w, name, x, qtype):
        if name != "blk.0.ffn_up.weight":
            return add(w, name, x, qtype)
        block, size = GGML_QUANT_SIZES[Q.IQ2_XXS]
        w.add_tensor(name, np.zeros((x.shape[0], 256 // block * size), np.uint8),
                     raw_dtype=Q.IQ2_XXS)

    monkeypatch.setattr(gguf_write, "_add", iq_add)


def _bad_pre(monkeypatch):
    monkeypatch.setattr(gguf_write, "_pre_tokenizer", lambda tok_json: "made-up")


def _sentencepiece(monkeypatch):
    monkeypatch.setattr(GGUFWriter, "add_tokenizer_model",
                        lambda self, model: self.add_string("tokenizer.ggml.model", "llama"))


@pytest.mark.parametrize("break_it,fragments", [
    (_bad_type, ("unsupported tensor type IQ2_XXS", "supported: F32, F16", "Q6_K")),
    (_bad_pre, ("unsupported GGUF pre-tokenizer 'made-up'",
                "supported: default, gpt-2, gpt2, smollm")),
    (_sentencepiece, ("unsupported GGUF tokenizer model 'llama'", "supported: gpt2")),
])
def test_unsupported_contents_are_one_line_errors(folders, tiny_model_dir, tmp_path, monkeypatch,
                                                  capsys, break_it, fragments):
    folder = folders("llama")
    if break_it is _bad_type:  # IQ2_XXS blocks hold 256 values: a layer 256 wide
        folder = make_folder(tiny_model_dir, tmp_path / "wide", "llama", hidden_size=256,
                             intermediate_size=256, num_hidden_layers=1)
    break_it(monkeypatch)
    path = write_gguf(folder, tmp_path / "bad.gguf", "F32")
    monkeypatch.undo()
    with pytest.raises(UserError) as e:
        from tokenlean.lm import load

        load(str(path), device="cpu")
    assert len(str(e.value).splitlines()) == 1
    rc, out, err = run_cli(capsys, "generate", "--model", path, "--device", "cpu", "-p", "x")
    assert_user_error(rc, out, err, str(path), *fragments)


def test_unsupported_architecture(tmp_path, capsys):
    path = tmp_path / "phi.gguf"
    writer = GGUFWriter(path, "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    rc, out, err = run_cli(capsys, "generate", "--model", path, "-p", "x")
    assert_user_error(rc, out, err, "unsupported GGUF architecture 'phi3'",
                          "supported: llama, mistral, qwen2, qwen3")


def test_not_gguf_truncated_and_two_ggufs(folders, tmp_path, capsys):
    (tmp_path / "text.gguf").write_text("hello")
    rc, out, err = run_cli(capsys, "generate", "--model", tmp_path / "text.gguf", "-p", "x")
    assert_user_error(rc, out, err, "not a GGUF file or truncated", "magic")

    good = write_gguf(folders("llama"), tmp_path / "good.gguf", "F32").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[: len(good) // 2])
    rc, out, err = run_cli(capsys, "generate", "--model", tmp_path / "cut.gguf", "-p", "x")
    assert_user_error(rc, out, err, "not a GGUF file or truncated")

    rc, out, err = run_cli(capsys, "generate", "--model", tmp_path, "-p", "x")
    assert_user_error(rc, out, err, "several .gguf files", "cut.gguf", "good.gguf", "text.gguf")


def test_bad_gguf_subprocess_exit_code(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\x00" * 7)
    proc = subprocess.run([sys.executable, "-m", "tokenlean.cli", "generate", "--model",
                           str(tmp_path / "x.gguf"), "-p", "x"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("tokenlean: error: cannot read ")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# --- chat templates and end-of-turn stops -------------------------------------------------


def _tokenizer_folder(tiny_model_dir, folder, template_in_config=True):
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, folder / name)
    if not template_in_config:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        del config["chat_template"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_chat_template_sources(tiny_model_dir, tmp_path):
    config_only = _tokenizer_folder(tiny_model_dir, tmp_path / "a")
    assert Tokenizer(config_only).chat_template == CHAT_TEMPLATE
    jinja = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    only = _tokenizer_folder(tiny_model_dir, tmp_path / "b", template_in_config=False)
    assert Tokenizer(only).chat_template is None
    (only / "chat_template.jinja").write_text(jinja)
    assert Tokenizer(only).chat_template == jinja
    both = _tokenizer_folder(tiny_model_dir, tmp_path / "c")
    (both / "chat_template.jinja").write_text(jinja)  # the .jinja file wins, as in transformers
    assert Tokenizer(both).apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"


def test_end_of_turn_tokens_in_the_template_are_stop_ids(tiny_model_dir, tmp_path):
    folder = _tokenizer_folder(tiny_model_dir, tmp_path / "a")
    tok = Tokenizer(folder)
    eos, end = (tok.tok.token_to_id(t) for t in ("<|endoftext|>", "<|end|>"))
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_ids == sorted([eos, end])  # <|end|> closes each turn in the template
    assert tok.tok.token_to_id("<|user|>") not in tok.eos_ids  # special, but starts a turn
    other = _tokenizer_folder(tiny_model_dir, tmp_path / "b", template_in_config=False)
    (other / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert Tokenizer(other).eos_ids == [eos]  # not in the template: not a stop


@pytest.fixture(scope="module")
def end_of_turn_folder(tiny_model_dir, tmp_path_factory):
    """The conftest model, changed so greedy chat output reaches <|end|> after a few tokens:
    <|end|>'s head row becomes 3x that of the 3rd token it would have said."""
    from tokenlean.lm import load

    folder = tmp_path_factory.mktemp("eot")
    for path in tiny_model_dir.iterdir():
        shutil.copy(path, folder / path.name)
    lm = load(str(folder), device="cpu", dtype="fp32")
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "def f(x):"}])
    third = lm.generate(prompt, 3, stop_token_ids=[]).token_ids[2]
    state = load_file(str(folder / "model.safetensors"))
    end = lm.tokenizer.tok.token_to_id("<|end|>")
    state["lm_head.weight"][end] = 3 * state["lm_head.weight"][third]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, prompt, end


@pytest.mark.parametrize("as_gguf", [False, True])
def test_generation_stops_at_end_of_turn(end_of_turn_folder, tmp_path, as_gguf):
    from tokenlean.lm import load

    folder, prompt, end = end_of_turn_folder
    path = write_gguf(folder, tmp_path / "m.gguf", "F32") if as_gguf else folder
    lm = load(str(path), device="cpu", dtype="fp32")
    full = lm.generate(prompt, 20, stop_token_ids=[]).token_ids
    assert end in full[1:] and end != lm.tokenizer.tok.token_to_id(lm.tokenizer.eos_token)
    result = lm.generate(prompt, 20)
    assert result.token_ids == full[: full.index(end) + 1]
    assert result.finish_reason == "stop"


def test_chat_completion_stops_at_end_of_turn(end_of_turn_folder):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from tokenlean.lm import load
    from tokenlean.serve.app import create_app

    folder, prompt, end = end_of_turn_folder
    lm = load(str(folder), device="cpu", dtype="fp32")
    full = lm.generate(prompt, 20, stop_token_ids=[]).token_ids
    with TestClient(create_app(lm)) as client:
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "def f(x):"}], "max_tokens": 20,
            "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == full.index(end) + 1
