"""Read a GGUF file (llama.cpp's format): its config, its weights dequantized, its tokenizer.

The `gguf` package parses the file (`GGUFReader`) and turns quantized blocks into floats
(`gguf.quants.dequantize`). What is ours: llama.cpp's metadata keys -> an HF config dict,
its tensor names -> ours, its q/k row order -> Hugging Face's, and a `tokenizers`
tokenizer rebuilt from the vocabulary and merges the file carries.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from tokenlean.errors import UserError
from tokenlean.model import gguf_names as names
from tokenlean.model.config import ModelConfig

# Storage types we dequantize: the float types and llama.cpp's classic and k-quants.
# IQ*/TQ*/FP4 need importance grids or ternary kernels: refused rather than half-tested.
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# llama.cpp's token types (llama_token_type): 3 control (<|im_end|>), 4 user-defined (<think>).
CONTROL, USER_DEFINED = 3, 4

# The split regexes of the Hugging Face tokenizer.json files these `pre` names stand for.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex


def _split_then_bytes(regex: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=False)])


def _smollm():  # SmolLM/SmolLM2's own tokenizer.json: one digit per token, then GPT-2
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


# tokenizer.ggml.pre -> the pre-tokenizer; "default" is what transformers assumes too.
PRE_TOKENIZERS = {
    "default": _byte_level,
    "gpt-2": _byte_level,  # llama.cpp's spelling (llama-vocab.cpp)
    "gpt2": _byte_level,
    "smollm": _smollm,
    "qwen2": partial(_split_then_bytes, QWEN2_SPLIT),
    "deepseek-r1-qwen": partial(_split_then_bytes, QWEN2_SPLIT),
    "llama-bpe": partial(_split_then_bytes, LLAMA3_SPLIT),
}
IGNORE_MERGES = ("llama-bpe",)  # Llama 3 looks a whole word up before merging (as llama.cpp)


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".gguf" and path.is_file()


class GGUFFile:
    """One parsed GGUF file: `config()`, `state_dict(config, dtype)`, `tokenizer_parts()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path)
        except Exception as e:  # bad magic, truncated, unknown type id: the reader raises anything
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot read {self.path}: not a GGUF file or truncated "
                            f"({detail})") from None
        self.tensor_names = {t.name for t in self.reader.tensors}

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _fail(self, message: str) -> UserError:
        return UserError(f"{self.path}: {message}")

    @property
    def architecture(self) -> str:
        arch = self.get("general.architecture")
        if arch not in names.ARCHITECTURES:
            raise self._fail(f"unsupported GGUF architecture {arch!r}; "
                             f"supported: {', '.join(names.ARCHITECTURES)}")
        return arch

    def config(self) -> ModelConfig:
        arch = self.architecture
        hf = {"model_type": names.model_type(arch, self.get("general.name") or "")}
        for key, hf_key in names.HPARAMS.items():
            value = self.get(f"{arch}.{key}")
            if isinstance(value, list):  # per-layer values (OpenELM-style): ours are uniform
                if len(set(value)) != 1:
                    raise self._fail(f"{arch}.{key} differs between layers; not supported")
                value = value[0]
            if value is not None:
                hf[hf_key] = value
        if "vocab_size" not in hf and "tokenizer.ggml.tokens" in self.reader.fields:
            hf["vocab_size"] = len(self.reader.fields["tokenizer.ggml.tokens"].data)
        rot = self.get(f"{arch}.rope.dimension_count")
        if rot is not None:
            hf.setdefault("head_dim", rot)  # older files give the head size only as this
            if rot != hf["head_dim"]:
                raise self._fail(f"partial rotary embeddings ({rot} of {hf['head_dim']} "
                                 "dimensions) are not supported")
        hf["rope_scaling"] = self._rope_scaling(arch)
        hf["tie_word_embeddings"] = "output.weight" not in self.tensor_names
        hf["attention_bias"] = "blk.0.attn_q.bias" in self.tensor_names
        hf["bos_token_id"] = self.get("tokenizer.ggml.bos_token_id")
        hf["eos_token_id"] = self.get("tokenizer.ggml.eos_token_id")
        if hf["model_type"] == "mistral":  # the one family of ours with a window
            hf["sliding_window"] = self.get(f"{arch}.attention.sliding_window")
        try:
            config = ModelConfig.from_hf(hf)
        except UserError as e:
            raise self._fail(f"bad model metadata: {e}") from None
        if names.ROPE_FREQS in self.tensor_names:
            config.extra["rope_freqs"] = self._tensor(self._by_name(names.ROPE_FREQS)).tolist()
        return config

    def _rope_scaling(self, arch: str) -> dict | None:
        kind = self.get(f"{arch}.rope.scaling.type")
        if kind in (None, "none"):
            return None
        if kind != "linear":
            raise self._fail(f"unsupported rope scaling {kind!r}; supported: linear "
                             "(and llama3's rope_freqs)")
        return {"rope_type": "linear", "factor": float(self.get(f"{arch}.rope.scaling.factor"))}

    def _by_name(self, name: str):
        return next(t for t in self.reader.tensors if t.name == name)

    def _tensor(self, t) -> torch.Tensor:
        values = dequantize(t.data, t.tensor_type)  # float32, shape (rows, cols) as torch wants
        if not values.flags.writeable:  # F32/F16 come back as views of the read-only map
            values = np.array(values)
        return torch.from_numpy(values).float()

    def state_dict(self, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Our parameter names -> tensors in `dtype` (q/k rows back in HF order)."""
        bad = sorted({t.tensor_type.name for t in self.reader.tensors
                      if t.tensor_type not in SUPPORTED_TYPES})
        if bad:
            raise self._fail(f"unsupported tensor type {', '.join(bad)}; supported: "
                             f"{', '.join(q.name for q in SUPPORTED_TYPES)}")
        permuted = self.architecture in names.PERMUTED_ARCHITECTURES
        state, unknown = {}, []
        for t in self.reader.tensors:
            if t.name == names.ROPE_FREQS:
                continue  # read by config()
            hf = names.hf_name(t.name)
            if hf is None:
                unknown.append(t.name)
                continue
            w = self._tensor(t)
            heads = names.qk_heads(hf, config.num_attention_heads, config.num_key_value_heads)
            if permuted and heads:
                w = names.deinterleave_rows(w, heads)
            state[hf] = w.to(dtype)
        if unknown:
            raise self._fail(f"tensors of an architecture we do not load: {unknown[:3]}")
        return state

    def tokenizer_parts(self) -> dict:
        """What `Tokenizer.from_parts` takes: a byte-level BPE `tokenizers.Tokenizer` and the
        chat template, bos/eos text and stop ids."""
        kind = self.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise self._fail(f"unsupported GGUF tokenizer model {kind!r}; supported: gpt2 "
                             "(byte-level BPE)")
        pre = self.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise self._fail(f"unsupported GGUF pre-tokenizer {pre!r}; supported: "
                             f"{', '.join(PRE_TOKENIZERS)}")
        tokens = self.get("tokenizer.ggml.tokens") or []
        types = self.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ")) for m in self.get("tokenizer.ggml.merges") or []]
        tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                     ignore_merges=pre in IGNORE_MERGES))
        tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
        tok.decoder = decoders.ByteLevel()
        # Matched whole in the text, as llama.cpp does; already in the vocab, so ids stay.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == USER_DEFINED])

        def text(key: str) -> str | None:
            i = self.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos = text("tokenizer.ggml.bos_token_id")
        if bos is not None and self.get("tokenizer.ggml.add_bos_token", False):
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, self.get("tokenizer.ggml.bos_token_id"))])
        # llama.cpp stops on each of these (llama_vocab_is_eog)
        stops = [self.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return {"tok": tok, "chat_template": self.get("tokenizer.chat_template"),
                "bos_token": bos, "eos_token": text("tokenizer.ggml.eos_token_id"),
                "eos_ids": [i for i in stops if i is not None]}
