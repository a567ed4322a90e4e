"""The licence and citation files agree with pyproject and with the README's Citation section."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _bibtex_titles(readme: str) -> list[str]:
    """The titles of the README's BibTeX entries, without BibTeX's braces."""
    titles = re.findall(r"^\s*title\s*=\s*\{(.+)\},$", readme, re.MULTILINE)
    return [title.replace("{", "").replace("}", "") for title in titles]


def test_licence_file_is_the_licence_pyproject_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    text = (ROOT / "LICENSE").read_text()
    assert declared == "Apache-2.0"
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it


def test_citation_file_cites_what_the_readme_cites() -> None:
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    titles = [citation["preferred-citation"]["title"]] + [ref["title"] for ref in citation["references"]]
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "Apache-2.0"
    assert titles == _bibtex_titles((ROOT / "README.md").read_text())


def test_shipped_class_list_carries_its_licence_notice() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    notice = ROOT / "spurgen" / "data" / "LICENSE-spurious_imagenet.txt"
    assert "data/*.txt" in package_data["spurgen"] and "MIT License" in notice.read_text()


def test_the_layout_table_names_every_module_and_only_those() -> None:
    """docs/DEVELOPING.md's layout table has a row for each module of the package, so it shows the tree as it is."""
    text = (ROOT / "docs" / "DEVELOPING.md").read_text()
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(spurgen/[\w/]+\.py)`", table))
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "spurgen").rglob("*.py")}
    assert sorted(modules - named) == [], "modules missing from the layout table"
    assert sorted(named - modules) == [], "the layout table names modules that do not exist"
