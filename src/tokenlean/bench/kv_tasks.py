"""Tasks of `tokenlean bench kv`: RULER-style synthetic long-context samples, deterministic.

RULER ("RULER: What's the Real Context Size of Your Long-Context Language Models?",
arXiv 2404.06654) and needle threading ("Needle Threading", arXiv 2411.05000), written
here from their task descriptions. Every sample is a context (prefilled, and compressed,
first) and a question (fed afterwards on the compressed cache, kvpress's protocol),
both token ids, tokenized separately so that the split between them is exact:

- `niah_single`: one needle "the special magic number for <key> is <7 digits>" in a
  haystack; asked for it.
- `niah_multikey`: four needles with different keys; asked for one.
- `niah_multivalue`: four needles with one key and different numbers; asked for all.
- `vt`: variable tracking, one chain `VAR A = 12345`, `VAR B = VAR A`, ... (4 hops);
  asked which variables hold the value.
- `cwe`: common-words extraction, a numbered list of words where 10 appear many times
  and the others a few; asked for the 10 most common.
- `thread`: a chain of key -> key links scattered through the haystack in random order,
  the last key holding a number; asked to follow it from the first key.
- `passkey`: the pass-key retrieval of Landmark Attention (arXiv 2305.16300), which
  InfLLM reports as Retrieve.PassKey: one 5-digit key in a filler of one sentence line
  repeated ("The grass is green. ..."), so that nothing but the key stands out; asked for it.

Two styles: `text` (RULER's plain-language templates, "Question: ... Answer: ...") and
`code` (the needles as Python assignments `NAME = VALUE` and the question restating
`NAME =`, the retrieval the zoo's code models were trained on). The haystack is the
standard library's docstrings (text) or the installed pip package's source (code: held
out from the zoo's training, as bench/tasks.py's `code` task). Nothing is downloaded.

`ppl` (streaming perplexity, run by bench/kv.py) reads `ppl_stream_ids`: the installed pip
package's source, files concatenated in sorted order.

A sample is sized with the model's tokenizer: context + question + the tokens to
generate = the target length exactly (cwe: within one list entry), RULER's convention.
Sample i of (task, length, seed) does not depend on how many samples are asked for.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import re
from bisect import bisect_left
from dataclasses import asdict, dataclass, field

from tokenlean.errors import UserError
from tokenlean.zoo.corpus import _WORDS as ZOO_NAME_WORDS
from tokenlean.zoo.corpus import read_source, source_files

PPL = "ppl"  # streaming perplexity: not a sample task, run by bench/kv.py
MAX_NEW_TOKENS = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 48, "vt": 32,
                  "cwe": 64, "thread": 24, "passkey": 12}
TASK_NAMES = [*MAX_NEW_TOKENS, PPL]
STYLES = ("text", "code")
HAYSTACK_CHARS = 400_000  # enough filler for several 8K-token samples at distinct offsets


@dataclass
class KVSample:
    """One quality sample: prefill `context_ids`, then feed `question_ids`, then generate;
    the score is the fraction of `answers` found in the generated text. `context_tokens`
    is the target length the sample was sized to (context + question + max_new_tokens)."""

    task: str
    context_ids: list[int]
    question_ids: list[int]
    answers: list[str]
    context_tokens: int
    max_new_tokens: int = 32
    meta: dict = field(default_factory=dict)  # index, seed, style, depths, ...

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> KVSample:
        return cls(**data)

    def digest(self) -> str:
        ids = ",".join(map(str, self.context_ids)) + "|" + ",".join(map(str, self.question_ids))
        return hashlib.sha256(ids.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """What the result JSON records of a sample (its ids only by digest)."""
        return {"task": self.task, "context_tokens": self.context_tokens,
                "prompt_tokens": len(self.context_ids), "question_tokens": len(self.question_ids),
                "max_new_tokens": self.max_new_tokens, "answers": self.answers,
                "sha256_16": self.digest(), **self.meta}


def string_match_all(text: str, answers: list[str]) -> float:
    """RULER's score: the fraction of the expected strings found in the text, any case."""
    if not answers:
        raise ValueError("a sample needs at least one answer")
    low = text.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks is empty; valid: " + ", ".join(TASK_NAMES))
    for name in names:
        if name not in TASK_NAMES:
            raise UserError(f"unknown task {name!r}; valid: {', '.join(TASK_NAMES)}")
    if len(set(names)) != len(names):
        raise UserError(f"--tasks names a task twice: {text}")
    return names


def ppl_stream_ids(tokenizer, length: int) -> tuple[list[int], str]:
    """`length` ids of held-out code: pip's own source (files concatenated, sorted)."""
    from tokenlean.bench.tasks import pip_source_files

    files, root = pip_source_files()
    ids, used = [], 0
    for path in files:
        ids.extend(tokenizer.encode(read_source(path).rstrip() + "\n\n", add_special_tokens=False))
        used += 1
        if len(ids) >= length:
            break
    if len(ids) < length:
        raise UserError(f"pip's source holds only {len(ids)} tokens; --ppl-tokens {length}")
    import pip

    return ids[:length], f"pip {pip.__version__}'s source, its first {used} files (sorted)"


# --- haystacks and words --------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def docstring_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of the standard library's docstrings (doctests and code left out),
    each on one line, in sorted file order, up to HAYSTACK_CHARS characters."""
    out, size = [], 0
    for path in sorted(source_files("train") + source_files("heldout")):
        try:
            tree = ast.parse(read_source(path))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            for para in doc.split("\n\n"):
                if ">>>" in para or "::" in para or re.search(r"\n\s{2,}", para):
                    continue
                line = " ".join(para.split())
                letters = sum(c.isalpha() or c == " " for c in line)
                if len(line) >= 120 and letters >= 0.9 * len(line):
                    out.append(line)
                    size += len(line)
        if size >= HAYSTACK_CHARS:
            break
    return tuple(out)


@functools.lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """Distinct lowercase words (4-10 letters) of the docstrings, sorted."""
    words = set()
    for para in docstring_paragraphs():
        words.update(re.findall(r"\b[a-z]{4,10}\b", para))
    return tuple(sorted(words))


def haystack_text(style: str) -> str:
    if style == "text":
        return "\n".join(docstring_paragraphs()) + "\n"
    from tokenlean.bench.tasks import pip_source_files

    files, _ = pip_source_files()
    parts, size = [], 0
    for path in files:
        source = read_source(path).rstrip() + "\n\n"
        parts.append(source)
        size += len(source)
        if size >= HAYSTACK_CHARS:
            break
    return "".join(parts)


PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There " \
                 "and back again.\n"
FILLER = "filler"  # haystack style prefix: the passkey filler, a comment line in code


def filler_text(style: str) -> str:
    line = PASSKEY_FILLER if style == "text" else "# " + PASSKEY_FILLER
    return line * 64  # Haystack.take wraps around for longer contexts


class Haystack:
    """The filler as token ids, with the offsets where a line starts (needles go there)."""

    def __init__(self, tokenizer, style: str):
        kind, _, base = style.rpartition("-")
        text = filler_text(base) if kind == FILLER else haystack_text(base)
        self.ids = tokenizer.encode(text, add_special_tokens=False)
        self.ends_line = {i for i in set(self.ids) if tokenizer.decode([i]).endswith("\n")}
        self.line_starts = self.starts(self.ids)
        if len(self.line_starts) < 2:
            raise UserError("the haystack has too few lines to place needles in")

    def starts(self, ids: list[int]) -> list[int]:
        """Offsets in `ids` right after a token that ends a line."""
        return [j + 1 for j, i in enumerate(ids[:-1]) if i in self.ends_line]

    def take(self, rng: random.Random, n: int) -> list[int]:
        """n filler ids from a line start chosen by rng (wrapping around)."""
        start = self.line_starts[rng.randrange(len(self.line_starts))]
        out = []
        while len(out) < n:
            out.extend(self.ids[start : start + n - len(out)])
            start = 0
        return out


_haystacks: dict[tuple[int, str], Haystack] = {}


def haystack(tokenizer, style: str) -> Haystack:
    key = (id(tokenizer), style)
    if key not in _haystacks:
        _haystacks[key] = Haystack(tokenizer, style)
    return _haystacks[key]


# --- the pieces of a sample -----------------------------------------------------------

@dataclass
class Framing:
    """How the instruction, the question and the answer's start are wrapped."""

    style: str = "text"
    chat_head: str | None = None  # chat template before the user message's content
    chat_tail: str | None = None  # after it: end of the user turn, the assistant's opened

    @classmethod
    def make(cls, tokenizer, style: str, chat: bool) -> Framing:
        if style not in STYLES:
            raise UserError(f"unknown task style {style!r}; valid: {', '.join(STYLES)}")
        if not chat:
            return cls(style)
        mark = "\x00MESSAGE\x00"
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": mark}])
        head, _, tail = rendered.partition(mark)
        return cls(style, head, tail)

    def prefix_ids(self, tokenizer, instruction: str) -> list[int]:
        if self.chat_head is not None:
            return tokenizer.encode(self.chat_head + instruction, add_special_tokens=False)
        return tokenizer.encode(instruction, add_special_tokens=True)  # BOS, if the model has one

    def question_ids(self, tokenizer, question: str, answer_start: str) -> list[int]:
        if self.chat_tail is not None:
            text = question + self.chat_tail + answer_start
        elif self.style == "text":
            text = f"{question}\nAnswer: {answer_start}"
        else:
            text = question + answer_start
        return tokenizer.encode(text, add_special_tokens=False)


def _place(body: list[int], needles: list[list[int]], depths: list[float],
           line_starts: list[int]) -> list[int]:
    """`body` with each needle inserted at the line start nearest its depth (0..1), in order."""
    points = []
    for d in depths:
        target = d * len(body)
        k = bisect_left(line_starts, target)
        near = [line_starts[i] for i in (k - 1, k) if 0 <= i < len(line_starts)]
        points.append(min(near, key=lambda p: abs(p - target)) if near else int(target))
    out, last = [], 0
    for p, needle in sorted(zip(points, range(len(needles))), key=lambda x: (x[0], x[1])):
        out.extend(body[last:p])
        out.extend(needles[needle])
        last = p
    return out + body[last:]


def _assemble(tokenizer, framing: Framing, hay: Haystack, rng: random.Random, target: int,
              max_new: int, instruction: str, needles: list[str], question: str,
              answer_start: str, depths: list[float] | None = None) -> tuple[list[int], list[int], dict]:
    """(context ids, question ids, meta) with len(context + question) + max_new == target."""
    prefix = framing.prefix_ids(tokenizer, instruction)
    question_ids = framing.question_ids(tokenizer, question, answer_start)
    needle_ids = [tokenizer.encode(n + "\n", add_special_tokens=False) for n in needles]
    n_fill = target - max_new - len(prefix) - len(question_ids) - sum(map(len, needle_ids))
    if n_fill < 16:
        raise UserError(f"a context of {target} tokens is too short for this task "
                        f"({target - n_fill} tokens without any filler)")
    body = hay.take(rng, n_fill)
    if depths is None:
        depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    context = prefix + _place(body, needle_ids, depths, hay.starts(body))
    return context, question_ids, {"depths": [round(d, 3) for d in depths]}


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _keys(rng: random.Random, n: int, style: str) -> list[str]:
    """Text: two words, `word-word`. Code: one or two of the names the zoo's retrieval
    documents use, `WORD` or `WORD_WORD` (other names, and 7-digit values, it never learned
    to retrieve: 0 of 10 at 2048 tokens where these get 3 to 5)."""
    keys = []
    while len(keys) < n:
        if style == "text":
            key = "-".join(rng.sample(word_list(), 2))
        else:
            key = "_".join(rng.sample(ZOO_NAME_WORDS, rng.choice((1, 2)))).upper()
        if key not in keys:
            keys.append(key)
    return keys


def _value(rng: random.Random, style: str) -> str:
    """RULER's 7-digit numbers in text; 5 digits in code, as the zoo's retrieval rows."""
    return _number(rng, 7 if style == "text" else 5)


def _variables(rng: random.Random, n: int) -> list[str]:
    out = []
    while len(out) < n:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in out:
            out.append(name)
    return out


# --- the tasks ------------------------------------------------------------------------

NIAH_TEXT = ("Some special magic numbers are hidden in the text below. Memorize them: you "
             "will be asked about them afterwards.\n\n")
NIAH_CODE = "# Some constants below are asked for at the end of this file.\n\n"


def _niah(kind: str, tokenizer, framing, hay, rng, target, max_new):
    text = framing.style == "text"
    n_keys, n_values = {"single": (1, 1), "multikey": (4, 1), "multivalue": (1, 4)}[kind]
    keys = _keys(rng, n_keys, framing.style)
    values = []
    while len(values) < max(n_keys, n_values):
        v = _value(rng, framing.style)
        if v not in values:
            values.append(v)
    if n_keys > 1:  # several keys, one number each: ask one of them
        pairs = list(zip(keys, values))
        asked = rng.randrange(n_keys)
        key, answers = keys[asked], [values[asked]]
    else:  # one key, one number or several: ask for all
        key, answers = keys[0], values
        pairs = [(key, v) for v in values]
    if text:
        one = "One of the special magic numbers" if n_values > 1 else "The special magic number"
        needles = [f"{one} for {k} is: {v}." for k, v in pairs]
        if n_values > 1:
            question = f"\n\nQuestion: What are all the special magic numbers for {key} " \
                       "mentioned in the text above?"
            start = f"The special magic numbers for {key} mentioned in the text are"
        else:
            question = f"\n\nQuestion: What is the special magic number for {key} mentioned " \
                       "in the text above?"
            start = f"The special magic number for {key} mentioned in the text is"
        instruction = NIAH_TEXT
    else:
        if n_values > 1:
            needles = [f"{key}.append({v})" for _, v in pairs]
            question, start = f"\n\n# every number appended to {key} above:\n", f"{key}_ALL = ["
        else:
            needles = [f"{k} = {v}" for k, v in pairs]
            question, start = "\n\n", f"{key} ="
        instruction = NIAH_CODE
    context, q, meta = _assemble(tokenizer, framing, hay, rng, target, max_new, instruction,
                                 needles, question, start)
    return context, q, answers, meta


def _vt(tokenizer, framing, hay, rng, target, max_new, hops: int = 4):
    names, value = _variables(rng, hops + 1), _number(rng, 5)
    if framing.style == "text":
        needles = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in
                                                   zip(names, names[1:])]
        instruction = ("Memorize and track the chain of variable assignments hidden in the "
                       "text below.\n\n")
        question = f"\n\nQuestion: Find all the variables that are assigned the value {value} " \
                   "in the text above."
        start = (f"According to the chain of variable assignments in the text above, "
                 f"{hops + 1} variables are assigned the value {value}, they are:")
    else:
        needles = [f"{names[0]} = {value}"] + [f"{b} = {a}" for a, b in zip(names, names[1:])]
        instruction = "# Track the chain of assignments below: asked for at the end.\n\n"
        question, start = f"\n\n# every name above whose value is {value}:\n", "NAMES = ["
    context, q, meta = _assemble(tokenizer, framing, hay, rng, target, max_new, instruction,
                                 needles, question, start)
    return context, q, names, meta


def _thread(tokenizer, framing, hay, rng, target, max_new, hops: int = 4):
    keys, value = _keys(rng, hops + 1, framing.style), _value(rng, framing.style)
    if framing.style == "text":
        links = [f"The key {a} leads to the key {b}." for a, b in zip(keys, keys[1:])]
        links.append(f"The key {keys[-1]} holds the number {value}.")
        instruction = ("The text below hides a chain of keys, each leading to another, the "
                       "last one holding a number.\n\n")
        question = f"\n\nQuestion: Start from the key {keys[0]} and follow each key to the one " \
                   "it leads to. Which number does the last key hold?"
        start = f"Following the keys from {keys[0]}, the number reached is"
    else:
        links = [f'{a} = "{b}"' for a, b in zip(keys, keys[1:])]
        links.append(f"{keys[-1]} = {value}")
        instruction = "# A chain of names below, each naming the next one.\n\n"
        question, start = (f"\n\n# from {keys[0]}, follow each name to the next; "
                           "the number at the end:\n", "VALUE =")
    order = list(range(len(links)))
    rng.shuffle(order)  # scattered: the chain is not in reading order
    depths = sorted(rng.uniform(0.05, 0.95) for _ in links)
    placed = [links[i] for i in order]
    context, q, meta = _assemble(tokenizer, framing, hay, rng, target, max_new, instruction,
                                 placed, question, start, depths)
    meta["link_order"] = order
    return context, q, [value], meta


def _passkey(tokenizer, framing, hay, rng, target, max_new):
    hay = haystack(tokenizer, f"{FILLER}-{framing.style}")  # not the task's usual haystack
    value = _value(rng, "code")  # 5 digits, as Landmark Attention's key
    if framing.style == "text":
        needles = [f"The pass key is {value}. Remember it. {value} is the pass key."]
        instruction = ("There is important info hidden inside a lot of irrelevant text. Find "
                       "it and memorize it. I will quiz you about the important information "
                       "there.\n\n")
        question, start = "\n\nWhat is the pass key?", "The pass key is"
    else:
        key = _keys(rng, 1, "code")[0]
        needles = [f"{key} = {value}"]
        instruction, question, start = NIAH_CODE, "\n\n", f"{key} ="
    context, q, meta = _assemble(tokenizer, framing, hay, rng, target, max_new, instruction,
                                 needles, question, start)
    return context, q, [value], meta


def _cwe(tokenizer, framing, hay, rng, target, max_new, n_common: int = 10):
    text = framing.style == "text"
    words = list(word_list())
    rng.shuffle(words)
    common, pool = words[:n_common], words[n_common:]
    if text:
        instruction = ("Below is a numbered list of words. Some of them appear more often "
                       "than others. Memorize the ones that appear most often.\n\n")
        question = f"\n\nQuestion: What are the {n_common} most common words in the list above?"
        start = f"The {n_common} words that appear most often in the list are:"
    else:
        instruction = "WORDS = [\n"
        question = f"]\n\n# the {n_common} words that appear most often in WORDS:\n"
        start = "MOST_COMMON = ["
    prefix = framing.prefix_ids(tokenizer, instruction)
    question_ids = framing.question_ids(tokenizer, question, start)
    room = target - max_new - len(prefix) - len(question_ids)

    def render(items: list[str]) -> list[int]:
        if text:
            body = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        else:
            body = "".join(f'    "{w}",\n' for w in items)
        return tokenizer.encode(body, add_special_tokens=False)

    per_entry = len(render(pool[:50])) / 50
    entries = int(room / per_entry)
    freq = min(30, entries // (2 * n_common))  # RULER: 30 and 3, fewer when short
    if freq < 2:
        raise UserError(f"a context of {target} tokens is too short for the cwe task")
    rare_freq = max(1, min(3, freq // 10))
    order_seed = rng.random()

    def listing(n_rare: int) -> list[int]:
        items = common * freq + [w for w in pool[:n_rare] for _ in range(rare_freq)]
        random.Random(order_seed).shuffle(items)
        return render(items)

    lo, hi = 0, min(len(pool), max(0, entries))  # the most rare words that still fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(listing(mid)) <= room:
            lo = mid
        else:
            hi = mid - 1
    body = listing(lo)
    if len(body) > room:
        raise UserError(f"a context of {target} tokens is too short for the cwe task")
    return prefix + body, question_ids, common, {"frequency": freq, "rare_frequency": rare_freq,
                                                 "rare_words": lo}


BUILDERS = {
    "niah_single": functools.partial(_niah, "single"),
    "niah_multikey": functools.partial(_niah, "multikey"),
    "niah_multivalue": functools.partial(_niah, "multivalue"),
    "vt": _vt,
    "cwe": _cwe,
    "thread": _thread,
    "passkey": _passkey,
}


def make_sample(task: str, tokenizer, context_tokens: int, index: int, seed: int = 0,
                style: str = "text", chat: bool = False, max_new_tokens: int | None = None,
                framing: Framing | None = None) -> KVSample:
    """Sample `index` of `task` at `context_tokens`: the same for the same arguments."""
    if task not in BUILDERS:
        raise UserError(f"unknown task {task!r}; valid: {', '.join(BUILDERS)}")
    max_new = max_new_tokens or MAX_NEW_TOKENS[task]
    framing = framing or Framing.make(tokenizer, style, chat)
    rng = random.Random(f"tokenlean-kv:{seed}:{task}:{context_tokens}:{index}")
    hay = haystack(tokenizer, framing.style)
    context, question, answers, meta = BUILDERS[task](tokenizer, framing, hay, rng,
                                                      context_tokens, max_new)
    meta = {"index": index, "seed": seed, "style": framing.style,
            "chat": framing.chat_head is not None, **meta}
    return KVSample(task, context, question, answers, context_tokens, max_new, meta)


def make_samples(task: str, tokenizer, context_tokens: int, count: int, seed: int = 0,
                 style: str = "text", chat: bool = False,
                 max_new_tokens: int | None = None) -> list[KVSample]:
    framing = Framing.make(tokenizer, style, chat)
    return [make_sample(task, tokenizer, context_tokens, i, seed, style, chat, max_new_tokens,
                        framing) for i in range(count)]
