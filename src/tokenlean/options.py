"""`key=value` options parsed against a dataclass of hyperparameters (methods, kv policies)."""

from __future__ import annotations

import dataclasses

from tokenlean.errors import UserError


def parse_options(params_cls, pairs: list[str] | dict | None, owner: str) -> dict:
    """['k=v', ...] (or a dict) -> typed keyword arguments for `params_cls`."""
    if not pairs:
        return {}
    fields = {f.name: f for f in dataclasses.fields(params_cls)} if params_cls else {}
    items = pairs.items() if isinstance(pairs, dict) else [split_pair(p) for p in pairs]
    out = {}
    for key, value in items:
        if key not in fields:
            raise UserError(f"unknown option {key!r} for {owner}; "
                            f"valid: {', '.join(fields) or 'none'}")
        default = fields[key].default
        try:
            out[key] = type(default)(value) if not isinstance(default, bool) else as_bool(value)
        except (TypeError, ValueError):
            raise UserError(f"option {key}={value!r} for {owner} must be a "
                            f"{type(default).__name__}") from None
    return out


def split_pair(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise UserError(f"option {pair!r} must look like key=value")
    return key.strip(), value.strip()


def as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)
