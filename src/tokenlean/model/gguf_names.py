"""What the GGUF reader and writer share: llama.cpp's names <-> Hugging Face's, and the
q/k row order llama.cpp's converter uses for the Llama family."""

from __future__ import annotations

import re

import torch

# general.architecture values we read -> the HF model_type (mistral: see `model_type`).
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

# llama.cpp's convert_hf_to_gguf.py interleaves the q/k rows of these (LlamaModel.permute);
# Qwen2/Qwen3 keep Hugging Face's rotate-half layout.
PERMUTED_ARCHITECTURES = ("llama", "mistral")

# "{arch}.<key>" -> the config.json field it holds.
HPARAMS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)")

# Tensors llama.cpp writes that are no parameter of ours: llama3 RoPE factors (read apart).
ROPE_FREQS = "rope_freqs.weight"


def model_type(architecture: str, name: str) -> str:
    """llama.cpp writes Mistral models as `llama`; transformers tells them apart by name."""
    if architecture == "llama" and "mistral" in name.lower():
        return "mistral"
    return architecture


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown."""
    if m := _GGUF_LAYER.fullmatch(gguf_name):
        part = _LAYER.get(m[2])
        return part and f"model.layers.{m[1]}.{part}.{m[3]}"
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL[base]}.{kind}" if base in _GLOBAL else None


def gguf_name(hf: str) -> str | None:
    """The inverse of `hf_name`."""
    if m := _HF_LAYER.fullmatch(hf):
        part = _LAYER_BACK.get(m[2])
        return part and f"blk.{m[1]}.{part}.{m[3]}"
    base, _, kind = hf.rpartition(".")
    return f"{_GLOBAL_BACK[base]}.{kind}" if base in _GLOBAL_BACK else None


def qk_heads(hf: str, n_heads: int, n_kv_heads: int) -> int | None:
    """How many heads a q or k projection (weight or bias) holds; None for other tensors."""
    if ".self_attn.q_proj." in hf:
        return n_heads
    if ".self_attn.k_proj." in hf:
        return n_kv_heads
    return None


def interleave_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp's interleaved one, per head (as its converter)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def deinterleave_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleave_rows`: llama.cpp's q/k rows back in HF's order."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
