"""The zoo recipe: deterministic batches, resumable training, export loadable by both engines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenlean.zoo import corpus, recipe
from tokenlean.zoo.recipe import SPECS, ModelSpec


@pytest.fixture
def tiny_recipe(tmp_path, monkeypatch):
    """A tiny spec and a 15-file corpus, with all run state under tmp_path."""
    monkeypatch.setenv("TOKENLEAN_HOME", str(tmp_path / "home"))
    few = corpus.source_files("train")[:15]
    monkeypatch.setattr(recipe, "source_files", lambda split="train": few if split == "train" else corpus.source_files("heldout")[:2])
    spec = ModelSpec("tiny", 32, 64, 1, 2, 1, context=64, steps=4, batch=2, warmup=1, retrieval_fraction=0.5)
    monkeypatch.setitem(SPECS, "tiny", spec)
    return spec


def test_corpus_split_is_disjoint_and_excludes_tests():
    train, heldout = corpus.source_files("train"), corpus.source_files("heldout")
    assert train and heldout and not set(train) & set(heldout)
    root = corpus.stdlib_root()
    for p in train:
        parts = p.relative_to(root).parts
        assert not set(parts[:-1]) & {"test", "tests", "idle_test"} and not p.name.startswith("test_")
    held = {p.relative_to(root).as_posix() for p in heldout}
    assert held <= set(corpus.HELD_OUT)


def test_retrieval_pair_answers_its_question():
    import random

    for style, asked in (("repeat", "{name} ="), ("assert", "assert {name} ==")):
        header, question, answer = corpus.retrieval_pair(random.Random(3), style)
        name, value = header.split(" = ")
        assert question.strip() == asked.format(name=name)
        assert answer.strip() == value.strip()
    with pytest.raises(ValueError):
        corpus.retrieval_pair(random.Random(3), "riddle")


def test_repeat_style_question_restates_the_definition_token_for_token():
    """What makes it learnable by copying: the tokens before the answer occur earlier verbatim."""
    import random

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(recipe.train_tokenizer(recipe.work_dir())))
    rng = random.Random(0)
    for _ in range(50):
        header, question, answer = corpus.retrieval_pair(rng, "repeat")
        doc = tok.encode(header + "x = 1\n" + question + answer).ids
        asked = tok.encode(question.lstrip("\n") + answer).ids
        defined = tok.encode(header.rstrip("\n")).ids
        assert defined == asked and doc[-len(asked):] == asked


def test_batches_are_a_function_of_the_step(tiny_recipe):
    from tokenizers import Tokenizer

    from tokenlean.zoo.train import Batches

    tok_path = recipe.train_tokenizer(recipe.work_dir())
    tok = Tokenizer.from_file(str(tok_path))
    stream = recipe.token_stream("train", tok_path)
    batches = Batches(tiny_recipe, stream, tok, None)
    assert torch.equal(batches(7), batches(7))
    assert not torch.equal(batches(7), batches(8))
    assert batches(7).shape == (2, 65)


def test_interrupted_training_equals_uninterrupted(tiny_recipe, tmp_path, monkeypatch):
    from tokenlean.zoo.train import train

    quiet = lambda *a: None  # noqa: E731
    one = torch.load(train("tiny", threads=1, log=quiet), map_location="cpu")["model"]
    monkeypatch.setenv("TOKENLEAN_HOME", str(tmp_path / "home2"))
    train("tiny", threads=1, log=quiet, stop_at=2)
    two = torch.load(train("tiny", threads=1, log=quiet), map_location="cpu")["model"]
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_a_run_regrouped_midway_with_dropout_resumes_exactly(tiny_recipe, tmp_path, monkeypatch):
    """kv_heads_before: 1 KV head for steps 0-1, then 2 (zoo.regroup), with dropout; a run
    stopped before and at the regrouping and resumed ends with the uninterrupted run's weights."""
    from dataclasses import replace

    from tokenlean.zoo.train import train

    monkeypatch.setitem(SPECS, "tiny", replace(tiny_recipe, num_key_value_heads=2, kv_heads_before=(2, 1),
                                               dropout=0.1))
    said = []
    one = torch.load(train("tiny", threads=1, log=said.append), map_location="cpu")["model"]
    assert "regrouped to 2 KV heads at step 2" in " ".join(said)
    assert one["model.layers.0.self_attn.k_proj.weight"].shape[0] == 2 * 16
    for stops in ((1, 2), (2, 3)):
        monkeypatch.setenv("TOKENLEAN_HOME", str(tmp_path / f"home-{stops[0]}"))
        for stop in stops:
            train("tiny", threads=1, log=said.append, stop_at=stop)
        two = torch.load(train("tiny", threads=1, log=said.append), map_location="cpu")["model"]
        for key in one:
            assert torch.equal(one[key], two[key]), (stops, key)


def test_export_loads_in_tokenlean_and_transformers(tiny_recipe, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenlean.lm import load
    from tokenlean.zoo.build import export
    from tokenlean.zoo.train import train

    train("tiny", threads=1, log=lambda *a: None)
    folder = export("tiny", out=tmp_path / "tiny-model")
    lm = load(str(folder), device="cpu", dtype="fp32")
    ids = lm.tokenizer.encode("def main():\n    return 1\n")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok("def main():\n    return 1\n").input_ids == ids
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits
        ours = lm.model(torch.tensor([ids]))
    assert (expected - ours).abs().max() < 1e-4
    assert np.isfinite(ours.numpy()).all()


def test_zoo_train_command_exports_and_writes_a_card(tiny_recipe, tmp_path, monkeypatch, capsys):
    """`tokenlean zoo train NAME --steps N`: trains, exports into the zoo folder, evaluates the
    card (retrieval only at lengths the model's context holds) and renders its README."""
    import json
    from dataclasses import replace

    import tokenlean.zoo
    import tokenlean.zoo.build
    from tokenlean.cli import main

    monkeypatch.setitem(SPECS, "tiny", replace(tiny_recipe, context=512, batch=1))
    for module in (tokenlean.zoo, tokenlean.zoo.build):
        monkeypatch.setattr(module, "ZOO_DIR", tmp_path / "models")
    assert main(["zoo", "train", "tiny", "--steps", "2", "--threads", "1"]) == 0
    folder = tmp_path / "models" / "tiny"
    card = json.loads((folder / "card.json").read_text())
    assert card["train_steps"] == 2 and card["retrieval_samples"] == 20
    assert 0 <= card["retrieval_512"] <= 1 and "retrieval_1024" not in card
    assert 0 < card["heldout_top1"] < 1 and len(card["samples"]) == 3
    readme = (folder / "README.md").read_text()
    assert "retrieval accuracy @ 512 tokens" in readme and "@ 1024" not in readme
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["retrieval_512"] == card["retrieval_512"]


def test_multi_pair_retrieval_documents_ask_every_definition(tiny_recipe):
    import dataclasses
    import re

    from tokenizers import Tokenizer

    from tokenlean.zoo.train import Batches

    tok_path = recipe.train_tokenizer(recipe.work_dir())
    tok = Tokenizer.from_file(str(tok_path))
    spec = dataclasses.replace(tiny_recipe, context=512)
    batches = Batches(spec, recipe.token_stream("train", tok_path), tok, None)
    text = tok.decode(batches.retrieval(np.random.default_rng(0), 513, count=5, style="assert").tolist())
    defined = dict(re.findall(r"^([A-Z_]+) = (\S+)$", text.split("\n\n\n")[0], re.M))
    asked = dict(re.findall(r"^assert ([A-Z_]+) == (\S+)$", text, re.M))
    assert len(defined) == 5 and asked == defined


def test_scattered_retrieval_asks_every_definition_once_between_code(tiny_recipe):
    import dataclasses
    import re

    from tokenizers import Tokenizer

    from tokenlean.zoo.train import Batches

    tok_path = recipe.train_tokenizer(recipe.work_dir())
    tok = Tokenizer.from_file(str(tok_path))
    spec = dataclasses.replace(tiny_recipe, context=512)
    batches = Batches(spec, recipe.token_stream("train", tok_path), tok, None)
    first_offsets = []
    for seed in range(3):
        row = batches.retrieval(np.random.default_rng(seed), 513, count=5, layout="scattered")
        assert len(row) == 513
        text = tok.decode(row.tolist())
        header = re.match(r"(?:[A-Z_]+ = \S+\n\n){5}", text)
        defined = dict(re.findall(r"^([A-Z_]+) = (\S+)$", header.group(), re.M))
        asked = [m for m in re.finditer(r"\n\n([A-Z_]+) = (\S+)\n", text[header.end():])
                 if m.group(1) in defined]
        assert sorted(m.group(1) for m in asked) == sorted(defined)
        assert all(defined[m.group(1)] == m.group(2) for m in asked)
        # code between the questions (in a block they follow one another)
        assert sum(b.start() > a.end() for a, b in zip(asked, asked[1:])) >= 3
        first_offsets.append(asked[0].start() / len(text))
    # spread through the row, not gathered at its end
    assert min(first_offsets) < 0.5


def test_a_curriculum_stage_changes_batches_only_from_its_first_step(tiny_recipe):
    import dataclasses

    from tokenizers import Tokenizer

    from tokenlean.zoo.train import Batches

    tok_path = recipe.train_tokenizer(recipe.work_dir())
    tok = Tokenizer.from_file(str(tok_path))
    stream = recipe.token_stream("train", tok_path)
    base = dataclasses.replace(tiny_recipe, context=256, retrieval_fraction=0.0)
    staged = dataclasses.replace(base, stages=((3, {"retrieval_fraction": 1.0, "retrieval_pairs": 4, "retrieval_style": "assert"}),))
    assert staged.at(2).retrieval_fraction == 0.0 and staged.at(3).retrieval_pairs == 4
    plain, curriculum = Batches(base, stream, tok, None), Batches(staged, stream, tok, None)
    for step in range(3):
        assert torch.equal(plain(step), curriculum(step))
    text = tok.decode(curriculum(3)[0].tolist())
    assert text.count("assert ") >= 4 and not torch.equal(plain(3), curriculum(3))


def test_copy_rows_repeat_a_span_verbatim(tiny_recipe):
    from tokenizers import Tokenizer

    from tokenlean.zoo.train import Batches

    tok_path = recipe.train_tokenizer(recipe.work_dir())
    tok = Tokenizer.from_file(str(tok_path))
    batches = Batches(tiny_recipe, recipe.token_stream("train", tok_path), tok, None)
    for seed in range(5):
        for repeats in (2, 4):
            row = batches.copy(np.random.default_rng(seed), 1025, repeats)
            assert len(row) == 1025
            span = row[:32]  # the span is at least 32 tokens long and starts the row
            later = [i for i in range(32, len(row) - 31) if (row[i : i + 32] == span).all()]
            assert len(later) >= repeats - 1, "the opening span does not recur often enough"


def test_random_copy_rows_repeat_random_spans(tiny_recipe):
    """copy_source="random": spans of random non-special tokens, each recurring `repeats` times."""
    from tokenizers import Tokenizer

    from tokenlean.zoo.train import Batches

    tok_path = recipe.train_tokenizer(recipe.work_dir())
    tok = Tokenizer.from_file(str(tok_path))
    batches = Batches(tiny_recipe, recipe.token_stream("train", tok_path), tok, None)
    for seed in range(5):
        row = batches.copy(np.random.default_rng(seed), 1025, 3, source="random")
        assert len(row) == 1025
        # every 8-gram that first occurs in the first half recurs in full twice more, as long
        # as the row holds it: count 8-grams occurring >= 3 times
        grams = {}
        for i in range(len(row) - 8):
            grams.setdefault(tuple(row[i : i + 8]), []).append(i)
        thrice = [g for g, at in grams.items() if len(at) >= 3]
        assert len(thrice) >= 20, len(thrice)
        assert min(min(g) for g in thrice) >= len(recipe.SPECIAL_TOKENS)  # spans: no specials
        # "ngram": the spans draw on 16 tokens only, so single tokens recur and are ambiguous
        # (the code between spans replaced by token 0 here, to count the spans' tokens alone)
        blank = Batches(tiny_recipe, np.zeros(4096, dtype=np.uint16), tok, None)
        letters = set(blank.copy(np.random.default_rng(seed), 1025, 3, source="ngram").tolist()) - {0}
        assert 4 <= len(letters) <= 16
        assert len(set(blank.copy(np.random.default_rng(seed), 1025, 3, source="random").tolist())) > 100
    # the source changes the rows; the default stays the code span
    a = batches.copy(np.random.default_rng(0), 1025, 3)
    b = batches.copy(np.random.default_rng(0), 1025, 3, source="random")
    assert not np.array_equal(a, b)


def test_value_copy_rows_repeat_retrieval_style_values(tiny_recipe):
    """copy_source="values": spans of retrieval-style values (5-digit numbers, quoted
    strings), each recurring `repeats` times with code between; an unknown source is refused."""
    import re

    from tokenizers import Tokenizer

    from tokenlean.zoo.train import Batches

    tok_path = recipe.train_tokenizer(recipe.work_dir())
    tok = Tokenizer.from_file(str(tok_path))
    blank = Batches(tiny_recipe, np.zeros(4096, dtype=np.uint16), tok, None)  # code -> token 0
    for seed in range(5):
        row = blank.copy(np.random.default_rng(seed), 1025, 3, source="values")
        assert len(row) == 1025
        spans = [tok.decode(run.tolist()) for run in np.split(row, np.flatnonzero(row == 0)) if len(run) > 1]
        spans = [s for s in spans if s.strip()]
        for text in spans[:-1]:  # the row's last span may be cut short
            assert re.fullmatch(r"( (\d{5}|'[a-z0-9]{6}')){2,8}", text), text
        firsts = spans[:-1:3]
        assert firsts and all(spans[3 * i : 3 * i + 3] == [f] * 3 for i, f in enumerate(firsts[:-1]))
    with pytest.raises(ValueError, match="copy source"):
        blank.copy(np.random.default_rng(0), 1025, 3, source="riddles")


def test_residual_dropout_acts_only_while_training(tiny_recipe):
    from dataclasses import replace

    from tokenlean.zoo.train import new_model

    x = torch.randint(0, 8192, (1, 16))
    plain, dropped = new_model(tiny_recipe), new_model(replace(tiny_recipe, dropout=0.5))
    assert torch.equal(plain(x), plain(x))  # no dropout by default, even in train mode
    assert not torch.equal(dropped(x), dropped(x))
    dropped.eval()
    assert torch.equal(dropped(x), dropped(x)) and torch.allclose(dropped(x), plain.eval()(x))


def test_a_stage_turns_dropout_on_and_a_resumed_run_follows_it(tiny_recipe, tmp_path, monkeypatch):
    """stages=((2, {"dropout": 0.5}),): no dropout for steps 0-1, then dropout; the weights
    differ from a run without the stage, and a run stopped at step 2 and resumed matches."""
    from dataclasses import replace

    from tokenlean.zoo.train import new_model, train

    staged = replace(tiny_recipe, stages=((2, {"dropout": 0.5}),))
    model, x = new_model(staged), torch.randint(0, 8192, (1, 16))
    assert model.residual_dropout == 0.0 and torch.equal(model(x), model(x))
    model.residual_dropout = staged.at(2).dropout
    assert not torch.equal(model(x), model(x))

    def weights(spec, home, stops=()):
        monkeypatch.setenv("TOKENLEAN_HOME", str(tmp_path / home))
        monkeypatch.setitem(SPECS, "tiny", spec)
        for stop in stops:
            train("tiny", threads=1, log=lambda _: None, stop_at=stop)
        return torch.load(train("tiny", threads=1, log=lambda _: None), map_location="cpu")["model"]

    plain, one, two = (weights(tiny_recipe, "plain"), weights(staged, "one"),
                       weights(staged, "two", stops=(2,)))
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(plain[key], one[key])
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_copy_probability_tells_a_copier_from_a_guesser(tiny_recipe):
    """The card's induction check: a model that copies the token 232 positions back (where
    the span's first occurrence is) scores ~1; a uniform guesser scores 1/vocab."""
    from types import SimpleNamespace

    from tokenlean.zoo.build import copy_probability

    recipe.train_tokenizer(recipe.work_dir())
    vocab, back = 8192, 32 + 200

    def copier(x):  # row i predicts x[i + 1] from what stood `back` positions before it
        logits = torch.zeros(1, x.shape[1], vocab)
        for i in range(x.shape[1]):
            if i + 1 - back >= 0:
                logits[0, i, x[0, i + 1 - back]] = 50.0
        return logits

    def guesser(x):
        return torch.zeros(1, x.shape[1], vocab)

    config = SimpleNamespace(vocab_size=vocab)
    assert copy_probability(SimpleNamespace(model=_Model(copier, config)), samples=3) > 0.99
    guessed = copy_probability(SimpleNamespace(model=_Model(guesser, config)), samples=3)
    assert abs(guessed - 1 / vocab) < 1e-6


def test_card_measures_memorisation_on_the_training_split(tiny_recipe):
    """next_token_metrics scores a window exactly (an oracle that reads the next token gets
    top-1 1 and loss ~0, a uniform guesser loss log(vocab)); the card reports the training
    split beside the held-out figures."""
    import math
    from types import SimpleNamespace

    from tokenlean.zoo.build import card_markdown, next_token_metrics, train_split_metrics

    recipe.train_tokenizer(recipe.work_dir())
    vocab, stream = 64, np.arange(200) % 64

    def oracle(x):  # row i puts all its weight on x[i + 1], which is (x[i] + 1) % vocab here
        return 50.0 * torch.nn.functional.one_hot((x + 1) % vocab, vocab).float()

    config = SimpleNamespace(vocab_size=vocab)
    loss, top1, count = next_token_metrics(SimpleNamespace(model=_Model(oracle, config)), stream, 16, [0, 50, 100])
    assert top1 == 1.0 and loss < 1e-6 and count == 48
    loss, top1, _ = next_token_metrics(SimpleNamespace(model=_Model(lambda x: torch.zeros(1, x.shape[1], vocab), config)),
                                       stream, 16, [0])
    assert abs(loss - math.log(vocab)) < 1e-5

    big = SimpleNamespace(model=_Model(lambda x: torch.zeros(1, x.shape[1], 8192), SimpleNamespace(vocab_size=8192)))
    figures = train_split_metrics(big, 32, windows=2)
    assert figures["train_split_tokens"] == 64 and figures["train_split_top1"] < 0.5
    card = {"name": "tiny", "parameters": 1e6, "context": 32, "vocab_size": 8192, "machine": "cpu",
            "heldout_loss": 3.0, "heldout_perplexity": 20.1, "heldout_tokens": 10, "heldout_top1": 0.4,
            "retrieval_samples": 1, "samples": [], **{f"retrieval_{n}": 0.5 for n in (512, 1024, 2048)},
            **figures}
    assert "training-split loss / top-1" in card_markdown(card, tiny_recipe)


class _Model:
    """Stands in for a Transformer: logits from a function of the token ids."""

    def __init__(self, fn, config):
        self.fn, self.config = fn, config

    def __call__(self, x):
        return self.fn(x)


def _gqa_model(kv: int, seed: int = 0):
    from tokenlean.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 48, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": kv,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    model = Transformer(ModelConfig.from_hf(config))
    for p in model.parameters():  # random weights everywhere, so every head matters
        torch.nn.init.normal_(p, std=0.3)
    return model


def test_regrouping_kv_heads_keeps_every_head_that_keeps_its_keys_and_values():
    from tokenlean.zoo.regroup import changed_heads, head_layout, regroup

    assert head_layout(6, 2, 3) == ([0, 1, 3, 4, 2, 5], [0, 1, 0])
    assert head_layout(6, 2, 6) == ([0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 1, 1])
    assert changed_heads(6, 2, 3) == [5] and changed_heads(6, 2, 6) == []
    with pytest.raises(ValueError, match="regroup"):
        head_layout(6, 2, 4)

    x = torch.randint(0, 64, (1, 12))
    old = _gqa_model(2)
    names = [name for name, _ in old.named_parameters()]
    opt = torch.optim.AdamW(old.parameters())
    old(x).sum().backward()
    opt.step()
    for new_kv in (3, 6):
        for head in changed_heads(6, 2, new_kv):  # silence the heads whose input changes
            for layer in old.model.layers:
                layer.self_attn.o_proj.weight.data[:, head * 8 : (head + 1) * 8] = 0
        state, moments = regroup(old.state_dict(), opt.state_dict(), names, 6, 8, 2, new_kv)
        new = _gqa_model(new_kv, seed=1)
        new.load_state_dict(state)
        assert torch.allclose(new(x), old(x), atol=1e-5)
        new_opt = torch.optim.AdamW(new.parameters())
        new_opt.load_state_dict(moments)  # shapes fit the new layout
        k = names.index("model.layers.0.self_attn.k_proj.weight")
        assert new_opt.state_dict()["state"][k]["exp_avg"].shape == (new_kv * 8, 48)
    # regrouping changes the function of the mixed group's other head when it is not silenced
    fresh = _gqa_model(2)
    state, _ = regroup(fresh.state_dict(), None, names, 6, 8, 2, 3)
    new = _gqa_model(3, seed=1)
    new.load_state_dict(state)
    assert not torch.allclose(new(x), fresh(x), atol=1e-3)


@pytest.mark.parametrize("name", ["tl-code", "tl-code-draft"])
@torch.no_grad()
def test_shipped_models_load_in_transformers_as_in_tokenlean(name):
    """The peers run on the very folders we ship: same token ids, same logits (fp32)."""
    transformers = pytest.importorskip("transformers")
    from tokenlean.lm import load
    from tokenlean.zoo import zoo_path

    folder = zoo_path(name)
    if folder is None:
        pytest.skip(f"{name} is not shipped in this checkout")
    text = "import os\n\n\ndef list_python_files(root):\n    for entry in os.scandir(root):"
    ours = load(str(folder), device="cpu", dtype="fp32")
    ids = ours.encode(text)
    assert transformers.AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    diff = (ours.model(x)[0] - hf(x).logits[0]).abs().max().item()
    assert diff < 1e-3, f"{name}: max abs logit diff {diff:.2e}"
