"""llama.cpp as a peer, through llama-cpp-python; `llama_cpp` is imported here only, lazily.

`LlamaCppPeer` runs greedy decoding from token ids (tokenizers play no part) on a GGUF
file: exactly `max_new_tokens` tokens, EOS not stopping, no sampling penalties. With
`lookup=N` it drafts with the binding's `LlamaPromptLookupDecoding(num_pred_tokens=N)`
(prompt lookup decoding; the draft is verified in one forward, a chain, not a tree).

Fairness: `Llama.generate` reuses the KV cache of the longest prompt prefix it saw in
the previous call; the peer resets the model and clears the KV cache before every
generation, so each timed run does its whole prefill, like the other systems.

Which GGUF (`plan_gguf_models`): for a checkpoint folder, `<folder>/gguf/model-F32.gguf`
and `model-F16.gguf` when present (the same weights; F16 rounds them), else ones written
once by tokenlean's GGUF writer into `tokenlean_home()/gguf/<name>-<weights digest>/`;
and every `<folder>/gguf/original-*.gguf` (the model as its publisher quantized it:
different weights). A `--model FILE.gguf` is used as it is.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tokenlean.errors import UserError

INSTALL_HINT = "pip install 'tokenlean[llamacpp]' (builds llama.cpp, minutes)"
GGUF_DTYPES = ("F32", "F16")


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"the llama.cpp peer needs llama-cpp-python: {INSTALL_HINT}") from None
    return llama_cpp


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python's version, or None when it cannot be imported."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


class LlamaCppPeer:
    name = "llama.cpp"

    def __init__(self, gguf_path: str | Path, threads: int, context: int,
                 lookup: int | None = None, kv_type: str | None = None):
        """`kv_type` 'F32' or 'F16' (default: F32 for an F32 file, else llama.cpp's F16)."""
        llama_cpp = import_llama_cpp()
        self.path = Path(gguf_path)
        self.version = getattr(llama_cpp, "__version__", "unknown")
        self.file_type = gguf_file_type(self.path)
        self.kv_type = kv_type or ("F32" if self.file_type == "F32" else "F16")
        ggml_type = {"F32": llama_cpp.GGML_TYPE_F32, "F16": llama_cpp.GGML_TYPE_F16}[self.kv_type]
        draft = None
        self.lookup = None
        if lookup is not None:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup)  # its default n-gram size
            self.lookup = {"num_pred_tokens": draft.num_pred_tokens,
                           "max_ngram_size": draft.max_ngram_size}
        self.threads, self.context = threads, context
        # llama.cpp pads n_ctx to a multiple of 256, the binding's token buffer is n_ctx long
        # and its draft cap uses the padded size: past the buffer's end near a full context
        # (a ValueError in eval). A padded n_ctx, with room for one more draft, avoids it.
        n_ctx = -(-(context + (lookup or 0) + 1) // 256) * 256
        try:
            # n_batch = n_ctx: a prefill or a verification is one eval, one forward.
            self.llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                n_threads_batch=threads, type_k=ggml_type, type_v=ggml_type,
                draft_model=draft, verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"llama.cpp cannot load {self.path}: {first}") from None
        # Target forward passes: every Llama.eval (one llama_decode of the whole batch,
        # n_batch being the context) is counted, so MAT = new tokens / forwards.
        self.forwards = 0
        self.last_forwards = 0
        self.last_prefill_s: float | None = None
        self.last_eval_sizes: list[int] = []  # tokens per forward; [0] = the prefill's
        evaluate = self.llm.eval

        def counted_eval(tokens):
            self.forwards += 1
            self.last_eval_sizes.append(len(tokens))
            return evaluate(tokens)

        self.llm.eval = counted_eval

    def settings(self) -> dict:
        """What the JSON records about this peer."""
        llm = self.llm
        return {"llama_cpp_python": self.version, "gguf": str(self.path),
                "file_type": self.file_type, "kv_cache_type": self.kv_type,
                "n_ctx": llm.n_ctx(), "n_batch": llm.n_batch, "threads": self.threads,
                "n_ubatch": llm.context_params.n_ubatch,
                "flash_attn": "disabled (the binding's default, flash_attn=False)",
                "prompt_lookup": self.lookup}

    def clear(self) -> None:
        """Forget the previous generation: no prompt-prefix reuse, an empty KV cache."""
        self.llm.reset()  # n_tokens = 0: generate() then skips its prefix-match search
        ctx = getattr(self.llm, "_ctx", None)
        if ctx is not None and hasattr(ctx, "kv_cache_clear"):
            ctx.kv_cache_clear()

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        """Greedy continuation of exactly `max_new_tokens` ids, and its wall time; sets
        `last_forwards` and `last_prefill_s` (time to the first new token)."""
        if len(prompt_ids) + max_new_tokens > self.context:
            raise UserError(f"llama.cpp peer: {len(prompt_ids)} prompt + {max_new_tokens} new "
                            f"tokens exceed its context of {self.context}")
        self.clear()
        forwards = self.forwards
        self.last_eval_sizes = []
        new: list[int] = []
        t0 = time.perf_counter()
        tokens = self.llm.generate(list(prompt_ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                   repeat_penalty=1.0, frequency_penalty=0.0,
                                   presence_penalty=0.0, reset=True)
        for token in tokens:
            if not new:
                self.last_prefill_s = time.perf_counter() - t0
            new.append(int(token))
            if len(new) == max_new_tokens:
                break
        tokens.close()
        elapsed = time.perf_counter() - t0
        self.last_forwards = self.forwards - forwards
        if len(new) != max_new_tokens:
            raise RuntimeError(f"llama.cpp generated {len(new)} tokens, "
                               f"{max_new_tokens} were asked for")
        return new, elapsed

    def close(self) -> None:
        self.llm.close()


# ---- GGUF files ----

def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # not a GGUF, truncated, ...
        raise UserError(f"cannot read GGUF {path}: {type(e).__name__}: {e}") from None


def gguf_file_type(path: Path) -> str:
    """'F32', 'F16', 'Q4_1', ...: general.file_type, else the most common tensor type."""
    import gguf

    reader = _reader(path)
    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (ValueError, IndexError):
            pass
    types = [t.tensor_type.name for t in reader.tensors if len(t.shape) > 1]
    return max(set(types), key=types.count) if types else "unknown"


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the tensors one decoded token reads, in the file's own encoding: every
    tensor once; with a separate `output.weight`, `token_embd` counts one row (the lookup)."""
    tensors = {t.name: t for t in _reader(path).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    embd = tensors.get("token_embd.weight")
    if embd is not None and "output.weight" in tensors:
        rows = int(embd.shape[-1])  # GGUF shapes are (n_embd, n_vocab)
        total -= int(embd.n_bytes) - int(embd.n_bytes) // rows
    return total


@dataclass
class GgufModel:
    label: str  # the row's name: 'llama.cpp F32'
    path: Path | None  # None: skipped (see `note`)
    file_type: str
    same_weights: bool  # the checkpoint's own weights (F16: rounded to f16)
    source: str  # where the file came from
    note: str | None = None

    def to_json(self) -> dict:
        return {"gguf": str(self.path) if self.path else None, "file_type": self.file_type,
                "same_weights": self.same_weights, "source": self.source,
                "weights": ("the same weights" + (" rounded to f16" if self.file_type == "F16"
                                                  else "")) if self.same_weights
                else "different weights: the publisher's own quantization"}


def gguf_cache_dir(name: str, folder: Path) -> Path:
    from tokenlean.bench.report import weights_digest
    from tokenlean.zoo import tokenlean_home

    safe = name.replace("/", "--").replace(os.sep, "--").strip(".-") or "model"
    return tokenlean_home() / "gguf" / f"{Path(safe).name}-{weights_digest(folder)}"


def _write(folder: Path, out: Path, dtype: str) -> str | None:
    """Write `out` with tokenlean's GGUF writer; None, or why it could not."""
    try:
        from tokenlean.model.gguf_write import write_gguf
    except ImportError:
        return "tokenlean's GGUF writer (tokenlean.model.gguf_write) is not available"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.stem + ".partial.gguf")
    print(f"tokenlean: writing {dtype} GGUF for llama.cpp to {out} (once; reused next time)",
          file=sys.stderr, flush=True)
    try:
        write_gguf(folder, partial, dtype)
    except UserError as e:
        partial.unlink(missing_ok=True)
        return str(e)
    os.replace(partial, out)
    return None


def plan_gguf_models(folder: str | Path, name: str, dtypes=GGUF_DTYPES, originals: bool = True,
                     write: bool = True) -> list[GgufModel]:
    """The llama.cpp rows for a model: the same weights in each of `dtypes` ('F32', 'F16'),
    then the publisher's `original-*.gguf` files. A row without a file has `path` None and
    says why in `note`."""
    folder = Path(folder)
    if folder.is_file():  # lm.folder of a --model FILE.gguf
        kind = gguf_file_type(folder)
        return [GgufModel(f"llama.cpp {kind}", folder, kind, True, "the --model file")]
    rows = []
    for dtype in dtypes:
        label = f"llama.cpp {dtype}"
        shipped = folder / "gguf" / f"model-{dtype}.gguf"
        if shipped.is_file():
            rows.append(GgufModel(label, shipped, dtype, True, "the model folder's gguf/"))
            continue
        cached = gguf_cache_dir(name, folder) / f"model-{dtype}.gguf"
        why = None
        if not cached.is_file():
            why = _write(folder, cached, dtype) if write else "not written (write=False)"
        if why is None:
            rows.append(GgufModel(label, cached, dtype, True, "written by tokenlean's GGUF writer"))
        else:
            rows.append(GgufModel(label, None, dtype, True, "none",
                                  note=f"{label}: skipped, no GGUF of this model ({why}); put "
                                       f"one at {shipped}"))
    if originals:
        for path in sorted((folder / "gguf").glob("original-*.gguf")):
            kind = path.stem.removeprefix("original-")
            rows.append(GgufModel(f"llama.cpp {kind} (original, different weights)", path, kind,
                                  False, "the model folder's gguf/ (as its publisher "
                                         "quantized it)"))
    return rows


# ---- the benchmarks' side ----

def wanted(mode: str, device_type: str = "cpu") -> tuple[bool, str | None]:
    """--llama-cpp auto|on|off -> (run the llama.cpp rows, a note when auto skips them)."""
    if mode == "off":
        return False, None
    if device_type != "cpu":
        why = f"this llama-cpp-python runs on the CPU and the run is on {device_type}"
        if mode == "on":
            raise UserError(f"--llama-cpp on: {why}; use --device cpu")
        return False, f"llama.cpp: skipped, {why}"
    if llama_cpp_version() is None:
        if mode == "on":
            import_llama_cpp()  # the install hint, as a UserError
        return False, f"llama.cpp: skipped, llama-cpp-python is not installed ({INSTALL_HINT})"
    return True, None


def load_peers(rows: list[GgufModel], threads: int, context: int,
               lookup: int | None = None) -> tuple[dict[str, tuple[GgufModel, LlamaCppPeer]],
                                                    list[str]]:
    """{label: (row, peer)} for the rows that have a file, and the notes of those that do not."""
    peers, notes = {}, []
    for row in rows:
        if row.path is None:
            notes.append(row.note)
            continue
        peers[row.label] = (row, LlamaCppPeer(row.path, threads, context, lookup=lookup))
    return peers, notes


METHOD = ("llama_cpp.Llama(n_ctx, n_batch=n_ctx, n_threads=n_threads_batch=threads, "
          "type_k=type_v=F32 for an F32 file else F16).generate(prompt ids, top_k=1, temp=0, "
          "repeat_penalty=1) cut at max_new_tokens (EOS does not stop it); reset() and KV "
          "cache cleared before every generation (no prompt-prefix reuse); prefill = time to "
          "the first new token, decode = (N - 1) / (t_N - t_1)")

LIMITS = [
    "llama-cpp-python's speculative decoding verifies one chain (draft_model), never a tree",
    "its prompt lookup (LlamaPromptLookupDecoding) takes num_pred_tokens and max_ngram_size "
    "(default 2, kept here); like transformers' it continues the first (oldest) match",
    "with a draft model it sets logits_all=True: every evaluated position's logits (the "
    "prompt's included) are computed and copied to Python",
    "no forward counter in the API: tokenlean counts calls of Llama.eval (n_batch = n_ctx, "
    "so one eval is one llama_decode of the whole batch)",
    "with a draft model and an n_ctx that is not a multiple of 256, drafts near the end of "
    "the context overrun the binding's token buffer (ValueError in eval): the peer pads n_ctx",
    "Llama.generate reuses the KV cache of the longest prompt prefix of the previous call; "
    "the benchmarks reset it before each generation",
]
