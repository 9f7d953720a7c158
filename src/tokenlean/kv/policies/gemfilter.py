"""GemFilter (in progress: being written this session)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenlean.errors import UserError
from tokenlean.kv.policy import CachePolicy


class GemFilter(CachePolicy):
    name = "gemfilter"
    summary = "(not yet implemented)"
    paper = "-"
    decode_time = False

    @dataclass
    class Params:
        pass

    def prefill(self, model, cache, prompt, room):
        raise UserError(f"kv policy {self.name!r} is not implemented yet")
