"""Policy names -> CachePolicy classes; budgets and `key=value` options checked here."""

from __future__ import annotations

import dataclasses

from tokenlean.errors import UserError
from tokenlean.kv.policies.adakv import AdaKV
from tokenlean.kv.policies.duo import DuoAttention
from tokenlean.kv.policies.gemfilter import GemFilter
from tokenlean.kv.policies.h2o import H2O
from tokenlean.kv.policies.infllm import InfLLM
from tokenlean.kv.policies.snapkv import SnapKV
from tokenlean.kv.policies.streaming import StreamingLLM
from tokenlean.kv.policies.tokenselect import TokenSelect
from tokenlean.kv.policy import Budget, CachePolicy
from tokenlean.options import parse_options

NONE = "none"  # the full cache
POLICIES: dict[str, type[CachePolicy]] = {cls.name: cls for cls in (
    StreamingLLM, H2O, SnapKV, AdaKV, GemFilter, TokenSelect, InfLLM, DuoAttention)}


def policy_names() -> list[str]:
    return [NONE, *POLICIES]


def check_policy(name: str, budget=None, args=None) -> None:
    """Fail early (before a model loads) on a bad name, budget or option."""
    if name not in policy_names():
        raise UserError(f"unknown kv policy {name!r}; valid: {', '.join(policy_names())}")
    Budget.parse(budget)
    if name == NONE:
        if args:
            raise UserError("kv policy 'none' takes no options")
        return
    parse_options(POLICIES[name].Params, args, f"kv policy {name!r}")


def check_with_drafting(name: str, drafting: bool) -> None:
    """A policy that changes the cache or the attention while decoding would see a draft
    tree's tokens at other moments than plain decoding does: refused, never inexact."""
    if drafting and name in POLICIES and POLICIES[name].decode_time:
        exact = ", ".join(n for n, cls in POLICIES.items() if not cls.decode_time)
        raise UserError(f"kv policy {name!r} evicts or selects entries while decoding, so "
                        f"speculative decoding could not stay exact under it; use a "
                        f"prefill-time policy ({exact}) or --method greedy")


def make_policy(name: str | None, budget=None, args: list[str] | dict | None = None):
    """A new policy (one per generation: it holds that sequence's state); None for 'none'."""
    name = name or NONE
    check_policy(name, budget, args)
    if name == NONE:
        return None
    cls = POLICIES[name]
    try:
        params = cls.Params(**parse_options(cls.Params, args, f"kv policy {name!r}"))
    except (TypeError, ValueError) as e:
        raise UserError(f"kv policy {name!r}: {e}") from None
    return cls(Budget.parse(budget), params)


def policies_markdown() -> str:
    """The README's kv policies table, generated from the registry."""
    rows = ["| policy | what it does | options (defaults) | paper |", "|---|---|---|---|"]
    for name, cls in POLICIES.items():
        options = ", ".join(f"`{f.name}={f.default}`" for f in dataclasses.fields(cls.Params))
        rows.append(f"| `{name}` | {cls.summary} | {options or '-'} | {cls.paper} |")
    return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class KVConfig:
    """A policy name, budget and options: checked once, then a fresh policy per generation."""

    policy: str = NONE
    budget: str | float | None = None
    args: tuple = ()

    def __post_init__(self):
        check_policy(self.policy, self.budget, list(self.args))
        if self.policy == NONE and self.budget is not None and Budget.parse(self.budget).value != 1:
            raise UserError("a kv budget needs a kv policy (--kv-policy NAME)")

    def make(self):
        return make_policy(self.policy, self.budget, list(self.args))

    def __str__(self) -> str:
        return self.policy if self.policy == NONE else f"{self.policy}@{Budget.parse(self.budget)}"


if __name__ == "__main__":
    print(policies_markdown())
