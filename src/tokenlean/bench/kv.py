"""`tokenlean bench kv`: KV-cache compression, quality and cost, every policy side by side.

Protocol (DESIGN.md, "Benchmarks: honest and side by side"; ANCHORS.md, kvpress):
- Quality: RULER-style tasks (bench/kv_tasks.py), each sample sized to a target length
  with the model's tokenizer. The context is prefilled WITHOUT the question and
  compressed by the policy; the question is then fed on the compressed cache
  (`lm.generate(context, n, kv=KVConfig(...), question=question)`), kvpress's protocol,
  so query-aware methods (SnapKV) do not see the question they are asked. The
  query-aware variant (context + question compressed together) is reported apart
  (`--query-aware`, rows with `query_aware: true`). Greedy, exactly `max_new_tokens`
  generated (EOS stopping off, so every method decodes the same number of steps); the
  score reads the text up to the first EOS: RULER's string match, the fraction of the
  expected answers found, mean over the samples.
- Streaming perplexity (`ppl`): held-out code (pip's source) fed in chunks through
  `model(chunk, cache=cache)` with the policy bound, the NLL of every next token, the
  perplexity per segment of the stream. A fraction budget counts the model's context.
  The full cache stops at the model's context; policies with `beyond_context` run on.
  Prefill-time policies (no eviction while decoding: a stream has no prompt) are n/a.
- Cost per (policy, budget, context): prefill seconds (context + compression + question),
  decode ms per token (decode_s / (tokens - 1), median over the samples), and the KV bytes
  the generation's cache held allocated, the most seen at the start of any forward (after
  prefill, every decode step) and at the end, against the full cache's (ratio). Process
  max RSS once. One warm-up generation, excluded; methods take turns at going first.
- A policy that fails (not implemented yet, a bug) becomes a skipped row with its message.
- Peers: `--peers kvpress` calls tokenlean.bench.kvpress_peer.run_kvpress_peer on the same
  samples (KVSample.to_json), skipped with a note when it or its environment is missing.
"""

from __future__ import annotations

import inspect
import math
import resource
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenlean.bench.kv_report import plot_kv, plot_ppl, print_kv_table
from tokenlean.bench.kv_runs import RunLog
from tokenlean.bench.kv_tasks import (  # noqa: F401  (KVSample: the peer module imports it here)
    MAX_NEW_TOKENS,
    PPL,
    STYLES,
    TASK_NAMES,
    KVSample,
    make_samples,
    parse_tasks,
    ppl_stream_ids,
    string_match_all,
)
from tokenlean.errors import UserError

DEFAULT_BUDGETS = "0.1,0.25,0.5"
DEFAULT_CONTEXT = "2048"
KVPRESS_COUNTERPART = {"none": "full", "snapkv": "snapkv", "adakv": "adakv_snapkv",
                       "streaming": "streaming_llm", "h2o": "observed_attention",
                       "duo": "duo_attention"}
KV_BYTES_NOTE = ("kv_bytes_allocated: the most the generation's cache held allocated at the "
                 "start of any forward (after prefill, every decode step) and at the end; the "
                 "transient inside the prefill forward is not seen. kv_bytes_full: the full "
                 "cache of the same sample (context + question + new tokens)")


@dataclass(frozen=True)
class Method:
    label: str
    policy: str  # a registry name, or "none"
    budget: str | None  # as given; None for the full cache
    args: tuple = ()
    query_aware: bool = False

    def config(self):
        from tokenlean.kv.registry import KVConfig

        return KVConfig(self.policy, self.budget, self.args)

    @property
    def cls(self):
        from tokenlean.kv.registry import POLICIES

        return POLICIES.get(self.policy)


# --- options ------------------------------------------------------------------------------

def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_contexts(text: str) -> list[int]:
    out = []
    for part in _split(text):
        raw = part.lower()
        try:
            value = int(float(raw[:-1]) * 1024) if raw.endswith("k") else int(raw)
        except ValueError:
            raise UserError(f"--context {part!r}: not a number of tokens") from None
        if value < 128:
            raise UserError(f"--context {part!r}: at least 128 tokens")
        out.append(value)
    if not out:
        raise UserError("--context is empty")
    if len(set(out)) != len(out):
        raise UserError(f"--context names a length twice: {text}")
    return out


def parse_budgets(text: str) -> list[str]:
    from tokenlean.kv.policy import Budget

    out = [str(Budget.parse(b)) for b in _split(text)]  # bad budget: UserError
    if not out:
        raise UserError("--budgets is empty")
    if len(set(out)) != len(out):
        raise UserError(f"--budgets names a budget twice: {text}")
    return out


def parse_policies(text: str) -> list[tuple[str, tuple]]:
    from tokenlean.kv.registry import check_policy

    out = []
    for part in _split(text):
        name, *options = [o.strip() for o in part.split(":")]
        check_policy(name, None, options)  # unknown name or option: UserError
        out.append((name, tuple(o for o in options if o)))
    if not out:
        raise UserError("--policies is empty")
    if len(set(out)) != len(out):
        raise UserError(f"--policies names a policy twice: {text}")
    return out


def plan_methods(policies, budgets, query_aware: bool) -> list[Method]:
    methods = []
    for name, options in policies:
        base = ":".join([name, *options])
        if name == "none":
            methods.append(Method("none", "none", None, options))
            continue
        for b in budgets:
            methods.append(Method(f"{base}@{b}", name, b, options))
            if query_aware:
                methods.append(Method(f"{base}@{b} (query-aware)", name, b, options, True))
    return methods


def model_context(model: str | None) -> tuple[str, Path, int]:
    """(name, folder, context) without loading the weights."""
    from tokenlean.lm import resolve_model
    from tokenlean.model.config import ModelConfig

    name, folder = resolve_model(model)
    if folder.is_file():  # a .gguf
        from tokenlean.model.gguf_read import GGUFFile

        return name, folder, GGUFFile(folder).config().max_position_embeddings
    return name, folder, ModelConfig.from_file(folder / "config.json").max_position_embeddings


def check_plan(args) -> dict:
    """Every option checked, one UserError, before the model loads."""
    tasks = parse_tasks(args.tasks)
    contexts = parse_contexts(args.context)
    budgets = parse_budgets(args.budgets)
    policies = parse_policies(args.policies)
    methods = plan_methods(policies, budgets, args.query_aware)
    peers = _split(args.peers)
    if peers in ([], ["none"]):
        peers = []
    elif peers != ["kvpress"]:
        raise UserError(f"unknown peer {args.peers!r}; valid: kvpress, none")
    if PPL in tasks and args.ppl_tokens <= 2 * args.ppl_chunk:
        raise UserError(f"--ppl-tokens {args.ppl_tokens}: the stream needs more than two "
                        f"chunks of --ppl-chunk {args.ppl_chunk} tokens")
    if getattr(args, "resume", None) and not Path(args.resume).is_file():
        raise UserError(f"--resume {args.resume}: no such file")
    name, folder, context = model_context(args.model)
    quality = [t for t in tasks if t != PPL]
    if quality:
        from tokenlean.kv.registry import POLICIES

        short = [p for p, _ in policies if p == "none" or not POLICIES[p].beyond_context]
        too_long = [c for c in contexts if c > context]
        if too_long and short:
            raise UserError(f"--context {max(too_long)} is longer than {name}'s context of "
                            f"{context} tokens; only policies that run past it may go there "
                            f"(not {', '.join(dict.fromkeys(short))})")
    return {"tasks": tasks, "contexts": contexts, "budgets": budgets, "policies": policies,
            "methods": methods, "peers": peers, "model": name, "folder": folder,
            "model_context": context}


def _command(args, model_name: str) -> str:
    parts = ["tokenlean", "bench", "kv", "--model", model_name, "--device", args.device,
             "--dtype", args.dtype, "--policies", args.policies, "--budgets", args.budgets,
             "--context", args.context, "--tasks", args.tasks, "--samples", str(args.samples),
             "--seed", str(args.seed), "--style", args.style, "--chat", args.chat,
             "--ppl-tokens", str(args.ppl_tokens), "--ppl-chunk", str(args.ppl_chunk),
             "--ppl-segment", str(args.ppl_segment), "--peers", args.peers]
    if args.max_new_tokens is not None:
        parts += ["--max-new-tokens", str(args.max_new_tokens)]
    if args.query_aware:
        parts.append("--query-aware")
    if args.kvpress_presses:
        parts += ["--kvpress-presses", args.kvpress_presses]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts + ["--out", str(args.out)])


# --- measuring ----------------------------------------------------------------------------

class CacheProbe:
    """Catches the first cache a generation makes (decode_steps' own), and its allocated
    bytes at the start of every forward of the model."""

    def __init__(self, model):
        self.model, self.cache, self.peak = model, None, 0

    def __enter__(self):
        make = self.model.new_cache

        def new_cache(*a, **k):
            cache = make(*a, **k)
            if self.cache is None:
                self.cache = cache
            return cache

        self.model.new_cache = new_cache  # an instance attribute: shadows the method
        self.handle = self.model.register_forward_pre_hook(self._look)
        return self

    def _look(self, module, inputs):
        if self.cache is not None:
            self.peak = max(self.peak, self.cache.nbytes(allocated=True))

    def __exit__(self, *exc):
        self.handle.remove()
        del self.model.new_cache
        self._look(None, None)


def full_cache_bytes(model, tokens: int) -> int:
    c = model.config
    element = torch.empty((), dtype=model.kv_dtype).element_size()
    return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * element * tokens


def generate_one(lm, method: Method, sample: KVSample) -> dict:
    """One greedy generation of a sample under a method, scored and measured."""
    kv = method.config()
    context, question = sample.context_ids, sample.question_ids
    if method.query_aware:
        context, question = context + question, None
    with CacheProbe(lm.model) as probe:
        result = lm.generate(context, sample.max_new_tokens, kv=kv, question=question,
                             stop_token_ids=[])
    ids = result.token_ids
    eos = set(lm.tokenizer.eos_ids)
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    text = lm.tokenizer.decode(ids[:cut])
    stats = result.stats
    decode_ms = (1e3 * stats["decode_s"] / (len(ids) - 1)) if len(ids) > 1 else None
    fed = len(sample.context_ids) + len(sample.question_ids) + sample.max_new_tokens
    return {"index": sample.meta.get("index"), "score": string_match_all(text, sample.answers),
            "text": text, "prefill_s": stats["prefill_s"], "decode_ms_per_token": decode_ms,
            "kv_bytes_allocated": probe.peak,
            "kv_bytes_end": probe.cache.nbytes(allocated=True) if probe.cache else None,
            "kv_bytes_full": full_cache_bytes(lm.model, fed)}


def stream_ppl(lm, method: Method, ids: list[int], chunk: int, segment: int) -> dict:
    """Perplexity of a token stream fed `chunk` tokens per forward, the policy bound."""
    from tokenlean.kv.policy import Budget, CachePolicy
    from tokenlean.kv.registry import KVConfig

    model = lm.model
    base = min(len(ids), lm.context)  # what a fraction budget counts
    budget = method.budget
    if budget is not None and Budget.parse(budget).is_fraction and Budget.parse(budget).value < 1:
        # a stream has no prompt: the fraction is of the model's context, as a token count
        budget = str(Budget.parse(budget).tokens(base))
    policy = KVConfig(method.policy, budget, method.args).make()
    beyond = policy is not None and policy.beyond_context
    n = len(ids) if beyond else min(len(ids), lm.context)
    cache = model.new_cache(n)
    peak, nll = 0, []
    t0 = time.perf_counter()
    with torch.inference_mode():
        first = torch.tensor([ids[:chunk]], device=model.device)
        if policy is None:
            logits = model(first, cache=cache, last_n=1)[0, -1]
        elif type(policy).prefill is CachePolicy.prefill:  # its prefill, budget on `base`
            policy.bind(cache, base, chunk)
            policy.prefilling = True
            try:
                logits = model(first, cache=cache, last_n=1)[0, -1]
            finally:
                policy.prefilling = False
        else:
            logits = policy.prefill(model, cache, first, room=chunk)
            policy.prompt_len = base
        for start in range(chunk, n, chunk):
            piece = torch.tensor([ids[start : min(n, start + chunk)]], device=model.device)
            out = model(piece, cache=cache)[0]  # (T, V)
            preds = torch.cat((logits[None], out[:-1])).float()
            nll.extend(F.cross_entropy(preds, piece[0], reduction="none").tolist())
            logits = out[-1]
            peak = max(peak, cache.nbytes(allocated=True))
    elapsed = time.perf_counter() - t0
    segments = []
    for s in range(0, n, segment):
        lo, hi = max(s, chunk), min(n, s + segment)
        if hi > lo:
            part = nll[lo - chunk : hi - chunk]
            segments.append({"start": lo, "end": hi, "ppl": round(math.exp(sum(part) / len(part)), 4)})
    return {"tokens": n, "scored_tokens": len(nll),
            "ppl": round(math.exp(sum(nll) / len(nll)), 4) if nll else None,
            "segments": segments, "tokens_per_s": round(n / elapsed, 2),
            "kv_bytes_allocated": peak, "kv_bytes_full": full_cache_bytes(model, n),
            "cut_at_context": n < len(ids)}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _round(value, digits=6):
    return None if value is None else round(value, digits)


# --- progress -----------------------------------------------------------------------------

def _clock(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Plain lines on stderr (they survive nohup and pipes): what ran, elapsed, ETA. Work is
    counted in tokens fed, so the ETA follows long contexts."""

    def __init__(self, total: float, file=None):
        self.total, self.done, self.t0 = max(total, 1e-9), 0.0, time.perf_counter()
        self.file = file or sys.stderr

    def line(self, text: str) -> None:
        print(f"kv: {text}", file=self.file, flush=True)

    def advance(self, work: float, text: str) -> None:
        self.done += work
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0
        self.line(f"[{100 * self.done / self.total:3.0f}%] {text} | elapsed {_clock(elapsed)}, "
                  f"ETA {_clock(max(0, eta))}")


# --- the run ------------------------------------------------------------------------------

def _style_and_chat(args, lm) -> tuple[str, bool]:
    from tokenlean.zoo import zoo_path

    zoo = zoo_path(lm.name) is not None
    style = args.style if args.style != "auto" else ("code" if zoo else "text")
    if args.chat == "on" and not lm.tokenizer.chat_template:
        raise UserError(f"--chat on: {lm.name} has no chat template")
    chat = args.chat == "on" or (args.chat == "auto" and bool(lm.tokenizer.chat_template)
                                 and not zoo)
    return style, chat


def _quality_row(method: Method, context: int, task: str, runs: list[dict], error: str | None,
                 kind: str = "tokenlean") -> dict:
    from tokenlean.kv.policy import Budget

    fraction = 1.0
    if method.budget is not None:
        b = Budget.parse(method.budget)
        fraction = b.value if b.is_fraction else b.value / context
    row = {"method": method.label, "kind": kind, "policy": method.policy,
           "options": list(method.args), "budget": method.budget,
           "budget_fraction": round(fraction, 6), "context": context, "task": task,
           "query_aware": method.query_aware, "skipped": error}
    if error or not runs:
        return row | {"score": None, "n": 0}
    alloc, full = _median([r["kv_bytes_allocated"] for r in runs]), _median([r["kv_bytes_full"] for r in runs])
    return row | {
        "score": round(statistics.mean(r["score"] for r in runs), 4), "n": len(runs),
        "prefill_s": _round(_median([r["prefill_s"] for r in runs])),
        "decode_ms_per_token": _round(_median([r["decode_ms_per_token"] for r in runs]), 4),
        "kv_bytes_allocated": alloc, "kv_bytes_end": _median([r["kv_bytes_end"] for r in runs]),
        "kv_bytes_full": full, "kv_ratio": round(alloc / full, 4) if alloc and full else None,
        "samples": runs}


def run_quality(lm, plan, samples, progress, notes, log: RunLog | None = None) -> list[dict]:
    """Every method on every sample; each generation goes into `log` as it finishes, and
    one the log holds already (a resumed run) is taken from it."""
    methods = plan["methods"]
    runs = {}  # (label, context, task) -> [run]
    failed: dict[tuple[str, int], str] = {}
    first = next(iter(next(iter(samples.values())).values()))[0]
    t0 = time.perf_counter()
    # warm-up, excluded: the plan's first method, which runs at every context asked for
    # (the plain cache would refuse a context past the model's)
    generate_one(lm, methods[0], first)
    progress.line(f"warm-up {time.perf_counter() - t0:.1f} s (excluded)")
    turn = 0
    for context, by_task in samples.items():
        for task, task_samples in by_task.items():
            for i, sample in enumerate(task_samples):
                shift, turn = turn % len(methods), turn + 1
                t1, ran = time.perf_counter(), 0
                for method in methods[shift:] + methods[:shift]:
                    if (method.label, context) in failed:
                        continue
                    got = log.get(method.label, sample) if log is not None else None
                    if got is not None:
                        runs.setdefault((method.label, context, task), []).append(got)
                        continue
                    try:
                        got = generate_one(lm, method, sample)
                    except Exception as e:  # a policy not done yet, or a bug: skip, say why
                        message = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                        failed[(method.label, context)] = message
                        progress.line(f"{method.label} at {context}: skipped ({message})")
                        continue
                    runs.setdefault((method.label, context, task), []).append(got)
                    if log is not None:
                        log.add(method.label, sample, got)
                    ran += 1
                progress.advance(len(methods) * (context + 8 * sample.max_new_tokens),
                                 f"{context} {task} {i + 1}/{len(task_samples)}: {ran} runs in "
                                 f"{time.perf_counter() - t1:.1f} s")
    rows = []
    for context, by_task in samples.items():
        for method in methods:
            for task in by_task:
                rows.append(_quality_row(method, context, task,
                                         runs.get((method.label, context, task), []),
                                         failed.get((method.label, context))))
    for label_context, message in failed.items():
        notes.append(f"{label_context[0]} at {label_context[1]} tokens: skipped, {message}")
    return rows


def run_ppl(lm, plan, args, progress, notes) -> list[dict]:
    ids, source = ppl_stream_ids(lm.tokenizer, args.ppl_tokens)
    rows = []
    methods = [m for m in plan["methods"] if not m.query_aware]
    for method in methods:
        row = {"method": method.label, "kind": "tokenlean", "policy": method.policy,
               "options": list(method.args), "budget": method.budget, "task": PPL,
               "query_aware": False, "score": None, "source": source, "skipped": None}
        cls = method.cls
        if cls is not None and not cls.decode_time:
            rows.append(row | {"skipped": "n/a: prefill-time policy (a stream has no prompt)"})
            continue
        t0 = time.perf_counter()
        try:
            got = stream_ppl(lm, method, ids, args.ppl_chunk, args.ppl_segment)
        except Exception as e:
            message = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            rows.append(row | {"skipped": message})
            progress.advance(len(ids), f"ppl {method.label}: skipped ({message})")
            continue
        rows.append(row | {"context": got["tokens"], **got})
        progress.advance(len(ids), f"ppl {method.label}: {got['ppl']} over {got['tokens']} "
                         f"tokens in {time.perf_counter() - t0:.1f} s")
    if any(r.get("cut_at_context") for r in rows):
        notes.append(f"ppl: the full cache and policies without beyond_context stop at the "
                     f"model's context ({lm.context} tokens)")
    return rows


def duo_patterns_for(lm, plan) -> dict:
    """DuoAttentionPress's patterns from the calibration the plan's `duo` policy uses (its
    sinks, recent and calibration options; made now if missing), so both split the heads
    alike. They differ in what a budget means: kvpress streams as many heads as remove the
    budget's share, tokenlean's duo keeps its `retrieval` share of heads and pages them."""
    from tokenlean.bench.kvpress_peer import duo_patterns
    from tokenlean.kv.calibrate import load_or_calibrate
    from tokenlean.kv.registry import make_policy

    args = next((a for name, a in plan["policies"] if name == "duo"), ())
    p = make_policy("duo", None, list(args)).params
    return duo_patterns(load_or_calibrate(lm.model, p.calibration, p.sinks, p.recent))


def run_peer(lm, plan, args, samples, notes) -> list[dict]:
    """kvpress on the same samples, through tokenlean.bench.kvpress_peer (another module).
    Expected back, per press, budget and sample: a dict with `text` (or a string), and
    optionally `prefill_s`, `decode_s`, `tokens`, `error`; either a list of dicts with
    `press`, `budget`, `sample` (index into the list given), or a dict keyed by
    (press, budget) or 'press@budget' holding one entry per sample."""
    try:
        from tokenlean.bench.kvpress_peer import run_kvpress_peer
    except ImportError as e:
        notes.append(f"kvpress: skipped, tokenlean.bench.kvpress_peer is not available ({e})")
        return []
    from tokenlean.kv.policy import Budget

    flat = [s for by_task in samples.values() for group in by_task.values() for s in group]
    budgets = [Budget.parse(b).value for b in plan["budgets"] if Budget.parse(b).is_fraction]
    if len(budgets) < len(plan["budgets"]):
        notes.append("kvpress: token-count budgets left out (a press takes a ratio)")
    presses = _split(args.kvpress_presses) if args.kvpress_presses else list(dict.fromkeys(
        KVPRESS_COUNTERPART[p] for p, _ in plan["policies"] if p in KVPRESS_COUNTERPART))
    if not presses or not budgets:
        notes.append("kvpress: skipped, no press or budget to run")
        return []
    wanted = {"python": args.kvpress_python, "max_new_tokens": None, "eos_ids": [],
              "threads": torch.get_num_threads(), "device": str(lm.model.device),
              "dtype": str(lm.model.dtype).removeprefix("torch.")}
    if "duo_attention" in presses:  # kvpress's DuoAttention on our calibration's head split
        wanted["duo_patterns"] = duo_patterns_for(lm, plan)
    accepted = inspect.signature(run_kvpress_peer).parameters
    kwargs = {k: v for k, v in wanted.items() if k in accepted and v is not None}
    eos = set(lm.tokenizer.eos_ids)
    try:
        out = run_kvpress_peer(flat, lm.folder, presses, budgets, **kwargs)
    except Exception as e:  # no kvpress environment, a failed run: a note, not a crash
        notes.append(f"kvpress: skipped ({type(e).__name__}: {str(e).splitlines()[0][:300]})")
        return []
    records: dict[tuple[str, float], list] = {}
    if isinstance(out, dict):
        for key, entries in out.items():
            press, budget = key if isinstance(key, tuple) else str(key).rsplit("@", 1)
            records[(press, float(budget))] = list(entries)
    else:
        for r in out:
            if r.get("skipped"):
                notes.append(f"kvpress {r['press']}: skipped ({r['skipped']})")
                continue
            records.setdefault((r["press"], float(r["budget"])), [None] * len(flat))[
                int(r["sample"])] = r
    rows = []
    for (press, budget), entries in records.items():
        method = Method(f"kvpress:{press}@{budget:g}", press, f"{budget:g}")
        groups: dict[tuple[int, str], list] = {}
        for sample, entry in zip(flat, entries, strict=False):
            entry = {"text": entry} if isinstance(entry, str) else entry
            if entry is None or entry.get("error"):
                continue
            if "text" not in entry:  # the worker returns ids: the text up to the first EOS
                ids = entry["generated_ids"]
                cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
                entry = {**entry, "text": lm.tokenizer.decode(ids[:cut])}
            tokens, decode_s = entry.get("tokens"), entry.get("decode_s")
            if entry.get("decode_s_per_token") is not None:
                tokens, decode_s = 2, entry["decode_s_per_token"]
            groups.setdefault((sample.context_tokens, sample.task), []).append({
                "index": sample.meta.get("index"),
                "score": string_match_all(entry["text"], sample.answers), "text": entry["text"],
                "prefill_s": entry.get("prefill_s"),
                "decode_ms_per_token": 1e3 * decode_s / (tokens - 1)
                if decode_s is not None and tokens and tokens > 1 else None,
                "kv_bytes_allocated": entry.get("kv_bytes"), "kv_bytes_end": None,
                "kv_bytes_full": None})
        for (context, task), group in groups.items():
            rows.append(_quality_row(method, context, task, group, None, kind="kvpress"))
    return rows


def _speedups(rows: list[dict]) -> None:
    full = {(r["context"], r["task"]): r.get("decode_ms_per_token") for r in rows
            if r["policy"] == "none" and r["kind"] == "tokenlean" and r["task"] != PPL}
    for r in rows:
        base, mine = full.get((r.get("context"), r["task"])), r.get("decode_ms_per_token")
        r["decode_speedup_vs_full"] = round(base / mine, 4) if base and mine else None


def summaries(rows: list[dict]) -> list[dict]:
    """Per (method, context): the mean score over the tasks it ran, and median costs."""
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["task"] != PPL:
            groups.setdefault((r["method"], r["context"]), []).append(r)
    out = []
    for (label, context), group in groups.items():
        ok = [r for r in group if r["score"] is not None]
        head = group[0]
        out.append({"method": label, "kind": head["kind"], "policy": head["policy"],
                    "budget": head["budget"], "budget_fraction": head["budget_fraction"],
                    "context": context, "query_aware": head["query_aware"],
                    "tasks": {r["task"]: r["score"] for r in group},
                    "mean_score": round(statistics.mean(r["score"] for r in ok), 4)
                    if len(ok) == len(group) else None,
                    "prefill_s": _round(_median([r.get("prefill_s") for r in ok])),
                    "decode_ms_per_token": _round(_median([r.get("decode_ms_per_token")
                                                           for r in ok]), 4),
                    "decode_speedup_vs_full": _round(_median([r.get("decode_speedup_vs_full")
                                                              for r in ok]), 4),
                    "kv_bytes_allocated": _median([r.get("kv_bytes_allocated") for r in ok]),
                    "kv_ratio": _round(_median([r.get("kv_ratio") for r in ok]), 4),
                    "skipped": next((r["skipped"] for r in group if r["skipped"]), None)})
    return out


def open_run_log(args, lm, started) -> RunLog:
    from tokenlean.bench.report import new_path
    from tokenlean.kv.calibrate import model_digest

    identity = {"model": lm.name, "weights": model_digest(lm.model),
                "dtype": str(lm.model.dtype).removeprefix("torch."), "device": str(lm.model.device)}
    if args.resume:
        return RunLog(args.resume, identity, resume=True)
    return RunLog(new_path(args.out, "kv", started, ".runs.jsonl"), identity)


def run_kv_bench(args) -> dict:
    """Run the benchmark described by `bench kv`'s arguments; return the result."""
    from tokenlean.bench.report import machine_info, run_header, utc_now, write_json
    from tokenlean.lm import load

    started = utc_now()
    plan = check_plan(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lm = load(args.model, device=args.device, dtype=args.dtype)
    style, chat = _style_and_chat(args, lm)
    quality = [t for t in plan["tasks"] if t != PPL]
    samples = {c: {t: make_samples(t, lm.tokenizer, c, args.samples, args.seed, style, chat,
                                   args.max_new_tokens) for t in quality}
               for c in plan["contexts"]} if quality else {}
    n_gen = len(plan["methods"]) * len(quality) * args.samples * len(plan["contexts"])
    work = sum(len(plan["methods"]) * (s.context_tokens + 8 * s.max_new_tokens)
               for by_task in samples.values() for group in by_task.values() for s in group)
    ppl_methods = [m for m in plan["methods"] if not m.query_aware
                   and (m.cls is None or m.cls.decode_time)] if PPL in plan["tasks"] else []
    work += len(ppl_methods) * args.ppl_tokens
    progress = Progress(work)
    progress.line(f"{lm.name}: {len(plan['methods'])} methods x {len(quality)} tasks x "
                  f"{args.samples} samples x contexts {','.join(map(str, plan['contexts']))} "
                  f"= {n_gen} generations; ppl: {len(ppl_methods)} streams of "
                  f"{args.ppl_tokens} tokens; style {style}, chat {'on' if chat else 'off'}, "
                  f"{torch.get_num_threads()} threads")
    notes: list[str] = []
    log = None
    if quality:
        log = open_run_log(args, lm, started)
        resumed = ""
        if args.resume:
            resumed = f"; {len(log.done)} resumed from it"
            notes.append(f"resumed: the generations logged in {log.path} (an interrupted run "
                         "with the same model) were taken from it, not run again")
        progress.line(f"every generation is logged to {log.path}{resumed} (after an "
                      f"interruption, --resume {log.path} goes on from there)")
    rows = run_quality(lm, plan, samples, progress, notes, log) if quality else []
    if plan["peers"] and samples:
        rows += run_peer(lm, plan, args, samples, notes)
    if PPL in plan["tasks"]:
        rows += run_ppl(lm, plan, args, progress, notes)
    _speedups(rows)

    machine = machine_info(lm.model.device)
    machine["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    load_avg = machine.get("load_average_1m_at_start")
    if load_avg is not None and lm.model.device.type == "cpu" and load_avg > 0.5:
        notes.append(f"1-minute load average was {load_avg} at the start: other processes "
                     "competed for the CPU, so the timings are only indicative (scores are not "
                     "affected)")
    result = {
        **run_header("kv", _command(args, lm.name), started, machine, lm),
        "setup": {
            "device": str(lm.model.device), "dtype": str(lm.model.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "contexts": plan["contexts"],
            "budgets": plan["budgets"], "methods": [m.label for m in plan["methods"]],
            "tasks": plan["tasks"], "samples_per_task": args.samples, "seed": args.seed,
            "style": style, "chat_template": chat,
            "max_new_tokens": {t: args.max_new_tokens or MAX_NEW_TOKENS[t] for t in quality},
            "protocol": "context prefilled (and compressed) without the question; the question "
                        "fed after, on the compressed cache (kvpress); query_aware rows: the "
                        "question inside the compressed prompt",
            "generation": "greedy, exactly max_new_tokens (EOS stopping off); scored on the "
                          "text up to the first EOS",
            "score": "RULER string match: fraction of the expected answers in the text, mean "
                     "over samples",
            "kv_bytes": KV_BYTES_NOTE,
            "warmup": "one generation (full cache, first sample), excluded",
            "order": "methods take turns at going first, sample by sample",
            "ppl": {"tokens": args.ppl_tokens, "chunk": args.ppl_chunk,
                    "segment": args.ppl_segment,
                    "budget": "a fraction counts the model's context",
                    "first chunk": "fed as the prompt, its tokens not scored"},
        },
        "samples": {str(c): {t: [s.describe() for s in group] for t, group in by_task.items()}
                    for c, by_task in samples.items()},
        "summary": summaries(rows),
        "rows": rows,
        "notes": notes,
    }
    path = write_json(result, args.out, "kv", started)
    png, note = plot_kv(result, path.with_suffix(".png"))
    ppl_png = None
    if any(r["task"] == PPL and r.get("segments") for r in rows):
        ppl_png, _ = plot_ppl(result, path.with_name(path.stem + "-ppl.png"))
    print_kv_table(result, path, [p for p in (png, ppl_png) if p], note)
    result["json_path"] = str(path)
    result["png_paths"] = [str(p) for p in (png, ppl_png) if p]
    return result


def run_from_args(args) -> int:
    run_kv_bench(args)
    return 0


# --- table and plots ----------------------------------------------------------------------

