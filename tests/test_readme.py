"""The README and docs/ stay true: the configuration reference names every key, the set-up commands exist, the README
stays a short front door, and every relative link points at a file (and heading) that exists."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from flora_ray.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "guide.md"  # the configuration reference lives here
README_MAX_LINES = 160
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_configuration_reference_names_every_key():
    text = REFERENCE.read_text()
    reference = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \|[^|]*\|(.*)\|$", reference, re.M)}
    hints = typing.get_type_hints(Config)
    assert set(rows) == {f.name for f in dataclasses.fields(Config)}
    for section, keys in rows.items():
        if "the `pretrain` keys" in keys:
            keys += rows["pretrain"]
        missing = [f.name for f in dataclasses.fields(hints[section]) if f"`{f.name}`" not in keys]
        assert not missing, f"{REFERENCE.name} configuration reference lacks {section}.{missing}"


def test_set_up_commands_exist():
    readme = README.read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("quickstart", "test"):
        assert f"make {target}" in readme and re.search(rf"^{target}:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _links(page: Path) -> list[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())  # code blocks hold no links
    text = re.sub(r"``.*?``|`[^`\n]*`", "", text)  # nor do code spans
    return re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<img [^>]*src=\"([^\"]+)\"", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto: ...
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and (target == README or target.parent == ROOT / "docs"):
            headings = re.findall(r"^#+ (.*)$", re.sub(r"(?ms)^```.*?^```", "", target.read_text()), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(link)
    assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}"
