"""kvpress's side of `tokenlean bench kv`: a standalone script for kvpress's own environment.

Run as `<kvpress python> -I kvpress_worker.py request.json result.json`. It imports only
torch, transformers, kvpress and the standard library (tokenlean is not installed where
kvpress is: kvpress pins transformers < 5.3). `bench/kvpress_peer.py` writes the request,
runs this script and reads the result back; progress goes to stderr, one line per step,
and a failure ends with one line `kvpress worker: <Error>: <message>` and exit status 1.

Protocol, as kvpress's `KVPressTextGenerationPipeline._forward` / `generate_answer`
(kvpress 0.5.5): the context is prefilled through the backbone (`model.model`, no LM
head) on a fresh `DynamicCache` with the press hooked in, so the press compresses at
prefill and never sees the question; the question is then fed on the compressed cache
without the press, at positions counted from the *uncompressed* context length; greedy
decoding follows, the first token from the question's last logits, then one token per
step up to `max_new_tokens` in all, stopping after an EOS id (which is kept in the ids).
kvpress's `compression_ratio` is the fraction removed: ratio = 1 - budget.

Request modes (the JSON's "mode"):
- "bench": model, dtype, device, threads, max_new_tokens, eos_ids (null: the model's),
  repeats, warmup, presses [{"name", "args"}], budgets, samples [{task, context_ids,
  question_ids, answers, context_tokens, max_new_tokens?}], duo_patterns (optional).
  Result: {"info", "rows"}: one row per (press, budget, sample), or one row per
  (press, budget) with "skipped" when the press cannot run here.
- "selection": model, input_ids, presses [{"name", "ratio", "args"}]. Result:
  {"info", "selections": [{"name", "ratio", "layers": [[kept indices per KV head] per layer]}]}:
  the kept positions, found by matching each key left in the cache to the prefill's keys.
- "info": versions only.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

# `python kvpress_worker.py` puts this folder first on sys.path: its sibling modules
# (decode.py, serve.py, ...) must not shadow anything transformers imports.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _HERE]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: fail fast instead
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import kvpress  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import DynamicCache  # noqa: E402

# short names (as `tokenlean bench kv --peer kvpress:...` spells them) -> kvpress classes
PRESSES = {
    "streaming_llm": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "observed_attention": "ObservedAttentionPress",
    "tova": "TOVAPress",
    "knorm": "KnormPress",
    "expected_attention": "ExpectedAttentionPress",
    "adakv_snapkv": "AdaKVPress:SnapKVPress",
    "duo_attention": "DuoAttentionPress",
}
EAGER = {"ObservedAttentionPress"}  # reads the attention weights only eager attention returns
FULL = ("full", "none", "")
DUO_OFFLINE = ("DuoAttentionPress loads its per-head patterns from the DuoAttention GitHub repo "
               "(6 named checkpoints) or computes them on the fly from the hub's kmfoda/booksum "
               "data set and tokenizer: not available offline; pass duo_patterns (e.g. tokenlean's "
               "kv calibration) to run it with given head scores")


def log(msg: str) -> None:
    print(f"kvpress: {msg}", file=sys.stderr, flush=True)


def info() -> dict:
    return {"kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
            "transformers": transformers.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0]}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def load(req: dict):
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dtype = getattr(torch, req.get("dtype", "float32"))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        req["model"], dtype=dtype, attn_implementation="sdpa")
    return model.to(req.get("device", "cpu")).eval().requires_grad_(False)


def class_name(name: str) -> str:
    """'snapkv' / 'SnapKVPress' -> 'SnapKVPress'; 'adakv_snapkv' / 'AdaKVPress:SnapKVPress'
    -> 'AdaKVPress:SnapKVPress' (a wrapper and its scorer)."""
    name = PRESSES.get(name, name)
    parts = [PRESSES.get(p, p) for p in name.split(":")]
    for p in parts:
        if not hasattr(kvpress, p):
            raise ValueError(f"kvpress has no press {p!r}")
    return ":".join(parts)


def make_press(name: str, ratio: float, args: dict | None = None):
    """A kvpress press removing `ratio` of the context, or None for the full cache."""
    if name.lower() in FULL:
        return None
    args = dict(args or {})
    parts = class_name(name).split(":")
    if len(parts) == 2:  # a wrapper (AdaKVPress) around a scorer press
        inner_args = args.pop("press_args", {})
        inner = getattr(kvpress, parts[1])(compression_ratio=ratio, **inner_args)
        return getattr(kvpress, parts[0])(press=inner, **args)
    if parts[0] == "DuoAttentionPress":  # its ratio is set per sample from the context length
        return kvpress.DuoAttentionPress(**args)
    return getattr(kvpress, parts[0])(compression_ratio=ratio, **args)


def clear_masks(model) -> None:
    """Head-wise presses (AdaKV, Duo) leave `masked_key_indices` on the attention modules."""
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


def masked_count(model) -> int:
    n = 0
    for layer in model.model.layers:
        idx = getattr(layer.self_attn, "masked_key_indices", None)
        if idx is not None:
            n += int(idx[0].numel())
    return n


def cache_stats(cache) -> tuple[int, int]:
    """(bytes of keys + values, entries summed over layers and KV heads) in the cache."""
    nbytes = entries = 0
    for layer in cache.layers:
        nbytes += layer.keys.numel() * layer.keys.element_size()
        nbytes += layer.values.numel() * layer.values.element_size()
        entries += layer.keys.shape[1] * layer.keys.shape[2]
    return nbytes, entries


def use_duo_patterns(press, patterns: dict, n: int, ratio: float) -> None:
    """Give DuoAttentionPress head scores (layers x KV heads, high = retrieval head) instead
    of its download, and stream as many heads as removes `ratio` of an n-token context."""
    import numpy as np

    sink, recent = int(patterns["sink_size"]), int(patterns["recent_size"])
    scores = np.asarray(patterns["head_scores"], dtype=float)
    press.load_attention_pattern = lambda model: (sink, recent, scores)
    per_head = max(1e-9, 1 - (sink + recent) / n)  # the share a streaming head removes
    press.head_compression_ratio = min(1.0, max(0.0, ratio / per_head))


@torch.no_grad()
def run_sample(model, press, sample: dict, max_new: int, eos: set[int], device) -> dict:
    """One sample, kvpress's pipeline protocol; ids and timings."""
    context = torch.tensor([sample["context_ids"]], device=device)
    question = torch.tensor([sample["question_ids"]], device=device)
    n = context.shape[1]
    clear_masks(model)
    cache = DynamicCache()
    sync = torch.cuda.synchronize if context.is_cuda else (lambda: None)
    t0 = time.perf_counter()
    if press is None:
        model.model(input_ids=context, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=context, past_key_values=cache)
    sync()
    t1 = time.perf_counter()
    kv_bytes, kv_entries = cache_stats(cache)
    masked = masked_count(model)
    # the question at its true positions, after the whole (uncompressed) context
    positions = torch.arange(n, n + question.shape[1], device=device)[None]
    out = model(input_ids=question, past_key_values=cache, position_ids=positions, logits_to_keep=1)
    ids = [int(out.logits[0, -1].argmax())]
    sync()
    t2 = time.perf_counter()
    pos = positions[:, -1:] + 1
    while len(ids) < max_new and ids[-1] not in eos:
        out = model(input_ids=torch.tensor([[ids[-1]]], device=device), past_key_values=cache,
                    position_ids=pos)
        ids.append(int(out.logits[0, -1].argmax()))
        pos = pos + 1
    sync()
    t3 = time.perf_counter()
    steps = len(ids) - 1
    ratio = getattr(press, "compression_ratio_", None) if press is not None else None
    return {"generated_ids": ids, "prefill_s": t1 - t0, "question_s": t2 - t1,
            "decode_s": t3 - t2, "decode_tokens": steps,
            "decode_s_per_token": (t3 - t2) / steps if steps else None,
            "kv_bytes": kv_bytes, "kv_entries": kv_entries,
            "kv_entries_effective": kv_entries - masked, "masked_entries": masked,
            "achieved_ratio": ratio}


def eos_ids(model, given) -> set[int]:
    if given is not None:
        return set(int(i) for i in given)
    found = set()
    for cfg in (model.generation_config, model.config):
        e = getattr(cfg, "eos_token_id", None)
        found |= set(e if isinstance(e, (list, tuple)) else [] if e is None else [e])
    return found


def bench(req: dict) -> dict:
    torch.set_num_threads(int(req.get("threads") or torch.get_num_threads()))
    model = load(req)
    device = model.device
    eos = eos_ids(model, req.get("eos_ids"))
    samples = req["samples"]
    repeats = max(1, int(req.get("repeats", 1)))
    default_new = int(req.get("max_new_tokens", 32))
    if req.get("warmup", True) and samples:  # first-call costs out of the timings
        s = samples[0]
        warm = {"context_ids": s["context_ids"][:128], "question_ids": s["question_ids"][:8]}
        run_sample(model, None, warm, 2, set(), device)
    rows = []
    for spec in req["presses"]:
        name, args = spec["name"], spec.get("args") or {}
        full = name.lower() in FULL
        for budget in ([1.0] if full else req["budgets"]):
            ratio = 0.0 if full else round(1.0 - float(budget), 6)
            base = {"system": "kvpress", "press": name, "budget": budget,
                    "compression_ratio": ratio}
            try:
                base["press_class"] = "full" if full else class_name(name)
            except ValueError as e:
                rows.append({**base, "skipped": str(e)})
                continue
            duo = base["press_class"] == "DuoAttentionPress"
            if duo and not req.get("duo_patterns"):
                rows.append({**base, "skipped": DUO_OFFLINE})
                log(f"{name}: skipped (no per-head patterns offline)")
                continue
            eager = base["press_class"] in EAGER
            if eager:
                model.set_attn_implementation("eager")
            try:
                for i, sample in enumerate(samples):
                    log(f"{name} budget {budget}: sample {i + 1}/{len(samples)} "
                        f"({len(sample['context_ids'])} tokens)")
                    max_new = int(sample.get("max_new_tokens") or default_new)
                    row = {**base, "sample": i, "task": sample.get("task"),
                           "context_tokens": sample.get("context_tokens"),
                           "prompt_tokens": len(sample["context_ids"]),
                           "question_tokens": len(sample["question_ids"]),
                           "attn_implementation": "eager" if eager else "sdpa"}
                    try:
                        runs = []
                        for _ in range(repeats):
                            press = make_press(name, ratio, args)
                            if duo:
                                use_duo_patterns(press, req["duo_patterns"],
                                                 len(sample["context_ids"]), ratio)
                            runs.append(run_sample(model, press, sample, max_new, eos, device))
                    except Exception as e:  # one press failing on one sample: recorded, go on
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        rows.append(row)
                        log(f"{name} budget {budget} sample {i + 1}: {row['error']}")
                        continue
                    row.update(runs[0])
                    for key in ("prefill_s", "question_s", "decode_s", "decode_s_per_token"):
                        vals = [r[key] for r in runs if r[key] is not None]
                        row[key] = statistics.median(vals) if vals else None
                    row["repeats"] = repeats
                    row["deterministic"] = all(r["generated_ids"] == runs[0]["generated_ids"]
                                               for r in runs)
                    rows.append(row)
            finally:
                if eager:
                    model.set_attn_implementation("sdpa")
    return {"info": {**info(), "eos_ids": sorted(eos), "threads": torch.get_num_threads(),
                     "dtype": req.get("dtype", "float32"), "device": str(device)},
            "rows": rows}


@torch.no_grad()
def selection(req: dict) -> dict:
    """Which context positions each press keeps, per layer and KV head."""
    torch.set_num_threads(int(req.get("threads") or 1))
    model = load(req)
    ids = torch.tensor([req["input_ids"]], device=model.device)
    out = []
    for spec in req["presses"]:
        name, ratio = spec["name"], float(spec["ratio"])
        press = make_press(name, ratio, spec.get("args"))
        seen: dict[int, torch.Tensor] = {}
        original = press.compress

        def compress(module, hidden_states, keys, values, attentions, kwargs, _orig=original,
                     _seen=seen):
            _seen[module.layer_idx] = keys.clone()  # (B, H_kv, n, D) before the press
            return _orig(module, hidden_states, keys, values, attentions, kwargs)

        press.compress = compress  # an instance attribute: the hook calls self.compress
        eager = class_name(name) in EAGER
        if eager:
            model.set_attn_implementation("eager")
        clear_masks(model)
        cache = DynamicCache()
        try:
            with press(model):
                model.model(input_ids=ids, past_key_values=cache)
        finally:
            if eager:
                model.set_attn_implementation("sdpa")
        layers = []
        for li, layer in enumerate(cache.layers):
            before, after = seen[li][0], layer.keys[0]  # (H_kv, n, D), (H_kv, k, D)
            heads = []
            for h in range(before.shape[0]):
                match = (after[h][:, None, :] == before[h][None, :, :]).all(-1)  # (k, n)
                rows, cols = match.nonzero(as_tuple=True)
                first = {}
                for r, c in zip(rows.tolist(), cols.tolist()):
                    first.setdefault(r, c)
                if len(first) != after.shape[1]:
                    raise RuntimeError(f"layer {li} head {h}: a kept key matches no prefill key")
                heads.append(sorted(first.values()))
            layers.append(heads)
        out.append({"name": name, "press_class": class_name(name), "ratio": ratio,
                    "layers": layers})
    return {"info": info(), "selections": out}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: kvpress_worker.py request.json result.json", file=sys.stderr)
        return 2
    try:
        req = json.loads(Path(argv[1]).read_text())
        mode = req.get("mode", "bench")
        if mode == "bench":
            result = bench(req)
        elif mode == "selection":
            result = selection(req)
        elif mode == "info":
            result = {"info": info()}
        else:
            raise ValueError(f"unknown mode {mode!r}")
        Path(argv[2]).write_text(json.dumps(result))
    except Exception as e:
        if os.environ.get("TOKENLEAN_KVPRESS_DEBUG"):
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"kvpress worker: {type(e).__name__}: {msg}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
