"""`tokenlean bench decode`: plain greedy decoding, tokenlean vs transformers' generate
and llama.cpp (llama-cpp-python, when installed: `--llama-cpp auto`).

Protocol (DESIGN.md, "Benchmarks: honest and side by side"): one run, one machine,
the same checkpoint folder, prompts, dtype, device and thread count for both
systems; one warm-up generation per system, excluded; then `repeats` passes over
all prompts. The two systems alternate which goes first, prompt by prompt, so a
change in background load hits both alike. EOS stopping is off on both sides:
each generation is exactly `max_new_tokens` tokens.

Figures per system and repeat:
- tok/s: generated tokens / wall time of generate, prompt prefill included (headline);
- prefill and decode-only tok/s: tokenlean's from its own stats; transformers' from a
  1-token generate on the same prompt (prefill estimate) and (N - 1) / (t_N - t_1).
- llama.cpp: its rows run GGUF files of the same weights (F32; F16 = rounded to f16)
  and, when the model folder has them, the publisher's `original-*.gguf` (different
  weights, labelled so); prefill = time to its first new token (bench/llama_cpp.py);
- bandwidth: weight bytes read per token x decode tok/s, against this machine's GEMV
  bandwidth measured in the same run (bench/bandwidth.py).
The medians over repeats, and the ratios tokenlean / each peer, are reported.
Exactness: tokenlean's greedy token ids against each peer's, prompt by prompt.
"""

from __future__ import annotations

import shlex
import statistics
import time

import torch

from tokenlean.bench.prompts import heldout_prompts
from tokenlean.bench.report import (
    machine_info,
    print_decode_table,
    run_header,
    utc_now,
    write_json,
)
from tokenlean.errors import UserError


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _command(args, model_name: str) -> str:
    """The full command line, every option explicit, to rerun this benchmark."""
    parts = ["tokenlean", "bench", "decode", "--model", model_name, "--device", args.device,
             "--dtype", args.dtype, "--prompts", str(args.prompts),
             "--prompt-tokens", str(args.prompt_tokens), "--max-new-tokens",
             str(args.max_new_tokens), "--repeats", str(args.repeats)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.no_peers:
        parts.append("--no-peers")
    parts += ["--llama-cpp", getattr(args, "llama_cpp", "off")]
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def run_decode_bench(args) -> dict:
    """Run the benchmark described by the CLI's `bench decode` arguments; return the result."""
    from tokenlean.lm import load

    started = utc_now()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lm = load(args.model, device=args.device, dtype=args.dtype)
    device, dtype = lm.model.device, lm.model.dtype
    n_new, n_prompt = args.max_new_tokens, args.prompt_tokens
    if n_prompt + n_new > lm.context:
        raise UserError(f"--prompt-tokens {n_prompt} + --max-new-tokens {n_new} exceeds the "
                        f"model's context of {lm.context} tokens")
    prompts = heldout_prompts(lm.tokenizer, args.prompts, n_prompt)

    from tokenlean.bench import llama_cpp as lcpp

    notes = []
    mode = getattr(args, "llama_cpp", "off")
    run_llama, note = lcpp.wanted("off" if args.no_peers and mode == "auto" else mode, device.type)
    notes += [note] if note else []
    llama_peers = {}
    if run_llama:
        rows = lcpp.plan_gguf_models(lm.folder, lm.name)
        llama_peers, skipped = lcpp.load_peers(rows, torch.get_num_threads(), n_prompt + n_new)
        notes += skipped

    peer = None
    if not args.no_peers:
        from tokenlean.bench.peers import TransformersPeer

        peer = TransformersPeer(lm.folder, device, dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_tokenlean(ids: list[int]) -> dict:
        sync()
        t0 = time.perf_counter()
        result = lm.generate(ids, n_new, stop_token_ids=[])
        sync()
        elapsed = time.perf_counter() - t0
        if len(result.token_ids) != n_new:
            raise RuntimeError(f"tokenlean generated {len(result.token_ids)} tokens, {n_new} asked")
        return {"ids": result.token_ids, "time_s": elapsed,
                "prefill_s": result.stats["prefill_s"], "decode_s": result.stats["decode_s"]}

    def run_transformers(ids: list[int]) -> dict:
        new, elapsed = peer.generate(ids, n_new)
        _, t_one = peer.generate(ids, 1)  # prefill estimate; not part of the timed run
        return {"ids": new, "time_s": elapsed, "prefill_s": t_one,
                "decode_s": elapsed - t_one if n_new > 1 else None}

    def llama_runner(llama):
        def run(ids: list[int]) -> dict:
            new, elapsed = llama.generate(ids, n_new)
            return {"ids": new, "time_s": elapsed, "prefill_s": llama.last_prefill_s,
                    "decode_s": elapsed - llama.last_prefill_s if n_new > 1 else None}
        return run

    systems = {"tokenlean": run_tokenlean}
    if peer is not None:
        systems["transformers"] = run_transformers
    for label, (_, llama) in llama_peers.items():
        systems[label] = llama_runner(llama)
    names = list(systems)
    # runs[name][repeat][prompt] = {"ids", "time_s", "prefill_s", "decode_s"}
    runs: dict[str, list[list[dict]]] = {name: [] for name in names}
    warmup_s: dict[str, float] = {}

    from tokenlean.progress import progress_bar

    total = len(names) * (1 + args.repeats * len(prompts))
    with progress_bar() as progress:
        task = progress.add_task("warm-up", total=total)
        for name in names:
            progress.update(task, description=f"warm-up {name}")
            warmup_s[name] = round(systems[name](prompts[0].ids)["time_s"], 6)
            progress.advance(task)
        for r in range(args.repeats):
            for name in names:
                runs[name].append([])
            for i, prompt in enumerate(prompts):
                order = names if (r * len(prompts) + i) % 2 == 0 else names[::-1]
                for name in order:
                    progress.update(task, description=f"repeat {r + 1}/{args.repeats} "
                                    f"prompt {i + 1}/{len(prompts)} {name}")
                    runs[name][r].append(systems[name](prompt.ids))
                    progress.advance(task)

    # --- figures -------------------------------------------------------------------------
    n_total = n_new * len(prompts)
    system_results = {}
    for name in names:
        per_repeat = runs[name]
        tps, prefill, decode_tps = [], [], []
        for rep in per_repeat:
            time_s = sum(g["time_s"] for g in rep)
            tps.append(round(n_total / time_s, 3))
            prefill.append(round(statistics.mean(g["prefill_s"] for g in rep), 6))
            decode_s = [g["decode_s"] for g in rep]
            if n_new > 1 and all(d is not None and d > 0 for d in decode_s):
                decode_tps.append(round((n_new - 1) * len(prompts) / sum(decode_s), 3))
            else:
                decode_tps.append(None)
        system_results[name] = {
            "warmup_s": warmup_s[name],
            "tokens_per_s": tps,
            "prefill_s": prefill,
            "decode_tokens_per_s": decode_tps,
            "generation_time_s": [[round(g["time_s"], 6) for g in rep] for rep in per_repeat],
            "median_tokens_per_s": _median(tps),
            "median_prefill_s": _median(prefill),
            "median_decode_tokens_per_s": _median(decode_tps),
            "deterministic": all(rep[i]["ids"] == per_repeat[0][i]["ids"]
                                 for rep in per_repeat for i in range(len(prompts))),
        }
    system_results["tokenlean"]["method"] = (
        "lm.generate(prompt_ids, max_new_tokens, stop_token_ids=[]); prefill and decode "
        "from its stats")
    if peer is not None:
        system_results["transformers"]["method"] = (
            "AutoModelForCausalLM.generate(do_sample=False, eos_token_id=None); prefill = a "
            "1-token generate on the same prompt, decode = (N - 1) / (t_N - t_1)")
        system_results["transformers"]["attn_implementation"] = peer.attn_implementation
    for label, (row, llama) in llama_peers.items():
        system_results[label] |= {"method": lcpp.METHOD, **row.to_json(), **llama.settings(),
                                  "exact": all(runs[label][r][i]["ids"] ==
                                               runs["tokenlean"][r][i]["ids"]
                                               for r in range(args.repeats)
                                               for i in range(len(prompts)))}
        llama.close()

    per_prompt = []
    for i, prompt in enumerate(prompts):
        entry = {**prompt.to_json()}
        if peer is not None:
            tl, hf = runs["tokenlean"][0][i]["ids"], runs["transformers"][0][i]["ids"]
            entry["exact"] = all(runs["tokenlean"][r][i]["ids"] == runs["transformers"][r][i]["ids"]
                                 for r in range(args.repeats))
            entry["first_difference"] = _first_difference(tl, hf)
        entry["tokenlean_ids"] = runs["tokenlean"][0][i]["ids"]
        if peer is not None:
            entry["transformers_ids"] = runs["transformers"][0][i]["ids"]
        if llama_peers:
            entry["llama_cpp"] = {label: {
                "exact": all(runs[label][r][i]["ids"] == runs["tokenlean"][r][i]["ids"]
                             for r in range(args.repeats)),
                "first_difference": _first_difference(runs["tokenlean"][0][i]["ids"],
                                                      runs[label][0][i]["ids"]),
                "ids": runs[label][0][i]["ids"]} for label in llama_peers}
        per_prompt.append(entry)
    exact = all(p["exact"] for p in per_prompt) if peer is not None else None

    speedup = None
    if peer is not None:
        tl, hf = system_results["tokenlean"], system_results["transformers"]
        speedup = {
            "tokens_per_s": _ratio(tl["median_tokens_per_s"], hf["median_tokens_per_s"]),
            "decode_tokens_per_s": _ratio(tl["median_decode_tokens_per_s"],
                                          hf["median_decode_tokens_per_s"]),
        }
    tl = system_results["tokenlean"]
    speedups = {name: {"tokens_per_s": _ratio(tl["median_tokens_per_s"], s["median_tokens_per_s"]),
                       "decode_tokens_per_s": _ratio(tl["median_decode_tokens_per_s"],
                                                     s["median_decode_tokens_per_s"])}
                for name, s in system_results.items() if name != "tokenlean"}
    from tokenlean.bench.bandwidth import add_bandwidth

    bandwidth = add_bandwidth(system_results, lm.model, device,
                              {label: row.path for label, (row, _) in llama_peers.items()})
    llc = bandwidth["last_level_cache_bytes"]
    small = [n for n, s in system_results.items() if llc and s["weight_bytes_per_token"] <= llc]
    if small:
        notes.append(f"the weights of {', '.join(small)} fit in the {llc >> 20} MiB last-level "
                     "cache: read partly from it, their GB/s can pass the measured bandwidths")

    machine = machine_info(device)
    load_avg = machine.get("load_average_1m_at_start")
    if load_avg is not None and device.type == "cpu" and load_avg > 0.5:
        notes.append(f"1-minute load average was {load_avg} at the start: other processes "
                     "competed for the CPU, so these figures are only indicative")
        cpus = machine.get("cpu_count") or 1
        if load_avg + machine["threads"] > cpus and machine["threads"] > 1:
            notes.append(f"{machine['threads']} threads on {cpus} busy CPUs: oversubscribed "
                         "threads slow both systems unevenly; compare with --threads 1")
    result = {
        **run_header("decode", _command(args, lm.name), started, machine, lm),
        "setup": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "prompts": len(prompts),
            "prompt_tokens": n_prompt,
            "max_new_tokens": n_new,
            "repeats": args.repeats,
            "warmup": "one generation per system on prompt 0, excluded",
            "order": "systems alternate which runs first, prompt by prompt",
            "prompt_source": "held-out stdlib modules (tokenlean.zoo.corpus), round-robin windows",
        },
        "systems": system_results,
        "speedup": speedup,
        "speedups": speedups,
        "bandwidth": bandwidth,
        "llama_cpp": ({"llama_cpp_python": lcpp.llama_cpp_version(), "limits": lcpp.LIMITS}
                      if llama_peers else None),
        "exact": exact,
        "per_prompt": per_prompt,
        "notes": notes,
    }
    path = write_json(result, args.out, "decode", started)
    print_decode_table(result, path)
    result["json_path"] = str(path)
    return result
