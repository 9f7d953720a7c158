"""tokenlean: token-efficient LLM inference."""

from tokenlean.errors import UserError

__version__ = "0.1.0"

__all__ = ["LM", "SamplingParams", "UserError", "generate", "load"]


def __getattr__(name):
    # Import torch-heavy modules on first use, so `tokenlean --help` stays fast.
    if name in ("LM", "load"):
        from tokenlean import lm

        return getattr(lm, name)
    if name == "SamplingParams":
        from tokenlean.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'tokenlean' has no attribute {name!r}")


def generate(prompt: str, model: str | None = None, **kwargs):
    """One-shot convenience: load `model` (default tl-code) and generate."""
    from tokenlean.lm import load

    return load(model).generate(prompt, **kwargs)
