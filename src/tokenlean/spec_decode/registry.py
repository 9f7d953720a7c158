"""Method names -> drafters; `key=value` method options parsed against each drafter's Params."""

from __future__ import annotations

import dataclasses

from tokenlean.errors import UserError
from tokenlean.options import parse_options
from tokenlean.spec_decode.drafter import Drafter
from tokenlean.spec_decode.drafters.aded import ADED
from tokenlean.spec_decode.drafters.draft_model import DraftModel
from tokenlean.spec_decode.drafters.dyspec import DySpec
from tokenlean.spec_decode.drafters.hybrid import LookupRecycling
from tokenlean.spec_decode.drafters.online import OnlineDraft
from tokenlean.spec_decode.drafters.pld import PromptLookup
from tokenlean.spec_decode.drafters.rasd import RASD
from tokenlean.spec_decode.drafters.recycling import TokenRecycling
from tokenlean.spec_decode.drafters.recycling_draft import RecyclingDraft
from tokenlean.spec_decode.drafters.rsd import RSD
from tokenlean.spec_decode.drafters.spectr import SpecTr
from tokenlean.spec_decode.drafters.suffix import SuffixDecoding

BASELINE = "greedy"  # plain decoding: one target forward per token (samples when temperature > 0)
DRAFTERS: dict[str, type[Drafter]] = {cls.name: cls for cls in (
    PromptLookup, TokenRecycling, LookupRecycling, DraftModel, ADED, SuffixDecoding, RSD, DySpec,
    SpecTr, OnlineDraft, RASD, RecyclingDraft)}


def method_names() -> list[str]:
    return [BASELINE, *DRAFTERS]


def parse_method_args(method: str, pairs: list[str] | dict | None) -> dict:
    """['k=v', ...] (or a dict) -> typed keyword arguments for the method's Params."""
    check_method(method)
    if pairs and method == BASELINE:
        raise UserError(f"method {BASELINE!r} takes no options")
    return parse_options(DRAFTERS[method].Params if pairs else None, pairs, f"method {method!r}")


def check_method(method: str) -> None:
    if method not in method_names():
        raise UserError(f"unknown method {method!r}; valid: {', '.join(method_names())}")


def make_drafter(method: str, lm, args: list[str] | dict | None = None, **extra) -> Drafter | None:
    """A new drafter for `method` on `lm` (None for the plain-decoding baseline)."""
    check_method(method)
    kwargs = parse_method_args(method, args)
    if method == BASELINE:
        return None
    cls = DRAFTERS[method]
    try:
        params = cls.Params(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"method {method!r}: {e}") from None
    return cls(lm, params, **extra)


def methods_markdown() -> str:
    """The README's methods table, generated from the registry (tests keep them in sync)."""
    rows = ["| method | what it does | options (defaults) | paper |", "|---|---|---|---|",
            f"| `{BASELINE}` | plain decoding, one target forward per token (the baseline) | - | - |"]
    for name, cls in DRAFTERS.items():
        options = ", ".join(f"`{f.name}={f.default}`" for f in dataclasses.fields(cls.Params))
        rows.append(f"| `{name}` | {cls.summary} | {options} | {cls.paper} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(methods_markdown())
