"""Hugging Face `config.json` -> one dataclass covering the Llama family."""

from __future__ import annotations

import json
import math
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

# Fields that size tensors or a loop: a checkpoint with a nonsense value must fail here,
# in one line naming the field, not as a torch traceback deep in the model.
POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a count


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


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
        self._check_values()
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise UserError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of "
                    f"num_attention_heads ({self.num_attention_heads}), or head_dim must be set"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:  # rotary embeddings rotate pairs of dimensions
            raise UserError(f"head_dim must be even, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    def _check_values(self) -> None:
        """Types and ranges of the fields, each error naming its field."""
        for name in POSITIVE_INTS:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        for name in POSITIVE_FLOATS:
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise UserError(f"{name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        if not _is_int(self.head_dim) or self.head_dim < 0:
            raise UserError(f"head_dim must be a positive integer, got {self.head_dim!r}")
        if self.sliding_window is not None and (
                not _is_int(self.sliding_window) or self.sliding_window <= 0):
            raise UserError(
                f"sliding_window must be a positive integer, got {self.sliding_window!r}")
        for name in ("tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.bos_token_id is not None and (not _is_int(self.bos_token_id)
                                              or self.bos_token_id < 0):
            raise UserError(f"bos_token_id must be a token id, got {self.bos_token_id!r}")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if self.eos_token_id is not None and not all(_is_int(i) and i >= 0 for i in eos):
            raise UserError(
                f"eos_token_id must be a token id or a list of them, got {self.eos_token_id!r}")
        factor = (self.rope_scaling or {"factor": 1.0}).get("factor")
        if not _is_number(factor) or factor <= 0:
            raise UserError(f"rope_scaling.factor must be a positive number, got {factor!r}")

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        if not isinstance(hf, dict):
            raise UserError(f"the config must be a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_FAMILIES:
            raise UserError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        defaults = SUPPORTED_FAMILIES[model_type]
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise UserError(f"rope_parameters/rope_scaling must be a JSON object, got {rope!r}")
        rope = dict(rope)
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
        # transformers' rule: no num_key_value_heads means one KV head per query head
        if "num_attention_heads" in kwargs:
            kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
        kwargs.update(
            model_type=model_type,
            rope_theta=rope_theta,  # checked (and made a float) by __post_init__
            rope_scaling=rope_scaling,
            sliding_window=sliding,
            attention_bias=(defaults.get("attention_bias", False)
                            if hf.get("attention_bias") is None else hf["attention_bias"]),
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
        try:
            return cls.from_hf(hf)
        except UserError as e:  # name the file: the user has to go and edit it
            raise UserError(f"bad model config {path}: {e}") from None

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
