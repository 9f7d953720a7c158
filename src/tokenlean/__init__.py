"""tokenlean: token-efficient LLM inference."""

from tokenlean.errors import UserError
from tokenlean.lm import LM, load
from tokenlean.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["LM", "SamplingParams", "UserError", "generate", "load"]


def generate(prompt: str, model: str | None = None, **kwargs):
    """One-shot convenience: load `model` (default tl-code) and generate."""
    return load(model).generate(prompt, **kwargs)
