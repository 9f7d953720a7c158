"""The README's methods table is generated from the registry: keep them in sync."""

from pathlib import Path

from tokenlean.spec.registry import methods_markdown


def test_readme_methods_table_matches_the_registry():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert methods_markdown() in readme, "regenerate it: python -m tokenlean.spec.registry"
