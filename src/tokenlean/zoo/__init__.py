"""The embedded model zoo: small code models trained by tokenlean itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

ZOO_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "tl-code"
DEFAULT_DRAFT = "tl-code-draft"


def tokenlean_home() -> Path:
    """Where tokenlean keeps what is not in git: converted real models, training checkpoints."""
    return Path(os.environ.get("TOKENLEAN_HOME", Path.home() / ".cache" / "tokenlean"))


def state_dir() -> Path:
    """What drafters learn and keep between processes (Token Recycling's matrices):
    $TOKENLEAN_STATE, else <tokenlean_home()>/state."""
    return Path(os.environ.get("TOKENLEAN_STATE", tokenlean_home() / "state"))


def models_dir() -> Path:
    """Installed real models (`tokenlean models fetch NAME`), one Hugging Face folder each."""
    return tokenlean_home() / "models"


def zoo_models() -> list[str]:
    """Names of the embedded models whose weights are present."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file())


def zoo_path(name: str) -> Path | None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None  # a path, not a zoo name (ZOO_DIR / "/abs/path" is "/abs/path")
    path = ZOO_DIR / name
    return path if (path / "config.json").is_file() else None


def card_summary(name: str) -> dict:
    """The headline numbers of a model's card (card.json beside the weights)."""
    path = ZOO_DIR / name / "card.json"
    return json.loads(path.read_text()) if path.is_file() else {}
