"""kvpress (NVIDIA's KV-cache compression library) as a peer of `tokenlean bench kv`.

kvpress pins transformers < 5.3 while tokenlean runs on transformers 5.x, so kvpress
lives in a virtual environment of its own and runs there as a separate process:
`bench/kvpress_worker.py`, a standalone script (torch, transformers, kvpress and the
standard library only). This module imports neither kvpress nor transformers: it writes
a request JSON (the checkpoint folder, the presses, the budgets and the samples as token
ids from tokenlean's tokenizer, so both sides see exactly the same tokens), runs the
worker with that environment's python, passes its progress lines through and reads the
result rows back.

Where the environment is: `TOKENLEAN_KVPRESS_PYTHON` (the python executable), else
`<tokenlean_home()>/venvs/kvpress/bin/python` (`TOKENLEAN_HOME`, default
~/.cache/tokenlean). `setup_command()` prints the commands that create it.

The protocol is kvpress's pipeline (see the worker's docstring): the press compresses
the context at prefill, the question is fed afterwards on the compressed cache, then
greedy decoding. A budget is the fraction kept; kvpress's `compression_ratio` is the
fraction removed (1 - budget). Head-wise presses (AdaKV, DuoAttention) only mask keys
in kvpress: their rows report `kv_bytes` of the whole cache, `kv_entries_effective` of
the unmasked entries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from tokenlean.errors import UserError

WORKER = Path(__file__).with_name("kvpress_worker.py")
KVPRESS_VERSION = "0.5.5"  # the release the worker's protocol was read from
ENV_VAR = "TOKENLEAN_KVPRESS_PYTHON"
# the presses `tokenlean bench kv` runs by default; short names resolve in the worker
PRESSES = ("full", "streaming_llm", "snapkv", "observed_attention", "tova", "knorm",
           "expected_attention", "adakv_snapkv", "duo_attention")


def default_venv() -> Path:
    from tokenlean.zoo import tokenlean_home

    return tokenlean_home() / "venvs" / "kvpress"


def kvpress_python() -> Path | None:
    """The kvpress environment's python: $TOKENLEAN_KVPRESS_PYTHON, else the default venv's;
    None when that file does not exist."""
    given = os.environ.get(ENV_VAR)
    path = Path(given).expanduser() if given else default_venv() / "bin" / "python"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def setup_command(venv: str | Path | None = None) -> str:
    """The shell command that creates the kvpress environment, with tokenlean's torch
    release (the same kernels on both sides; pip then does not pull another build)."""
    venv = Path(venv) if venv else default_venv()
    torch_release = torch.__version__.split("+")[0]
    return (f"python3 -m venv {venv} && {venv}/bin/pip install torch=={torch_release} "
            f"kvpress=={KVPRESS_VERSION}")


def missing_env_message(python: Path | str | None = None) -> str:
    where = python or os.environ.get(ENV_VAR) or default_venv() / "bin" / "python"
    return (f"the kvpress peer needs kvpress in a virtual environment of its own, not found at "
            f"{where}: create it with `{setup_command()}` (or set {ENV_VAR})")


def _resolve_python(python: str | Path | None) -> Path:
    if python is not None:
        path = Path(python).expanduser()
        if not path.is_file():
            raise UserError(missing_env_message(path))
        return path
    path = kvpress_python()
    if path is None:
        raise UserError(missing_env_message())
    return path


def _sample_json(sample) -> dict:
    data = sample.to_json() if hasattr(sample, "to_json") else dict(sample)
    out = {k: data[k] for k in ("task", "context_ids", "question_ids", "answers",
                                "context_tokens") if k in data}
    if data.get("max_new_tokens"):
        out["max_new_tokens"] = int(data["max_new_tokens"])
    out["context_ids"] = [int(i) for i in out["context_ids"]]
    out["question_ids"] = [int(i) for i in out["question_ids"]]
    return out


def _stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_worker(request: dict, python: str | Path | None = None,
               progress: Callable[[str], None] | None = _stderr_progress,
               timeout: float | None = None) -> dict:
    """Run the worker on `request`; its result JSON. Each stderr line goes to `progress`
    (None: kept quiet); a failure is a UserError carrying the worker's last line."""
    exe = _resolve_python(python)
    with tempfile.TemporaryDirectory(prefix="tokenlean-kvpress-") as tmp:
        req_path, res_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps(request))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        if request.get("threads"):
            env["OMP_NUM_THREADS"] = str(request["threads"])
        # -I: no user site, no PYTHON* variables, not the script's folder on sys.path
        cmd = [str(exe), "-I", str(WORKER), str(req_path), str(res_path)]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, env=env)
        except OSError as e:
            raise UserError(f"cannot run the kvpress python {exe}: {e.strerror or e}") from None
        tail: deque[str] = deque(maxlen=20)
        try:
            for line in proc.stderr:
                line = line.rstrip()
                if not line:
                    continue
                tail.append(line)
                if progress is not None:
                    progress(line)
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise UserError(f"the kvpress worker ran past {timeout:g} s and was stopped") from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if rc != 0 or not res_path.is_file():
            last = next((t for t in reversed(tail) if t.startswith("kvpress worker:")),
                        tail[-1] if tail else f"exit status {rc}")
            raise UserError(f"the kvpress peer failed: {last.removeprefix('kvpress worker: ')}")
        return json.loads(res_path.read_text())


def _press_specs(presses: Iterable) -> list[dict]:
    specs = []
    for p in presses:
        if isinstance(p, str):
            specs.append({"name": p, "args": {}})
        else:
            specs.append({"name": p["name"], "args": dict(p.get("args") or {})})
    return specs


def run_kvpress_peer(samples: Iterable, model_folder: str | Path,
                     presses: Iterable = PRESSES, budgets: Iterable[float] = (0.25, 0.5),
                     max_new_tokens: int = 32, threads: int | None = None,
                     python: str | Path | None = None,
                     progress: Callable[[str], None] | None = _stderr_progress,
                     dtype: str = "float32", device: str = "cpu",
                     eos_ids: Iterable[int] | None = None, repeats: int = 1,
                     warmup: bool = True, duo_patterns: dict | None = None,
                     timeout: float | None = None) -> list[dict]:
    """kvpress on `samples` (KVSample objects or dicts with task, context_ids,
    question_ids, answers, context_tokens, optional max_new_tokens), every press at every
    budget (fraction kept; the full cache once). One dict per (press, budget, sample):
    press, press_class, budget, compression_ratio, sample, task, generated_ids, prefill_s,
    question_s, decode_s_per_token, kv_bytes, kv_entries, kv_entries_effective, ... ; or
    one per (press, budget) with `skipped` (a reason), and `error` on a sample that failed.

    `presses`: short names (PRESSES), kvpress class names, 'Wrapper:Scorer', or dicts
    {"name", "args"}. `eos_ids`: None stops at the checkpoint's EOS, [] never stops.
    `duo_patterns`: {"sink_size", "recent_size", "head_scores": [[per KV head] per layer]}
    lets DuoAttentionPress run with given head scores (it cannot fetch its own offline).
    """
    folder = Path(model_folder).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise UserError(f"the kvpress peer needs a Hugging Face checkpoint folder: "
                        f"no config.json in {folder}")
    budgets = [float(b) for b in budgets]
    bad = [b for b in budgets if not 0 < b <= 1]
    if bad:
        raise UserError(f"kvpress budgets are fractions kept in (0, 1], got {bad[0]:g}")
    request = {
        "mode": "bench", "model": str(folder), "dtype": dtype, "device": device,
        "threads": threads, "max_new_tokens": int(max_new_tokens),
        "eos_ids": None if eos_ids is None else [int(i) for i in eos_ids],
        "repeats": int(repeats), "warmup": bool(warmup), "presses": _press_specs(presses),
        "budgets": budgets, "samples": [_sample_json(s) for s in samples],
        "duo_patterns": duo_patterns,
    }
    result = run_worker(request, python, progress, timeout)
    info = result.get("info", {})
    return [{**row, "kvpress": info.get("kvpress"), "transformers": info.get("transformers")}
            for row in result["rows"]]


def duo_patterns(calibration: dict) -> dict:
    """kvpress DuoAttentionPress patterns from tokenlean's duo calibration (kv/calibrate.py:
    {"sinks", "recent", "scores"}; high score = retrieval head in both), so that kvpress's
    DuoAttention runs offline on the same head split as tokenlean's `duo` policy."""
    return {"sink_size": int(calibration["sinks"]), "recent_size": int(calibration["recent"]),
            "head_scores": calibration["scores"]}


def kvpress_selection(model_folder: str | Path, input_ids: list[int], presses: Iterable[dict],
                      python: str | Path | None = None, threads: int | None = 1) -> list[dict]:
    """The positions kvpress keeps when it prefills `input_ids`: for each {"name", "ratio",
    "args"}, {"name", "press_class", "ratio", "layers": [[sorted kept positions per KV
    head] per layer]}. For comparing tokenlean's selection rules with kvpress's."""
    request = {"mode": "selection", "model": str(Path(model_folder).expanduser().resolve()),
               "input_ids": [int(i) for i in input_ids], "threads": threads,
               "presses": [{"name": p["name"], "ratio": float(p["ratio"]),
                            "args": dict(p.get("args") or {})} for p in presses]}
    return run_worker(request, python, progress=None)["selections"]


def kvpress_info(python: str | Path | None = None) -> dict:
    """Versions in the kvpress environment: kvpress, transformers, torch, python."""
    return run_worker({"mode": "info"}, python, progress=None)["info"]
