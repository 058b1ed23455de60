"""``make data`` on machines other than this one: without root (the Debian package unpacked into ./data, then read by
the pipeline's loader), and without apt (torchvision's download into ./data/FashionMNIST/raw)."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from flora_ray.testing import skip_unless_ci

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "experiments/get_fashion_mnist.sh"
NOBODY = 65534
FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


@pytest.fixture
def checkout():
    """A copy of the script and the package in a directory that an unprivileged user owns (pytest's own temporary
    directories are private to root), removed afterwards."""
    tree = Path(tempfile.mkdtemp(prefix="flora-data-", dir="/tmp"))
    try:
        (tree / "experiments").mkdir()
        shutil.copy2(ROOT / SCRIPT, tree / SCRIPT)
        shutil.copytree(ROOT / "flora_ray", tree / "flora_ray", ignore=shutil.ignore_patterns("__pycache__"))
        tree.chmod(0o755)
        yield tree
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _as_nobody(tree: Path) -> list[str]:
    if os.geteuid() != 0:  # already unprivileged: run as ourselves
        return []
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(tree)], check=True)
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]


def _loads_from(tree: Path, env: dict[str, str], prefix: list[str]) -> str:
    """Where the copied package's loader finds the data (run as the same user, from another directory)."""
    code = (
        "from flora_ray.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist\n"
        "x, y, tx, ty = load_fashion_mnist()\n"
        "assert x.shape == (60000, 28, 28) and tx.shape == (10000, 28, 28), (x.shape, tx.shape)\n"
        "print(find_fashion_mnist())\n"
    )
    out = subprocess.run([*prefix, sys.executable, "-c", code], env={**env, "PYTHONPATH": str(tree)}, cwd="/",
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


@pytest.mark.slow
def test_without_root_the_package_is_unpacked_into_data_and_the_loader_finds_it(checkout):
    if shutil.which("apt-get") is None:
        skip_unless_ci("no apt-get here: the no-root Debian path does not apply", "the no-root path of make data")
    prefix = _as_nobody(checkout)
    env = {**os.environ, "FASHION_MNIST_SYSTEM_DIR": str(checkout / "no-system-data"), "HOME": str(checkout)}
    out = subprocess.run([*prefix, "bash", SCRIPT], cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.strip() == "Fashion-MNIST: data/fashion-mnist"
    assert sorted(p.name for p in (checkout / "data" / "fashion-mnist").iterdir()) == sorted(FILES)
    assert _loads_from(checkout, env, prefix) == str(checkout / "data" / "fashion-mnist")
    again = subprocess.run([*prefix, "bash", SCRIPT], cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout == ""  # in place already: nothing done, nothing printed


def _path_without_apt(tree: Path) -> str:
    """A PATH with every command of this machine but apt's and dpkg's (a machine without apt)."""
    bin_dir = tree / "bin-without-apt"
    bin_dir.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(folder).iterdir() if Path(folder).is_dir() else ():
            if not tool.name.startswith(("apt", "dpkg")) and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    return str(bin_dir)


@pytest.fixture
def mirror(tmp_path):
    """A loopback HTTP server of idx files under torchvision's names; yields (URL, the paths it was asked for)."""
    served = tmp_path / "mirror"
    served.mkdir()
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            asked.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served, asked
    finally:
        server.shutdown()


def test_without_apt_the_script_downloads_with_torchvision_and_checks_the_files(checkout, mirror):
    """No apt: the script asks torchvision for the four files (here from a loopback mirror: this machine has no
    internet). The mirror serves files whose bytes are not the published ones, so torchvision's MD5 check must refuse
    them: the script fails in one line naming the source and data.root, and nothing it leaves is taken for data."""
    url, served, asked = mirror
    for name in FILES:  # valid idx files, but not the published bytes
        (served / name).write_bytes(b"\x1f\x8b" + os.urandom(64))
    env = {**os.environ, "PATH": _path_without_apt(checkout), "PYTHON": sys.executable, "FASHION_MNIST_MIRROR": url,
           "FASHION_MNIST_SYSTEM_DIR": str(checkout / "no-system-data"), "PYTHONPATH": str(checkout)}  # fmt: skip
    out = subprocess.run(["bash", SCRIPT], cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Fashion-MNIST: could not download Fashion-MNIST (30 MB) from {url} into 'data'"), last
    assert last.endswith("set data.root to a directory with the idx files"), last
    assert "/train-images-idx3-ubyte.gz" in asked  # torchvision asked this mirror for the published file names
    with pytest.raises(FileNotFoundError):  # what was refused is not taken for the data set
        from flora_ray.data.fashion_mnist import find_fashion_mnist

        find_fashion_mnist(checkout / "data")


def test_the_loader_searches_where_the_script_puts_the_files():
    """./data/fashion-mnist (no root) and ./data, whose FashionMNIST/raw is torchvision's download (no apt), of this
    checkout are among the places the loader searches (tests/data/test_fashion_mnist.py reads that layout)."""
    from flora_ray.data.fashion_mnist import FASHION_MNIST_DIRS, REPOSITORY_DATA

    assert REPOSITORY_DATA == ROOT / "data"
    assert ROOT / "data" / "fashion-mnist" in FASHION_MNIST_DIRS and ROOT / "data" in FASHION_MNIST_DIRS
