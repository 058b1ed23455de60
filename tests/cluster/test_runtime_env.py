"""The runtime environment of the documented job (``cluster/runtime_env.yaml``): what Ray would upload.

The upload list comes from Ray's own code, called as ``ray job submit --runtime-env cluster/runtime_env.yaml`` calls
it: ``parse_runtime_env_args`` reads the file, ``upload_working_dir_if_needed`` adds Ray's default excludes and
hands the working directory to the job client's upload function, which zips it with ``create_package`` (the
``.gitignore`` files of the tree applied unless ``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``). Here the upload function
keeps the zip instead of sending it. The tree is a copy of this checkout with a top-level ``runs/``, ``data/``,
``.venv/`` and ``.git/`` added: every file of ``flora_ray/`` must be in the zip (``flora_ray/data/`` included),
nothing of those four directories. Unanchored excludes (``"data"``) drop ``flora_ray/data/``: checked too.
The slow test submitting the job to a loopback cluster is ``test_runtime_env_job.py``.
"""

import re
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml
from ray._private.runtime_env.packaging import create_package
from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
EXCLUDED_TOP = ("runs", "data", ".venv", ".git")
# What the cluster/README.md command passed before: gitignore patterns that match at any depth.
UNANCHORED_EXCLUDES = [".git", ".venv", "runs", "data"]
# Never copied from the checkout (build and tool outputs); the four directories above are made fresh in the copy.
_NOT_COPIED = {*EXCLUDED_TOP, "build", ".pytest_cache", ".ruff_cache"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    ignored = {name for name in names if name == "__pycache__" or name.endswith(".egg-info")}
    if Path(directory) == REPO:
        ignored |= _NOT_COPIED & set(names)
    return ignored


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """This checkout's files (without build outputs), plus what a user's repository root holds and must not ship."""
    root = tmp_path_factory.mktemp("checkout") / "flora-ray"
    shutil.copytree(REPO, root, ignore=_ignore)
    decoys = {
        "runs/digits-tiny/pareto.parquet": b"PAR1",
        "runs/digits-tiny/supernet.safetensors": b"\0" * 64,
        "data/imagenet/train/n01440764/n01440764_10026.JPEG": b"\xff\xd8\xff",
        ".venv/lib/python3.11/site-packages/flora_ray/__init__.py": b"",  # a stale installed copy
        ".venv/bin/python": b"",
        ".git/HEAD": b"ref: refs/heads/main\n",
        ".git/objects/ab/cdef": b"\0",
    }
    for name, content in decoys.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def uploaded_files(tree: Path, runtime_env: dict, include_gitignore: bool, scratch: Path) -> set[str]:
    """The files Ray's job client would zip from ``tree`` as working_dir for ``runtime_env`` (paths in the zip)."""
    packages = []

    def keep_package(working_dir: str, excludes: list[str], is_file: bool = False) -> None:
        # The job client's upload function (JobSubmissionClient._upload_working_dir_if_needed), minus the HTTP PUT.
        assert not is_file, working_dir
        package = scratch / f"package-{len(packages)}.zip"
        create_package(working_dir, package, include_gitignore=include_gitignore, excludes=excludes)
        packages.append(package)

    env = dict(runtime_env, working_dir=str(tree / runtime_env["working_dir"]))
    upload_working_dir_if_needed(env, include_gitignore=include_gitignore, upload_fn=keep_package)
    assert len(packages) == 1
    with zipfile.ZipFile(packages[0]) as package:
        return {name for name in package.namelist() if not name.endswith("/")}


def _expected(tree: Path) -> set[str]:
    """Every file of flora_ray/ in the tree, and the configs the documented commands name."""
    package = {path.relative_to(tree).as_posix() for path in (tree / "flora_ray").rglob("*") if path.is_file()}
    assert {"flora_ray/data/__init__.py", "flora_ray/cli.py"} <= package
    return package | {"experiments/digits_tiny.yaml", "experiments/deit_small_imagenet.yaml", "pyproject.toml"}


def load_runtime_env() -> dict:
    """cluster/runtime_env.yaml as `ray job submit --runtime-env` reads it."""
    return parse_runtime_env_args(runtime_env=str(RUNTIME_ENV))


@pytest.mark.parametrize("include_gitignore", [True, False], ids=["gitignore", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"])
def test_runtime_env_ships_flora_ray_and_nothing_of_runs_data_venv_git(tree, tmp_path, include_gitignore):
    runtime_env = load_runtime_env()
    assert runtime_env["working_dir"] == "."  # the repository root, where the documented command runs
    shipped = uploaded_files(tree, runtime_env, include_gitignore, tmp_path)
    expected = _expected(tree)
    missing = sorted(expected - shipped)
    leaked = sorted(name for name in shipped if name.split("/")[0] in EXCLUDED_TOP)
    data_files = sorted(name for name in shipped if name.startswith("flora_ray/data/"))
    print(
        f"\n[upload list, include_gitignore={include_gitignore}] {len(shipped)} files shipped, "
        f"{sum(name.startswith('flora_ray/') for name in shipped)} under flora_ray/ ({len(data_files)} under "
        f"flora_ray/data/: {', '.join(Path(n).name for n in data_files)}); under {'/, '.join(EXCLUDED_TOP)}/: "
        f"{len(leaked)} shipped of {sum(1 for top in EXCLUDED_TOP for p in (tree / top).rglob('*') if p.is_file())}"
    )
    assert not missing, f"{RUNTIME_ENV.name} does not ship {missing}"
    assert not leaked, f"{RUNTIME_ENV.name} ships {leaked}"


def test_unanchored_excludes_drop_flora_ray_data(tree, tmp_path):
    """The check above catches the old excludes: ``"data"`` matches flora_ray/data/ too."""
    shipped = uploaded_files(tree, {"working_dir": ".", "excludes": UNANCHORED_EXCLUDES}, True, tmp_path)
    assert "flora_ray/cli.py" in shipped
    assert not any(name.startswith("flora_ray/data/") for name in shipped)
    assert sorted(_expected(tree) - shipped) == sorted(
        p.relative_to(tree).as_posix() for p in (tree / "flora_ray" / "data").rglob("*") if p.is_file()
    )


def test_runtime_env_is_valid_and_installs_nothing():
    runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
    RuntimeEnv(**runtime_env)  # Ray's own validation of the fields
    assert set(runtime_env) == {"working_dir", "excludes"}, "dependencies come from the image (cluster/Dockerfile)"
    assert all(pattern.startswith("/") for pattern in runtime_env["excludes"]), "anchor every exclude to the root"


def test_cluster_readme_submits_with_the_runtime_env_file():
    """Every `ray job submit` command (in a code block) of cluster/README.md uses cluster/runtime_env.yaml."""
    readme = (REPO / "cluster" / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.DOTALL))
    commands = re.findall(r"ray job submit\b(?:[^\n]*\\\n)*[^\n]*", blocks)
    assert commands
    for command in commands:
        assert "--runtime-env cluster/runtime_env.yaml" in command, command
        assert "--runtime-env-json" not in command, command
