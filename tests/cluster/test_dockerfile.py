"""``cluster/Dockerfile`` against the lock: the CI cannot build images, so the build's installs are read and checked.

The image must start from Ray's GPU image for the lock's Ray and the development environment's Python
(``rayproject/ray:<lock's ray>-py311-gpu``), install ``requirements.lock`` (the repository root's, uv-compiled with
hashes) with ``--require-hashes --no-deps``, then flora-ray itself with ``--no-deps`` and without build isolation, and
pip-install nothing else: no package outside the lock, no installer that resolves on its own. The lock must pin every
package to one version with at least one hash (else ``--require-hashes`` fails the build). The build context
(``cluster/Dockerfile.dockerignore``) must hold what the Dockerfile copies and nothing of ``.venv``/``runs``/``data``.
Each check also rejects a deliberately broken copy.
"""

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "cluster" / "Dockerfile"
DOCKERIGNORE = REPO / "cluster" / "Dockerfile.dockerignore"
LOCK = REPO / "requirements.lock"
LOCK_FILE = "requirements.lock"
PYTHON_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"  # the development environment's: py311
# Installers other than pip that would resolve and install packages outside the lock.
OTHER_INSTALLERS = {("conda", "install"), ("mamba", "install"), ("micromamba", "install"), ("uv", "add")}


# --- parsing -------------------------------------------------------------------------------------------------------


def _logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined; comment and blank lines dropped (also inside a continuation)."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append((current + stripped).strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of each instruction."""
    instructions = []
    for line in _logical_lines(text):
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def copy_sources(instructions: list[tuple[str, str]]) -> set[str]:
    """What the COPY and ADD instructions take from the build context (options and destinations left out)."""
    sources = set()
    for keyword, arguments in instructions:
        if keyword in {"COPY", "ADD"}:
            words = [word for word in arguments.split() if not word.startswith("--")]
            sources.update(word.rstrip("/") for word in words[:-1])
    return sources


@dataclass(frozen=True)
class Locked:
    name: str
    version: str | None  # None: not pinned with ==
    hashes: tuple[str, ...]
    line: str


def parse_lock(text: str) -> list[Locked]:
    """The entries of a pip requirements file with hashes (``uv pip compile --generate-hashes`` output)."""
    entries = []
    for line in _logical_lines(text):
        if line.startswith("-"):  # a global option (--index-url ...)
            continue
        parts = line.split()
        hashes = tuple(p.split("=", 1)[1] for p in parts if p.startswith("--hash="))
        requirement = Requirement(" ".join(p for p in parts if not p.startswith("--hash=")))
        specs = list(requirement.specifier)
        pinned = len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version
        entries.append(Locked(canonicalize_name(requirement.name), specs[0].version if pinned else None, hashes, line))
    return entries


def check_lock(entries: list[Locked]) -> str:
    """Every entry pinned with a sha256 hash, Ray once; returns the lock's Ray version."""
    if not entries:
        raise ValueError("the lock has no entries")
    for entry in entries:
        if entry.version is None:
            raise ValueError(f"lock entry not pinned to one version with ==: {entry.line}")
        if not entry.hashes or not all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in entry.hashes):
            raise ValueError(f"lock entry without sha256 hashes (--require-hashes fails): {entry.line}")
    rays = {entry.version for entry in entries if entry.name == "ray"}
    if len(rays) != 1:
        raise ValueError(f"the lock must pin ray to one version, got {sorted(rays) or 'none'}")
    return rays.pop()


@dataclass(frozen=True)
class PipInstall:
    options: frozenset[str]
    requirement_files: tuple[str, ...]
    targets: tuple[str, ...]  # positional: packages, paths, URLs
    command: str


_PIP_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-i", "--index-url",
                      "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root"}  # fmt: skip


def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at &&, ||, ;, |), each as words."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if set(token) <= set(";&|"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


def _pip_install_args(words: list[str]) -> list[str] | None:
    """The arguments after ``install`` if ``words`` is a pip install (pip, pip3, python -m pip, uv pip), else None."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    for start in range(len(words)):
        head = Path(words[start]).name
        if re.fullmatch(r"pip3?(\.\d+)?", head):
            rest = words[start + 1 :]
        elif re.fullmatch(r"python3?(\.\d+)?", head) and words[start + 1 : start + 3] == ["-m", "pip"]:
            rest = words[start + 3 :]
        elif head == "uv" and words[start + 1 : start + 2] == ["pip"]:
            rest = words[start + 2 :]
        else:
            continue
        return rest[1:] if rest[:1] == ["install"] else None
    return None


def pip_installs(instructions: list[tuple[str, str]]) -> list[PipInstall]:
    installs = []
    for keyword, arguments in instructions:
        if keyword != "RUN":
            continue
        for words in _shell_commands(arguments):
            names = tuple(Path(w).name for w in words[:2])
            if names in OTHER_INSTALLERS:
                raise ValueError(f"installs outside the lock: {' '.join(words)}")
            args = _pip_install_args(words)
            if args is None:
                continue
            options, files, targets, index = set(), [], [], 0
            while index < len(args):
                arg = args[index]
                name, _, value = arg.partition("=")
                if name in _PIP_VALUE_OPTIONS:
                    value = value or (args[index + 1] if index + 1 < len(args) else "")
                    index += 0 if "=" in arg else 1
                    if name in {"-r", "--requirement"}:
                        files.append(value)
                    elif name in {"-e", "--editable"}:
                        targets.append(value)
                    else:
                        options.add(name)
                elif arg.startswith("-"):
                    options.add(name)
                else:
                    targets.append(arg)
                index += 1
            installs.append(PipInstall(frozenset(options), tuple(files), tuple(targets), " ".join(words)))
    return installs


def check_dockerfile(text: str, lock_ray: str) -> None:
    """The image is built from the right base, installs the lock with hashes, then the project, nothing else."""
    instructions = dockerfile_instructions(text)
    bases = [arguments.split()[0] for keyword, arguments in instructions if keyword == "FROM"]
    expected = f"rayproject/ray:{lock_ray}-{PYTHON_TAG}-gpu"
    if bases != [expected]:
        raise ValueError(f"FROM must be {expected} (the lock's Ray, Python {PYTHON_TAG[2:]}), got {bases}")
    if LOCK_FILE not in copy_sources(instructions):
        raise ValueError(f"the Dockerfile does not copy {LOCK_FILE}")
    installs = pip_installs(instructions)
    kinds = []
    for install in installs:
        if install.requirement_files == (LOCK_FILE,) and not install.targets:
            missing = {"--require-hashes", "--no-deps"} - install.options
            if missing:
                raise ValueError(f"the lock must be installed with {sorted(missing)}: {install.command}")
            kinds.append("lock")
        elif install.targets == (".",) and not install.requirement_files:
            missing = {"--no-deps", "--no-build-isolation"} - install.options
            if missing:
                raise ValueError(f"the project must be installed with {sorted(missing)}: {install.command}")
            kinds.append("project")
        else:
            raise ValueError(f"pip installs something other than the lock and the project: {install.command}")
    if kinds != ["lock", "project"]:
        raise ValueError(f"expected the lock's install, then the project's, got {kinds}")


def check_dockerignore(dockerfile: str, dockerignore: str) -> None:
    """An allowlist context: everything excluded, then exactly the paths the Dockerfile copies re-included."""
    lines = [line.strip() for line in dockerignore.splitlines() if line.strip() and not line.startswith("#")]
    if lines[:1] != ["*"]:
        raise ValueError("the build context must start from nothing ('*'), or .venv/, runs/ and data/ are sent")
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = copy_sources(dockerfile_instructions(dockerfile))
    if sources - allowed:
        raise ValueError(f"copied but not in the build context: {sorted(sources - allowed)}")
    if allowed & {".venv", "runs", "data", ".git"}:
        raise ValueError(f"the build context includes {sorted(allowed & {'.venv', 'runs', 'data', '.git'})}")


# --- the checked-in files ------------------------------------------------------------------------------------------


def _real_lock() -> list[Locked]:
    if not LOCK.is_file():
        pytest.fail(f"{LOCK.name} is missing at the repository root: the image installs it (cluster/Dockerfile)")
    return parse_lock(LOCK.read_text())


def test_lock_pins_everything_with_hashes_and_the_installed_ray():
    lock = _real_lock()
    assert check_lock(lock) == ray.__version__
    names = {entry.name for entry in lock}
    assert {"torch", "torchvision", "timm", "optuna", "pyarrow"} <= names


def test_dockerfile_installs_the_lock_and_the_project_only():
    check_dockerfile(DOCKERFILE.read_text(), check_lock(_real_lock()))


def test_dockerfile_build_context_holds_what_it_copies_only():
    check_dockerignore(DOCKERFILE.read_text(), DOCKERIGNORE.read_text())


# --- broken copies -------------------------------------------------------------------------------------------------

HASH = "sha256:" + "0" * 64
SYNTHETIC_LOCK = f"""# uv pip compile pyproject.toml --universal --generate-hashes -o requirements.lock
ray=={ray.__version__} \\
    --hash={HASH}
torch==2.14.1 ; sys_platform == 'linux' \\
    --hash={HASH} \\
    --hash=sha256:{"1" * 64}
    # via flora-ray
"""

BROKEN_LOCK = {
    "range": (f"torch>=2.4 \\\n    --hash={HASH}\n", "not pinned"),
    "no_hash": ("timm==1.0.31\n", "without sha256 hashes"),
    "short_hash": ("timm==1.0.31 --hash=sha256:abc\n", "without sha256 hashes"),
    "second_ray": (f"ray==2.59.0 ; python_version < '3.11' \\\n    --hash={HASH}\n", "ray to one version"),
}


def test_synthetic_lock_passes():
    assert check_lock(parse_lock(SYNTHETIC_LOCK)) == ray.__version__


@pytest.mark.parametrize("case", sorted(BROKEN_LOCK))
def test_broken_lock_fails(case):
    addition, match = BROKEN_LOCK[case]
    with pytest.raises(ValueError, match=match):
        check_lock(parse_lock(SYNTHETIC_LOCK + addition))


def test_lock_without_ray_fails():
    with pytest.raises(ValueError, match="ray to one version"):
        check_lock(parse_lock(f"torch==2.14.1 --hash={HASH}\n"))


LOCK_INSTALL = "pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock"
PROJECT_INSTALL = "pip install --no-cache-dir --no-deps --no-build-isolation ."
BROKEN_DOCKERFILE = {
    "older_ray_base": (("2.60.0-py311-gpu", "2.59.0-py311-gpu"), "FROM must be"),
    "other_python_base": (("2.60.0-py311-gpu", "2.60.0-py310-gpu"), "FROM must be"),
    "latest_base": (("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:latest-gpu"), "FROM must be"),
    "lock_without_hashes": ((LOCK_INSTALL, LOCK_INSTALL.replace(" --require-hashes", "")), "--require-hashes"),
    "lock_with_deps": ((LOCK_INSTALL, LOCK_INSTALL.replace(" --no-deps", "")), "--no-deps"),
    "lock_not_installed": ((LOCK_INSTALL, "true"), "expected the lock's install"),
    "project_with_deps": ((PROJECT_INSTALL, PROJECT_INSTALL.replace(" --no-deps", "")), "--no-deps"),
    "project_build_isolation": ((PROJECT_INSTALL, PROJECT_INSTALL.replace(" --no-build-isolation", "")), "isolation"),
    "unpinned_package": ((LOCK_INSTALL, f"{LOCK_INSTALL} && pip install -q timm"), "other than the lock"),
    "pinned_outside_lock": ((LOCK_INSTALL, f"{LOCK_INSTALL}; python -m pip install optuna==5.0.0"), "other than"),
    "second_requirements": ((LOCK_INSTALL, f"{LOCK_INSTALL} -r extra.txt"), "other than the lock"),
    "conda": ((LOCK_INSTALL, f"{LOCK_INSTALL} && conda install -y ffmpeg"), "outside the lock"),
    "uv_pip": ((LOCK_INSTALL, f"{LOCK_INSTALL} && uv pip install --system rich"), "other than the lock"),
    "lock_not_copied": (("COPY --chown=ray:users requirements.lock ./", ""), "does not copy"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_DOCKERFILE))
def test_broken_dockerfile_fails(case):
    (old, new), match = BROKEN_DOCKERFILE[case]
    text = DOCKERFILE.read_text()
    assert old in text, f"{case}: the Dockerfile no longer contains {old!r}"
    with pytest.raises(ValueError, match=match):
        check_dockerfile(text.replace(old, new), ray.__version__)


BROKEN_DOCKERIGNORE = {
    "everything_sent": (("*\n", ""), "start from nothing"),
    "package_left_out": (("!flora_ray\n", ""), "not in the build context"),
    "venv_sent": (("!README.md\n", "!README.md\n!.venv\n"), "includes"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_DOCKERIGNORE))
def test_broken_dockerignore_fails(case):
    (old, new), match = BROKEN_DOCKERIGNORE[case]
    text = DOCKERIGNORE.read_text()
    assert old in text, case
    with pytest.raises(ValueError, match=match):
        check_dockerignore(DOCKERFILE.read_text(), text.replace(old, new, 1))
