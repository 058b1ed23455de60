"""The documented job command, run as a user runs it: ``ray job submit --runtime-env cluster/runtime_env.yaml``.

A two-node cluster of the multinode harness (``flora_ray.testing.multinode``, a network namespace with only loopback)
whose head also runs the dashboard's job API on 127.0.0.1:8265, as ``ray dashboard cluster/aws.yaml`` forwards it.
The nodes run a Python like the image's (``cluster/Dockerfile``): this environment's packages, with flora-ray installed
from the checkout, not editable (an editable install would fill in, from the source tree, whatever the job's package
lacks, and hide the bug below). From the root of a copy of this checkout (hidden from the worker node, so the worker
gets the code only through the runtime environment's package), ``ray job submit`` sends ``flora-ray run experiments/digits_tiny.yaml --address auto``
with ``cluster/runtime_env.yaml`` unchanged, shortened by overrides to a tiny run; the job must end SUCCEEDED with the
front in ``run.storage``. With the unanchored excludes the README had (``data``), this job fails: its ``flora_ray``
(first on the job's ``PYTHONPATH``) has no ``data`` package. The token reaches ``ray job submit`` as it does a user's
client: ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` (set by the harness).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from flora_ray.results import load_front
from flora_ray.storage.run_store import ARTEFACTS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_PORT = 8265  # the namespace has its own loopback: the documented port is free
SUBMISSION_ID = "flora-ray-digits"
# experiments/digits_tiny.yaml shortened to seconds per stage on two CPUs: one training worker (a Ray Train worker
# group of two costs more to start than the run takes).
SHORT = [
    "scaling.num_workers=1",
    "pretrain.epochs=1",
    "pretrain.batch_size=128",
    "pretrain.warmup_epochs=0",
    "filter.epochs=1",
    "filter.eval_images=100",
    "train.epochs=1",
    "train.batch_size=128",
    "train.eval_images=100",
    "search.trials=6",
    "search.population=4",
    "search.eval_images=100",
    "profile.enabled=false",  # no latency table (the search's objectives are MACs and accuracy)
    "profile.min_run_time=0.02",  # export's latency measurement
]


def _copy_checkout(destination: Path) -> None:
    """The repository as a user's checkout holds it, without the build and tool outputs of this one."""
    top = {".git", "runs", "data", "build", ".pytest_cache", ".ruff_cache"}

    def ignore(directory: str, names: list[str]) -> set[str]:
        ignored = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        # .venv, and .venv-latest after `make test-latest` (7 GB: it once filled /tmp)
        venvs = {n for n in names if n.startswith(".venv")}
        return ignored | ((top & set(names)) | venvs if Path(directory) == REPO else set())

    shutil.copytree(REPO, destination, ignore=ignore)


def _image_like_python(root: Path, checkout: Path) -> Path:
    """A virtual environment at ``root`` that sees this environment's packages (a path in a ``.pth`` file: the
    ``.pth`` files there, the editable flora-ray's among them, are not run) and has flora-ray installed from
    ``checkout`` as the image installs it (``--no-deps --no-build-isolation``, not editable); its ``bin``."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "_this_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", str(checkout)],
        check=True, timeout=300,
    )  # fmt: skip
    # `ray` for this Python (the harness starts the nodes with the `ray` beside it), as pip writes console scripts.
    ray = root / "bin" / "ray"
    ray.write_text(f"#!{python}\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n")
    ray.chmod(0o755)
    shown = subprocess.run(
        [python, "-c", "import flora_ray.data; print(flora_ray.data.__file__)"],
        check=True, capture_output=True, text=True, timeout=120, cwd=root,
    ).stdout  # fmt: skip
    assert shown.startswith(purelib), shown  # the installed copy, not the source tree
    return root / "bin"


def test_documented_job_submit_runs_the_pipeline():
    from flora_ray.testing.multinode import require_namespaces, run_on_two_nodes

    require_namespaces("the job submission test")
    base = Path(tempfile.mkdtemp(prefix="frj-", dir="/tmp"))  # short: Ray's socket paths live below
    try:
        checkout, head, storage = base / "flora-ray", base / "head", base / "storage"
        _copy_checkout(checkout)
        bin_dir = _image_like_python(base / "py", checkout)
        shutil.rmtree(checkout / "build", ignore_errors=True)  # left by the install
        head.mkdir()
        storage.mkdir()
        entrypoint = ["flora-ray", "run", "experiments/digits_tiny.yaml", "--address", "auto", "--output",
                      str(head / "runs"), f"run.storage={storage}", *SHORT]  # fmt: skip
        script = textwrap.dedent(
            f"""
            cd {checkout}
            ray job submit --address http://127.0.0.1:{DASHBOARD_PORT} --runtime-env cluster/runtime_env.yaml \\
              --submission-id {SUBMISSION_ID} -- {" ".join(f"'{arg}'" for arg in entrypoint)}
            echo "SUBMIT_EXIT $?"
            echo "STATUS_BEGIN"
            ray job status --address http://127.0.0.1:{DASHBOARD_PORT} {SUBMISSION_ID}
            """
        )
        (base / "submit.sh").write_text(script)
        # The user's shell: `ray` and `flora-ray` of that Python on PATH (the nodes inherit it).
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        started = time.monotonic()
        result = run_on_two_nodes(
            ["bash", str(base / "submit.sh")],
            hide=[checkout, head],
            env=env,
            timeout_s=420,
            worker_cpus=2,
            start_timeout_s=120,
            dashboard_port=DASHBOARD_PORT,
            python=str(bin_dir / "python"),
        )
        seconds = time.monotonic() - started
        output = f"after {seconds:.0f} s, exit {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
        print(f"\n[job submit] harness exit {result.returncode} after {seconds:.0f} s")
        assert result.returncode == 0, output
        assert "SUBMIT_EXIT 0" in result.stdout, output
        status = result.stdout.partition("STATUS_BEGIN")[2]  # `ray job status` of the finished job
        assert f"Job '{SUBMISSION_ID}' succeeded" in status, output
        print(f"[job submit] ray job status: Job '{SUBMISSION_ID}' succeeded")
        front = load_front(storage / "digits-tiny")
        assert len(front) >= 1 and {"macs", "accuracy"} <= set(front.columns), output
        assert (storage / "digits-tiny" / ARTEFACTS.pareto).is_file()
        print(f"[job submit] front: {len(front)} subnets in {storage / 'digits-tiny' / ARTEFACTS.pareto}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
