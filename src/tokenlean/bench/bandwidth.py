"""Memory bandwidth: what this machine's GEMV reaches, and what each decoder achieves.

Decoding one token reads every weight matrix once (a matrix-vector product per
projection), so at batch 1 decode speed is bounded by memory bandwidth:
    achieved GB/s = weight bytes read per token x decode tokens/s.
The references are measured here, not taken from a datasheet, on torch's current
thread count, one warm-up then the median of timed runs, over >= 256 MB (more than a
CPU's last-level cache): the GEMV bandwidth, one row vector by a matrix in the given
dtype (what a decode step does), with the fastest kernel torch has for it (oneDNN with
a prepacked weight on CPU, else `F.linear`), and the read bandwidth, `torch.sum` of a
float32 vector (closer to what the memory can give; a decoder with better GEMV kernels,
llama.cpp's, can pass 100 % of the GEMV figure). A model smaller than the
last-level cache is read partly from the cache: its GB/s can pass both.
The KV cache, activations and the embedding row lookup are not counted: a lower
bound on the bytes moved, so the fraction is a lower bound too.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

GEMV_MBYTES = 256
GEMV_COLS = 4096
GEMV_REPEATS = 10


def gemv_bandwidth(dtype: torch.dtype, mbytes: int | None = None,
                   repeats: int = GEMV_REPEATS, device: torch.device | str = "cpu") -> dict:
    """{'gb_per_s', 'matrix_bytes', 'shape', 'times_s'}: bytes of the matrix / median time of
    `y = F.linear(x, W)` with x (1, K), W (N, K) of `mbytes` MiB (default GEMV_MBYTES) in
    `dtype`."""
    mbytes = GEMV_MBYTES if mbytes is None else mbytes
    size = torch.empty((), dtype=dtype).element_size()
    rows = max(1, (mbytes << 20) // (GEMV_COLS * size))
    # Constant 0.5, not random: fast to fill, and no denormals to slow the arithmetic.
    weight = torch.full((rows, GEMV_COLS), 0.5, dtype=dtype, device=device)
    x = torch.full((1, GEMV_COLS), 0.5, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if weight.device.type == "cuda" else (lambda: None)
    kernel, gemv = _fastest_gemv(weight, x)
    times = []
    with torch.inference_mode():
        gemv()  # warm-up: page faults, kernel selection
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            gemv()
            sync()
            times.append(time.perf_counter() - t0)
    nbytes = weight.numel() * size
    del weight, gemv
    return {"gb_per_s": round(nbytes / statistics.median(times) / 1e9, 3),
            "matrix_bytes": nbytes, "shape": [rows, GEMV_COLS], "kernel": kernel,
            "times_s": [round(t, 6) for t in times]}


def _fastest_gemv(weight: torch.Tensor, x: torch.Tensor):
    """On CPU, oneDNN with the weight prepacked (tokenlean's own PackedLinear, ~1.7x
    F.linear's bandwidth on the project's VM); F.linear where oneDNN cannot take the dtype
    or the device is not a CPU."""
    from tokenlean.model.packed import PackedLinear

    if weight.device.type == "cpu":
        try:
            packed = PackedLinear(weight, None)
            packed(x)
            return "onednn-prepacked", lambda: packed(x)
        except (RuntimeError, AttributeError):
            pass
    return "F.linear", lambda: F.linear(x, weight)


def read_bandwidth(mbytes: int | None = None, repeats: int = GEMV_REPEATS,
                   device: torch.device | str = "cpu") -> dict:
    """{'gb_per_s', 'bytes', 'times_s'}: bytes / median time of `torch.sum` of a float32
    vector of `mbytes` MiB (default GEMV_MBYTES)."""
    mbytes = GEMV_MBYTES if mbytes is None else mbytes
    x = torch.full(((mbytes << 20) // 4,), 0.5, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = []
    x.sum()  # warm-up
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        x.sum()
        sync()
        times.append(time.perf_counter() - t0)
    nbytes = x.numel() * 4
    del x
    return {"gb_per_s": round(nbytes / statistics.median(times) / 1e9, 3), "bytes": nbytes,
            "times_s": [round(t, 6) for t in times]}


def last_level_cache_bytes() -> int | None:
    """The CPU's largest cache (Linux sysfs), or None."""
    from pathlib import Path

    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            pass
    return max(sizes) if sizes else None


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def model_weight_bytes(model, dtype: torch.dtype | None = None) -> int:
    """Bytes of the weights one decoded token reads in `dtype` (default: the model's).

    Every parameter counts once (a tied embedding is read as the lm_head, once); an
    untied input embedding counts one row, the row looked up. The count is by element,
    not by tensor storage: tokenlean's prepacked projections keep a meta-device
    `weight` of the right shape whose own dtype is meaningless."""
    dtype = dtype or model.dtype
    params = dict(model.named_parameters())  # shared (tied) parameters are listed once
    elements = sum(p.numel() for p in params.values())
    embed = next((p for name, p in params.items() if name.endswith("embed_tokens.weight")), None)
    if embed is not None and len(params) > 1 and _untied(model):
        elements -= embed.numel() - embed.shape[1]
    return elements * dtype_bytes(dtype)


def _untied(model) -> bool:
    config = getattr(model, "config", None)
    return not getattr(config, "tie_word_embeddings", True)


def achieved(weight_bytes: int | None, decode_tokens_per_s: float | None,
             reference_gb_per_s: float | None) -> tuple[float | None, float | None]:
    """(achieved GB/s, fraction of the reference GEMV bandwidth)."""
    if weight_bytes is None or not decode_tokens_per_s:
        return None, None
    gbs = weight_bytes * decode_tokens_per_s / 1e9
    fraction = round(gbs / reference_gb_per_s, 4) if reference_gb_per_s else None
    return round(gbs, 3), fraction


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def add_bandwidth(system_results: dict, model, device, gguf_files: dict | None = None) -> dict:
    """Measure the GEMV bandwidth of the dtypes in play (float32, bfloat16, the run's, and
    float16 for an F16 GGUF) and the read bandwidth, and add to each system of
    `system_results`: weight bytes per token, achieved GB/s (from its median decode tok/s),
    and the fractions of the same dtype's GEMV bandwidth and of the read bandwidth.
    `gguf_files`: {system: path} for the llama.cpp rows, whose bytes are their GGUF
    tensors'. Returns {"gemv": {dtype: measurement}, "read": measurement, ...}."""
    from tokenlean.bench.llama_cpp import gguf_weight_bytes

    gguf_files = gguf_files or {}
    dtypes = [torch.float32, torch.bfloat16]
    if model.dtype not in dtypes:
        dtypes.append(model.dtype)
    if torch.float16 not in dtypes and any(system_results[n].get("file_type") == "F16"
                                           for n in gguf_files):
        dtypes.append(torch.float16)
    gemv = {_name(dt): gemv_bandwidth(dt, device=device) for dt in dtypes}
    gemv_method = (f"y = x W^T, x (1, {GEMV_COLS}), W (N, {GEMV_COLS}) of {GEMV_MBYTES} MiB, "
                   "oneDNN prepacked on CPU (else F.linear), "
                   f"on {torch.get_num_threads()} threads, "
                   f"one warm-up, median of {GEMV_REPEATS}; matrix bytes / time")
    read = read_bandwidth(device=device)
    own = model_weight_bytes(model)
    for name, s in system_results.items():
        if name in gguf_files:
            nbytes = gguf_weight_bytes(gguf_files[name])
            ref = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(s.get("file_type"))
        else:
            nbytes, ref = own, _name(model.dtype)
        gbs, fraction = achieved(nbytes, s.get("median_decode_tokens_per_s"),
                                 gemv[ref]["gb_per_s"] if ref in gemv else None)
        s |= {"weight_bytes_per_token": nbytes, "achieved_gb_per_s": gbs,
              "gemv_reference": ref, "fraction_of_gemv": fraction,
              "fraction_of_read": round(gbs / read["gb_per_s"], 4) if gbs is not None else None}
    llc = last_level_cache_bytes() if torch.device(device).type == "cpu" else None
    return {"gemv": gemv, "gemv_method": gemv_method, "read": read,
            "read_method": f"torch.sum of a float32 vector of {GEMV_MBYTES} MiB, one warm-up, "
                           f"median of {GEMV_REPEATS}; bytes / time",
            "last_level_cache_bytes": llc,
            "weights_not_counted": "KV cache, activations, the embedding row lookup"}
