"""The documentation stays true to the code: the config reference is what the field docstrings
generate, every setting has a docstring, every relative link leads somewhere, and the README
stays a short front page (the rest lives in docs/)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from hvd_trainer import config_reference

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md", REPO / "tests" / "README.md",
                *(REPO / "docs").glob("*.md")])
README_MAX_LINES = 220
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def test_config_reference_is_generated_from_the_field_docstrings():
    page = REPO / "docs" / "config-reference.md"
    assert page.is_file(), f"docs/config-reference.md is missing; generate it: {config_reference.REGENERATE}"
    assert page.read_text(encoding="utf-8") == config_reference.render(), (
        f"docs/config-reference.md is out of date with hvd_trainer/config.py; regenerate it: "
        f"{config_reference.REGENERATE}")


def test_check_mode_exits_1_on_a_stale_page(tmp_path, capsys):
    stale = tmp_path / "config-reference.md"
    stale.write_text(config_reference.render().replace("optim.lr", "optim.lrr"), encoding="utf-8")
    assert config_reference.main(["--check", str(stale)]) == 1
    assert config_reference.REGENERATE in capsys.readouterr().err
    stale.write_text(config_reference.render(), encoding="utf-8")
    assert config_reference.main(["--check", str(stale)]) == 0


def test_every_config_field_has_a_docstring():
    keys = [key for key, _, _ in config_reference.fields()]
    assert "optim.lr" in keys and "strategy" in keys  # sections are flattened to dotted keys
    assert config_reference.undocumented() == [], "put a string literal under each of these fields in config.py"


def test_every_documented_key_is_in_the_reference():
    """A key named in the reference is one users can set (no section field leaks in as a key)."""
    text = config_reference.render()
    for key, _, _ in config_reference.fields():
        assert f"| `{key}` |" in text


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def _links(page: Path) -> list[str]:
    return _LINK.findall(_FENCE.sub("", page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_existing_files(page):
    assert page.is_file(), f"{page.relative_to(REPO)} is missing"
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {', '.join(broken)}"


def test_readme_is_a_short_front_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): "
                                       "move the detail into a page under docs/ and link it")


def test_docs_pages_are_linked_from_the_readme():
    """A page nobody links to is a page nobody finds."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for page in (REPO / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
