"""The lock file: every dependency of pyproject.toml pinned within its range and hash-checked, so `make install` on
any machine gets the set CI tested; and the canary's report of what differs from it."""

import re
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from flora_ray.testing.versions import differences, locked_versions

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def _requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def _pins() -> list[tuple[str, str, str | None, list[str]]]:
    """(name, version, marker, hashes) of every pin in the lock."""
    text = LOCK.read_text()
    pins = []
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = block.splitlines()[0]
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?: ; (.+?))? \\$", head)
        if match:
            pins.append((*match.groups(), re.findall(r"--hash=sha256:([0-9a-f]{64})", block)))
    return pins


def test_every_dependency_is_pinned_within_its_range_and_hashed():
    pins = _pins()
    assert len(pins) > 100 and all(hashes for *_, hashes in pins), "a pin without hashes"
    by_name: dict[str, list[tuple[str, str | None]]] = {}
    for name, version, marker, _ in pins:
        by_name.setdefault(canonicalize_name(name), []).append((version, marker))
    for req in _requirements():
        versions = by_name.get(canonicalize_name(req.name))
        assert versions, f"{req.name} (pyproject.toml) is not in requirements.lock: run `make lock`"
        for version, _ in versions:
            assert req.specifier.contains(version, prereleases=True), (
                f"requirements.lock pins {req.name}=={version}, outside pyproject.toml's {req.specifier}: run `make lock`"
            )


def test_the_lock_holds_for_every_python_the_project_supports():
    """A universal lock: each pin's marker is about the Python version or platform, and for Python 3.10 to 3.13 on
    Linux, macOS and Windows every direct dependency resolves to exactly one pinned version."""
    pins = _pins()
    for python in ("3.10", "3.11", "3.12", "3.13"):
        for platform in ("linux", "darwin", "win32"):
            env = {"python_full_version": f"{python}.0", "python_version": python, "sys_platform": platform,
                   "platform_system": {"linux": "Linux", "darwin": "Darwin", "win32": "Windows"}[platform]}  # fmt: skip
            for req in _requirements():
                chosen = {v for n, v, m, _ in pins
                          if canonicalize_name(n) == canonicalize_name(req.name) and (m is None or Marker(m).evaluate(env))}  # fmt: skip
                assert len(chosen) == 1, f"{req.name} on Python {python} / {platform}: {sorted(chosen)}"


def test_the_canary_reports_what_differs_from_the_lock(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "pytest==0.0.1 \\\n    --hash=sha256:" + "0" * 64 + "\n"
        "numpy==1.0 ; python_full_version < '3.0' \\\n    --hash=sha256:" + "1" * 64 + "\n"
        "not-a-real-package-xyz==1.0 \\\n    --hash=sha256:" + "2" * 64 + "\n"
    )
    assert set(locked_versions(lock)) == {"pytest", "not-a-real-package-xyz"}  # numpy's marker is false here
    assert differences(lock) == [("not-a-real-package-xyz", "1.0", None), ("pytest", "0.0.1", pytest.__version__)]
    assert differences(LOCK) == [], "the environment running the tests is not requirements.lock: run `make install`"
