"""Decode-loop invariants on a tiny random Llama: greedy = argmax loop, stops, streaming."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenlean.engine.text import StopStrings
from tokenlean.errors import UserError
from tokenlean.model.tokenizer import Tokenizer
from tokenlean.sampling import SamplingParams

PROMPT = "def f(x):\n"
NO_STOP: list[int] = []  # stop_token_ids=[]: EOS does not end generation


def argmax_loop(model, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding without a cache: the whole sequence re-run every step."""
    ids = list(ids)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


@pytest.fixture(scope="module")
def reference(tiny_lm):
    """Greedy, 20 tokens, EOS ignored."""
    return tiny_lm.generate(PROMPT, 20, stop_token_ids=NO_STOP)


# --- greedy ---------------------------------------------------------------------------------


def test_greedy_equals_argmax_loop_without_cache(tiny_lm, reference):
    prompt_ids = tiny_lm.encode(PROMPT)
    assert reference.token_ids == argmax_loop(tiny_lm.model, prompt_ids, 20)
    assert len(set(reference.token_ids)) > 3  # the tiny model does not collapse to one token
    assert reference.prompt_tokens == len(prompt_ids)
    assert reference.completion_tokens == 20
    assert reference.finish_reason == "length"


def test_greedy_is_deterministic(tiny_lm, reference):
    again = tiny_lm.generate(PROMPT, 20, stop_token_ids=NO_STOP)
    assert again.token_ids == reference.token_ids
    assert again.text == reference.text


def test_token_ids_prompt_equals_text_prompt(tiny_lm, reference):
    result = tiny_lm.generate(tiny_lm.encode(PROMPT), 20, stop_token_ids=NO_STOP)
    assert result.token_ids == reference.token_ids


def test_text_is_decode_of_tokens(tiny_lm, reference):
    assert reference.text == tiny_lm.tokenizer.decode(reference.token_ids)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_new_tokens_respected(tiny_lm, reference, n):
    result = tiny_lm.generate(PROMPT, n, stop_token_ids=NO_STOP)
    assert result.completion_tokens == len(result.token_ids) == n
    assert result.token_ids == reference.token_ids[:n]
    assert result.finish_reason == "length"
    assert result.stats["steps"] == n


def test_generation_stops_at_the_end_of_the_context(tiny_lm):
    context = tiny_lm.context
    prompt = [tiny_lm.tokenizer.encode("x")[0]] * (context - 3)
    result = tiny_lm.generate(prompt, 50, stop_token_ids=NO_STOP)
    assert result.completion_tokens == 3
    assert result.finish_reason == "length"
    one_left = tiny_lm.generate([prompt[0]] * (context - 1), 50, stop_token_ids=NO_STOP)
    assert one_left.completion_tokens == 1


# --- stops ----------------------------------------------------------------------------------


def test_stop_token_id_ends_generation(tiny_lm, reference):
    ref = reference.token_ids
    k = 5
    stop_id = ref[k]
    first = ref.index(stop_id)  # the token may appear earlier than k
    result = tiny_lm.generate(PROMPT, 20, stop_token_ids=[stop_id])
    assert result.token_ids == ref[: first + 1]  # the stop token is kept in the ids...
    assert result.finish_reason == "stop"
    assert result.text == tiny_lm.tokenizer.decode(ref[:first])  # ...but not in the text


def test_eos_is_a_default_stop_token(tiny_lm, reference):
    tokenizer = tiny_lm.tokenizer
    # the eos, and <|end|>: the chat template ends each turn with it (Tokenizer's docstring)
    assert tokenizer.eos_ids == sorted(tokenizer.tok.token_to_id(t)
                                       for t in ("<|endoftext|>", "<|end|>"))
    # declare the first generated token an EOS: generation ends after one token
    first = reference.token_ids[0]
    tokenizer.eos_ids, saved = [first], tokenizer.eos_ids
    try:
        result = tiny_lm.generate(PROMPT, 20)
    finally:
        tokenizer.eos_ids = saved
    assert result.token_ids == [first]
    assert result.finish_reason == "stop"
    assert result.text == ""


def test_stop_string_cuts_text(tiny_lm, reference):
    text = reference.text
    assert len(text) > 10
    stop = text[6:9]
    cut = text.find(stop)
    result = tiny_lm.generate(PROMPT, 20, stop=[stop], stop_token_ids=NO_STOP)
    assert result.text == text[:cut]
    assert stop not in result.text
    assert result.finish_reason == "stop"
    assert result.token_ids == reference.token_ids[: len(result.token_ids)]
    assert len(result.token_ids) < 20


def test_stop_string_that_never_appears(tiny_lm, reference):
    result = tiny_lm.generate(PROMPT, 20, stop=["\x00never\x00"], stop_token_ids=NO_STOP)
    assert result.text == reference.text
    assert result.finish_reason == "length"


def test_streaming_deltas_concatenate_to_text(tiny_lm, reference):
    stop = reference.text[8:10]
    for kwargs in ({}, {"stop": [stop]}):
        generation = tiny_lm.stream(PROMPT, 20, stop_token_ids=NO_STOP, **kwargs)
        assert generation.result is None
        deltas = list(generation)
        assert all(deltas)  # no empty deltas
        assert "".join(deltas) == generation.result.text
        if kwargs:
            assert stop not in "".join(deltas)


def feed_all(stops: list[str], deltas: list[str]) -> tuple[str, bool, list[str]]:
    """Drive StopStrings like the decode loop does: (emitted text, hit, emitted prefixes)."""
    s = StopStrings(stops)
    emitted, prefixes = "", []
    for d in deltas:
        out, hit = s.feed(d)
        emitted += out
        prefixes.append(emitted)
        if hit:
            return emitted, True, prefixes
    emitted += s.flush()
    return emitted, False, prefixes


def cut_at_first_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The reference: generation ends as soon as a stop string is complete (the earliest end);
    of the stop strings ending there, the longest one is cut."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return text[: min(starts)], True
    return text, False


def test_stop_strings_split_across_deltas():
    emitted, hit, prefixes = feed_all(["STOP"], ["abc S", "T", "OP", "def"])
    assert (emitted, hit) == ("abc ", True)
    assert prefixes == ["abc ", "abc ", "abc "]  # "S", "ST", "STO" were held back
    # a held-back partial match that turns out not to be a stop is released
    emitted, hit, prefixes = feed_all(["STOP"], ["abc S", "T", "x", "y"])
    assert (emitted, hit) == ("abc STxy", False)
    assert prefixes == ["abc ", "abc ", "abc STx", "abc STxy"]


def test_stop_string_inside_a_longer_one_ends_at_the_earliest_end():
    """Stop strings "abcd" and "bc": "bc" is complete first, whatever the deltas."""
    for deltas in (["abcd"], ["ab", "cd"], ["abc", "d"], list("abcd")):
        assert feed_all(["abcd", "bc"], ["x", *deltas])[:2] == ("xa", True), deltas


def test_empty_stop_strings_are_ignored():
    assert feed_all(["", "zz"], ["abc", "def"])[:2] == ("abcdef", False)


@st.composite
def text_and_deltas(draw):
    alphabet = st.sampled_from("abcS\u00e9\u65e5")  # small alphabet: frequent matches
    text = draw(st.text(alphabet, max_size=30))
    stops = draw(st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    return text, stops, deltas


@given(text_and_deltas())
@settings(max_examples=200, deadline=None)
def test_stop_strings_streaming_property(case):
    text, stops, deltas = case
    expected, expected_hit = cut_at_first_stop(text, stops)
    emitted, hit, prefixes = feed_all(stops, deltas)
    assert emitted == expected
    assert hit == expected_hit
    # streaming never takes text back: every emitted prefix is a prefix of the final text,
    # so no part of a stop string that ends the generation is ever emitted
    assert all(expected.startswith(p) for p in prefixes)


# --- incremental detokenization ------------------------------------------------------------

MULTIBYTE = "café résumé: 日本語のテキスト 🙂🚀 élève 👍 東京"


def test_incremental_detokenizer_on_multibyte_text(tiny_lm):
    tokenizer = tiny_lm.tokenizer
    ids = tokenizer.encode(MULTIBYTE)
    # the tokenizer really splits some characters across tokens
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = tokenizer.detokenizer()
    deltas = [detok.push([i]) for i in ids]
    tail = detok.flush()
    assert tail == ""
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == MULTIBYTE


@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
@settings(max_examples=100, deadline=None)
def test_incremental_detokenizer_roundtrips_any_text(tiny_lm, text):
    tokenizer = tiny_lm.tokenizer
    ids = tokenizer.encode(text)
    detok = tokenizer.detokenizer()
    deltas = [detok.push([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_incremental_detokenizer_matches_decode_on_any_ids(tiny_lm, data):
    """Random ids (invalid UTF-8, special tokens): the deltas still add up to `decode`."""
    tokenizer = tiny_lm.tokenizer
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=20))
    chunks = data.draw(st.lists(st.integers(1, 3), min_size=len(ids), max_size=len(ids)))
    detok = tokenizer.detokenizer()
    out, i = "", 0
    for n in chunks:
        if i >= len(ids):
            break
        out += detok.push(ids[i : i + n])
        i += n
    assert out + detok.flush() == tokenizer.decode(ids)


# --- bad input ------------------------------------------------------------------------------


def test_empty_prompt_raises(tiny_lm):
    with pytest.raises(UserError, match="empty"):
        tiny_lm.generate("", 5)
    with pytest.raises(UserError, match="empty"):
        tiny_lm.generate([], 5)


def test_prompt_filling_the_context_raises(tiny_lm):
    x = tiny_lm.tokenizer.encode("x")[0]
    for n in (tiny_lm.context, tiny_lm.context + 50):
        with pytest.raises(UserError, match="context"):
            tiny_lm.generate([x] * n, 5)
    long_text = "x " * 200
    assert len(tiny_lm.encode(long_text)) > tiny_lm.context
    with pytest.raises(UserError, match="context"):
        tiny_lm.generate(long_text, 5)


@pytest.mark.parametrize("n", [0, -1])
def test_non_positive_max_new_tokens_raises(tiny_lm, n):
    with pytest.raises(UserError, match="max_new_tokens"):
        tiny_lm.generate(PROMPT, n)


# --- sampling -------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(tiny_lm):
    def run(seed):
        params = SamplingParams(temperature=1.0, seed=seed)
        return tiny_lm.generate(PROMPT, 12, sampling=params, stop_token_ids=NO_STOP)

    a, b = run(7), run(7)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.stats["sampling"] == "sample"
    others = [run(seed).token_ids for seed in (8, 9, 10)]
    assert any(o != a.token_ids for o in others)


def test_top_k_one_sampling_is_greedy(tiny_lm, reference):
    params = SamplingParams(temperature=1.0, top_k=1, seed=3)
    result = tiny_lm.generate(PROMPT, 20, sampling=params, stop_token_ids=NO_STOP)
    assert result.token_ids == reference.token_ids


# --- chat template --------------------------------------------------------------------------


def test_chat_template_renders_messages(tiny_lm):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "é?"}]
    rendered = tiny_lm.tokenizer.apply_chat_template(messages)
    assert rendered == ("<|user|>\nhi<|end|>\n<|assistant|>\nyo<|end|>\n"
                        "<|user|>\né?<|end|>\n<|assistant|>\n")
    no_prompt = tiny_lm.tokenizer.apply_chat_template(messages[:1], add_generation_prompt=False)
    assert no_prompt == "<|user|>\nhi<|end|>\n"
    # the role markers are single special tokens
    ids = tiny_lm.tokenizer.encode(rendered)
    assert tiny_lm.tokenizer.tok.token_to_id("<|assistant|>") in ids
    result = tiny_lm.generate(rendered, 3, stop_token_ids=NO_STOP)
    assert result.completion_tokens == 3


def test_chat_template_errors_are_user_errors(tiny_model_dir, tmp_path):
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    tokenizer = Tokenizer(tmp_path)
    tokenizer.chat_template = "{{ raise_exception('only user messages') }}"
    with pytest.raises(UserError, match="only user messages"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
