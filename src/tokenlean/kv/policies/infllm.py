"""InfLLM (in progress: being written this session)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenlean.errors import UserError
from tokenlean.kv.policy import CachePolicy


class InfLLM(CachePolicy):
    name = "infllm"
    summary = "(not yet implemented)"
    paper = "-"
    decode_time = True

    @dataclass
    class Params:
        pass

    def prefill(self, model, cache, prompt, room):
        raise UserError(f"kv policy {self.name!r} is not implemented yet")
