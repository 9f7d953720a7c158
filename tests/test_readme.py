"""The README and the package description: in sync with the registry and the CLI, and
nothing pointing outside the repository."""

import argparse
import re
from pathlib import Path

from tokenlean.cli import build_parser
from tokenlean.spec_decode.registry import methods_markdown

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_methods_table_matches_the_registry():
    assert methods_markdown() in README, "regenerate it: python -m tokenlean.spec_decode.registry"


def test_readme_links_stay_inside_the_repository():
    assert "../shared" not in README and "DESIGN.md" not in README


def test_readme_synopsis_has_every_generate_option():
    synopsis = README.split("## Command line", 1)[1].split("```")[1]
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    generate = commands.choices["generate"]
    options = [max(a.option_strings, key=len) for a in generate._actions
               if a.option_strings and a.dest != "help"]
    assert options and [o for o in options if o not in synopsis] == []


def test_readme_server_section_names_the_api_docs():
    server = README.split("## OpenAI-compatible server", 1)[1].split("\n## ", 1)[0]
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert path in server


def test_package_description_says_what_exists():
    description = re.search(r'^description = "(.*)"$', (ROOT / "pyproject.toml").read_text(),
                            re.M).group(1)
    assert "speculative decoding" in description
    assert "planned" not in description  # the kv policies exist now (tokenlean.kv)
    assert "KV-cache compression" in description


def test_readme_kv_policies_table_matches_the_registry():
    from tokenlean.kv.registry import policies_markdown

    assert policies_markdown() in README, "regenerate it: python -m tokenlean.kv.registry"
