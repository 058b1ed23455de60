#!/usr/bin/env bash
# Puts the Fashion-MNIST idx files (Debian package dataset-fashion-mnist) where flora-ray finds them.
#   root (or passwordless sudo): apt-get install -y dataset-fashion-mnist  -> /usr/share/datasets/fashion-mnist
#   otherwise: apt-get download + dpkg-deb -x into ./data/debian          -> ./data/fashion-mnist
set -euo pipefail
cd "$(dirname "$0")/.."
system_dir=${FASHION_MNIST_SYSTEM_DIR:-/usr/share/datasets/fashion-mnist}  # override: tests of the no-root path
local_dir=data/fashion-mnist
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_all() { for f in "${files[@]}"; do [ -s "$1/$f" ] || return 1; done; }

if have_all "$system_dir" || have_all "$local_dir"; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo apt-get install -y -q dataset-fashion-mnist >/dev/null
fi
if have_all "$system_dir"; then
  echo "Fashion-MNIST: $system_dir"
  exit 0
fi
# No root: unpack the package into the project.
mkdir -p data/debian
( cd data/debian && apt-get download dataset-fashion-mnist >/dev/null )
dpkg-deb -x data/debian/dataset-fashion-mnist_*.deb data/debian/root
mkdir -p "$local_dir"
cp data/debian/root/usr/share/datasets/fashion-mnist/*.gz "$local_dir/"
have_all "$local_dir" || { echo "Fashion-MNIST: could not install the data (apt-get download failed)" >&2; exit 1; }
echo "Fashion-MNIST: $local_dir"
