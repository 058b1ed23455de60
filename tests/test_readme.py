"""The README stays true: its configuration reference names every key, its set-up commands exist."""

import dataclasses
import re
import typing
from pathlib import Path

from flora_ray.config import Config

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_names_every_key():
    readme = (ROOT / "README.md").read_text()
    reference = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \|[^|]*\|(.*)\|$", reference, re.M)}
    hints = typing.get_type_hints(Config)
    assert set(rows) == {f.name for f in dataclasses.fields(Config)}
    for section, keys in rows.items():
        if "the `pretrain` keys" in keys:
            keys += rows["pretrain"]
        missing = [f.name for f in dataclasses.fields(hints[section]) if f"`{f.name}`" not in keys]
        assert not missing, f"README configuration reference lacks {section}.{missing}"


def test_set_up_commands_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("quickstart", "test"):
        assert f"make {target}" in readme and re.search(rf"^{target}:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
