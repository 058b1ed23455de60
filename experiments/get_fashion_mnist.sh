#!/usr/bin/env bash
# Puts the Fashion-MNIST idx files where flora-ray finds them (flora_ray/data/fashion_mnist.py, FASHION_MNIST_DIRS):
#   root (or passwordless sudo): apt-get install -y dataset-fashion-mnist  -> /usr/share/datasets/fashion-mnist
#   apt but no root: apt-get download + dpkg-deb -x                       -> ./data/fashion-mnist
#   no apt (macOS, Fedora, conda) or apt failed: torchvision's download    -> ./data/FashionMNIST/raw (30 MB,
#     from torchvision's mirror, MD5-checked; FASHION_MNIST_MIRROR=URL/ names another server of the same files)
# PYTHON: the interpreter with torchvision (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
system_dir=${FASHION_MNIST_SYSTEM_DIR:-/usr/share/datasets/fashion-mnist}  # override: tests of the no-root path
local_dir=data/fashion-mnist
torchvision_dir=data/FashionMNIST/raw
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_all() { for f in "${files[@]}"; do [ -s "$1/$f" ] || [ -s "$1/${f%.gz}" ] || return 1; done; }

for dir in "$system_dir" "$local_dir" "$torchvision_dir"; do
  if have_all "$dir"; then exit 0; fi
done

from_debian() {
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get install -y -q dataset-fashion-mnist >/dev/null
  fi
  if have_all "$system_dir"; then
    echo "Fashion-MNIST: $system_dir"
    return 0
  fi
  # No root: unpack the package into the project.
  mkdir -p data/debian
  ( cd data/debian && apt-get download dataset-fashion-mnist >/dev/null ) || return 1
  dpkg-deb -x data/debian/dataset-fashion-mnist_*.deb data/debian/root || return 1
  mkdir -p "$local_dir"
  cp data/debian/root/usr/share/datasets/fashion-mnist/*.gz "$local_dir/"
  have_all "$local_dir" && echo "Fashion-MNIST: $local_dir"
}

if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
  if from_debian; then exit 0; fi
  echo "Fashion-MNIST: the Debian package could not be installed or unpacked; trying torchvision's download" >&2
fi

python=${PYTHON:-}
[ -n "$python" ] || { [ -x .venv/bin/python ] && python=.venv/bin/python; } || python=python3
"$python" - <<'PY'
import os
import sys

try:
    from flora_ray.data.fashion_mnist import download_fashion_mnist
except ImportError as exc:
    sys.exit(f"Fashion-MNIST: no apt and no flora-ray here ({exc}); run `make install` first, or set data.root")
try:
    print(f"Fashion-MNIST: {download_fashion_mnist('data', os.environ.get('FASHION_MNIST_MIRROR') or None)}")
except RuntimeError as exc:
    sys.exit(f"Fashion-MNIST: {exc}")
PY
