"""Model names -> checkpoint paths: the zoo, the installed real models, local folders and
.gguf files, hub ids. Below the engine, so drafters that load a second model can use it."""

from __future__ import annotations

from pathlib import Path

from tokenlean.errors import UserError
from tokenlean.model.load import checkpoint_path
from tokenlean.zoo import DEFAULT_MODEL, zoo_models, zoo_path


def resolve_model(name: str | None) -> tuple[str, Path]:
    """An embedded zoo name, an installed real model, a local checkpoint folder or .gguf file,
    or a hub id."""
    from tokenlean.zoo.real import REAL_MODELS, require_installed

    name = name or DEFAULT_MODEL
    path = zoo_path(name)
    if path is not None:
        return name, path
    if name in REAL_MODELS:
        return name, require_installed(name)
    if "/" not in name and not Path(name).exists():
        known = ", ".join([*zoo_models(), *REAL_MODELS]) or "none installed"
        raise UserError(f"unknown model {name!r}: not a named model ({known}) "
                        "nor a checkpoint folder")
    return name, checkpoint_path(name)
