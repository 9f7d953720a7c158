"""Write a Hugging Face checkpoint folder as a GGUF file, so llama.cpp runs the same weights.

`gguf.GGUFWriter` writes the file; what is ours is what llama.cpp's convert_hf_to_gguf.py
would write for these families: the hparams it requires, q/k rows interleaved for Llama,
norms and biases in F32 (llama.cpp wants 1-D tensors F32), the tokenizer as metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, LlamaFileType, RopeScalingType, TokenType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

from tokenlean.errors import UserError
from tokenlean.model import gguf_names as names
from tokenlean.model.config import ModelConfig
from tokenlean.model.gguf_read import LLAMA3_SPLIT, QWEN2_SPLIT
from tokenlean.model.load import read_state_dict
from tokenlean.model.tokenizer import Tokenizer
from tokenlean.model.transformer import rope_inv_freq

# dtype -> (the type of 2-D weights, general.file_type)
WRITE_TYPES = {
    "F32": (Q.F32, LlamaFileType.ALL_F32),
    "F16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "Q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "Q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}


def write_gguf(folder: str | Path, out: str | Path, dtype: str = "F16") -> Path:
    """`folder` (config.json + safetensors + tokenizer.json ...) -> the GGUF file `out`.

    Written to `out.tmp` and renamed, so an interrupted write leaves nothing under `out`.
    `dtype` is the type of the 2-D weights: F32, F16, or a block quantization (Q8_0, Q4_0, ...;
    a weight whose rows do not split into blocks stays F16, as llama.cpp does).
    """
    folder, out = Path(folder), Path(out)
    if dtype not in WRITE_TYPES:
        raise UserError(f"unknown GGUF dtype {dtype!r}; use one of: {', '.join(WRITE_TYPES)}")
    config = ModelConfig.from_file(folder / "config.json")
    tokenizer = Tokenizer(folder)
    state = read_state_dict(folder)
    # llama.cpp has no "mistral" architecture: Mistral is written as llama (and named so)
    arch = config.model_type if config.model_type in ("qwen2", "qwen3") else "llama"
    tmp = out.with_name(out.name + ".tmp")
    writer = GGUFWriter(tmp, arch)
    try:
        _write_hparams(writer, arch, config, folder.name, WRITE_TYPES[dtype][1])
        _write_tokenizer(writer, tokenizer, config)
        _write_tensors(writer, arch, config, state, WRITE_TYPES[dtype][0])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out


def _write_hparams(w: GGUFWriter, arch: str, c: ModelConfig, name: str, file_type) -> None:
    if c.model_type == "mistral" and "mistral" not in name.lower():
        name = f"mistral-{name}"  # how readers (ours, transformers) tell Mistral from Llama
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(2)  # GGML_QNT_VERSION
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if c.sliding_window and c.model_type == "mistral":
        w.add_sliding_window(c.sliding_window)
    kind = (c.rope_scaling or {}).get("rope_type")
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling["factor"])
    # llama3 scaling goes as the rope_freqs tensor (_write_tensors), as llama.cpp writes it


def _pre_tokenizer(tok_json: dict) -> str:
    """The llama.cpp `pre` name for this tokenizer.json's pre-tokenizer (tl-code's own BPE is
    plain GPT-2 ByteLevel: "gpt-2"). Any other gets "default", which llama.cpp accepts but
    splits differently: benchmarks feed token ids, so it only matters for text prompts."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp refuses "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}.get(regex, "default")
    return "default"


def _write_tokenizer(w: GGUFWriter, tokenizer: Tokenizer, c: ModelConfig) -> None:
    tok_json = json.loads(tokenizer.tok.to_str())
    model = tok_json.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(tok_json.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise UserError("write_gguf supports byte-level BPE tokenizers only "
                        f"(this one is {model.get('type')}, decoder {tok_json.get('decoder')})")
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    added = {t.content: t for t in tokenizer.tok.get_added_tokens_decoder().values()}
    size = max(c.vocab_size, max(vocab.values()) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [TokenType.UNUSED] * size
    for text, i in vocab.items():  # ids the tokenizer leaves out stay as llama.cpp's padding
        tokens[i] = text
        types[i] = (TokenType.NORMAL if text not in added else
                    TokenType.CONTROL if added[text].special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tok_json))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    def token_id(text, fallback):
        i = tokenizer.tok.token_to_id(text) if text else None
        return fallback if i is None else i

    bos = token_id(tokenizer.bos_token, c.bos_token_id)
    eos = token_id(tokenizer.eos_token, (c.eos_ids or [None])[0])
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    # a second stop id (an end of turn like <|im_end|>) as llama.cpp's end-of-turn token
    eot = next((i for i in tokenizer.eos_ids if i != eos), None)
    if eot is not None:
        w.add_eot_token_id(eot)
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    w.add_add_bos_token(bos is not None and full[:1] == [bos] and plain[:1] != [bos])
    w.add_add_eos_token(eos is not None and full[-1:] == [eos] and plain[-1:] != [eos])
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def _write_tensors(w: GGUFWriter, arch: str, c: ModelConfig, state: dict[str, torch.Tensor],
                   qtype: Q) -> None:
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp ties when output.weight is absent
    elif "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    permuted = arch in names.PERMUTED_ARCHITECTURES
    for hf, tensor in state.items():
        if "rotary_emb" in hf:
            continue
        name = names.gguf_name(hf)
        if name is None:
            raise UserError(f"write_gguf: no GGUF name for tensor {hf}")
        x = tensor.detach().float()
        heads = names.qk_heads(hf, c.num_attention_heads, c.num_key_value_heads)
        if permuted and heads:
            x = names.interleave_rows(x, heads)
        _add(w, name, x.numpy(), qtype if x.dim() == 2 else Q.F32)
    if (c.rope_scaling or {}).get("rope_type") == "llama3":
        unscaled = ModelConfig(**{**c.__dict__, "rope_scaling": None, "extra": {}})
        factors = rope_inv_freq(unscaled) / rope_inv_freq(c)  # llama.cpp divides by these
        _add(w, names.ROPE_FREQS, factors.numpy(), Q.F32)


def _add(w: GGUFWriter, name: str, x: np.ndarray, qtype: Q) -> None:
    block = GGML_QUANT_SIZES[qtype][0]
    if qtype not in (Q.F32, Q.F16) and x.shape[-1] % block:
        qtype = Q.F16  # rows that do not split into blocks: llama.cpp's fallback too
    if qtype == Q.F32:
        w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
    elif qtype == Q.F16:
        w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float16))
    else:
        w.add_tensor(name, quantize(np.ascontiguousarray(x, dtype=np.float32), qtype),
                     raw_dtype=qtype)
