"""Hugging Face `config.json` -> one dataclass covering the Llama family."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenlean.errors import UserError

# model_type -> family defaults that differ from Llama.
SUPPORTED_FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
}


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_FAMILIES:
            raise UserError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        defaults = SUPPORTED_FAMILIES[model_type]
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        if rope_scaling and rope_type not in ("linear", "llama3"):
            raise UserError(f"unsupported rope scaling {rope_type!r}; supported: linear, llama3")
        sliding = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            sliding = None
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra",)}
        kwargs = {k: hf[k] for k in known if k in hf and hf[k] is not None}
        kwargs.update(
            model_type=model_type,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            sliding_window=sliding,
            attention_bias=hf.get("attention_bias", defaults.get("attention_bias", False)),
            qk_norm=defaults.get("qk_norm", False),
            head_dim=hf.get("head_dim") or 0,
        )
        return cls(**kwargs, extra={k: v for k, v in hf.items() if k not in known})

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        try:
            hf = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read model config {path}: {e}") from None
        return cls.from_hf(hf)

    def to_hf(self) -> dict:
        """A config.json that transformers loads as the same architecture."""
        d = {k: v for k, v in asdict(self).items() if k not in ("extra", "qk_norm")}
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        if d["sliding_window"] is None:
            del d["sliding_window"]
        d["architectures"] = [
            {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        ]
        d["hidden_act"] = "silu"
        return d
