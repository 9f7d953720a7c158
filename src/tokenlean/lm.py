"""A loaded model with its tokenizer: what the CLI, the server and the benchmarks hold."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenlean.decode import Generation, GenerationResult, decode_steps
from tokenlean.kv.registry import KVConfig
from tokenlean.model.load import load_checkpoint
from tokenlean.model.tokenizer import Tokenizer
from tokenlean.model.transformer import Transformer
from tokenlean.sampling import SamplingParams
from tokenlean.zoo.resolve import resolve_model


@dataclass
class LM:
    name: str
    folder: Path  # the checkpoint folder, or the .gguf file
    model: Transformer
    tokenizer: Tokenizer
    drafters: dict = field(default_factory=dict, repr=False)  # kept across requests

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def drafter(self, method: str = "greedy", method_args: list[str] | dict | None = None):
        """The drafter for a method, created once per (method, options) and then kept:
        drafters that learn (Token Recycling's matrix) carry over between requests."""
        from tokenlean.spec_decode.registry import make_drafter

        key = (method, repr(sorted(method_args.items()) if isinstance(method_args, dict)
                            else method_args or []))
        if key not in self.drafters:
            self.drafters[key] = make_drafter(method, self, method_args)
        return self.drafters[key]

    def stream(self, prompt: str | list[int], max_new_tokens: int = 128,
               sampling: SamplingParams | None = None, stop: Iterable[str] = (),
               stop_token_ids: Iterable[int] | None = None, method: str = "greedy",
               method_args: list[str] | dict | None = None, kv: KVConfig | None = None,
               question: str | list[int] | None = None) -> Generation:
        """Iterate for text deltas; `.result` is set at the end. `kv`: a cache policy and
        budget (a fresh policy per generation). `question`: fed after the prompt was
        prefilled and compressed (kvpress's protocol), before the first token."""
        drafter = self.drafter(method, method_args)
        policy = kv.make() if kv is not None else None
        return Generation(decode_steps(self, self.encode(prompt), max_new_tokens,
                                       sampling or SamplingParams(), stop, stop_token_ids,
                                       drafter=drafter, method=method, policy=policy,
                                       question_ids=self.encode(question) if question else None))

    def generate(self, prompt: str | list[int], max_new_tokens: int = 128,
                 sampling: SamplingParams | None = None, stop: Iterable[str] = (),
                 stop_token_ids: Iterable[int] | None = None, method: str = "greedy",
                 method_args: list[str] | dict | None = None, kv: KVConfig | None = None,
                 question: str | list[int] | None = None) -> GenerationResult:
        generation = self.stream(prompt, max_new_tokens, sampling, stop, stop_token_ids,
                                 method, method_args, kv, question)
        for _ in generation:
            pass
        return generation.result


def load(name: str | None = None, device: str | None = None, dtype: str | torch.dtype | None = None) -> LM:
    """Load a model and its tokenizer; no name -> the embedded tl-code."""
    name, folder = resolve_model(name)
    model, tokenizer = load_checkpoint(folder, device=device, dtype=dtype)
    model.name = Path(name).name  # what per-model files (duo's calibration) are named after
    return LM(name, folder, model, tokenizer)
