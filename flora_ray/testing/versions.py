"""What this interpreter has installed against what ``requirements.lock`` pins: the newest-versions canary's report.

``python -m flora_ray.testing.versions requirements.lock`` prints one line per locked package whose installed version
differs (``name: locked -> installed``), then the count; the lock's environment markers are evaluated for this
interpreter, so packages the lock keeps for other platforms or Pythons are left out.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def locked_versions(lock: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` of every pin of ``lock`` whose marker holds for this interpreter."""
    out = {}
    for line in Path(lock).read_text().splitlines():
        match = PIN.match(line.strip())
        if match and (match.group(3) is None or Marker(match.group(3)).evaluate()):
            out[canonicalize_name(match.group(1))] = match.group(2)
    return out


def differences(lock: str | Path) -> list[tuple[str, str, str | None]]:
    """``(name, locked, installed or None)`` for each locked package installed at another version, or missing."""
    out = []
    for name, version in sorted(locked_versions(lock).items()):
        found = installed_version(name)
        if found != version:
            out.append((name, version, found))
    return out


def installed_version(name: str) -> str | None:
    """The version ``import`` would use: the first distribution of ``name`` on ``sys.path`` (a package's vendored
    copies, such as those setuptools appends to the path, come later and do not count)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    lock = argv[0] if argv else "requirements.lock"
    changed = differences(lock)
    for name, locked, now in changed:
        print(f"  {name}: {locked} -> {now or 'not installed'}")
    print(f"{len(changed)} of {len(locked_versions(lock))} locked packages differ from {lock} in this environment")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
