# flora-ray: the two commands a newcomer needs are `make quickstart` and `make test`.
# Both create .venv, install everything (PyTorch, the package, the Fashion-MNIST data) and then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flora-ray-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install data tools test test-fast quickstart lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e ".[dev,export,tracking]" $(TORCH_PINS)
	touch $@

install: $(STAMP)

data:
	bash experiments/get_fashion_mnist.sh

# The cluster tests run Ray nodes in network and mount namespaces: unshare, mount (util-linux) and ip (iproute2).
tools:
	@command -v unshare >/dev/null && command -v ip >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && (apt-get install -y -q iproute2 util-linux >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q iproute2 util-linux >/dev/null; }); } || \
	  echo "unshare/ip missing and no root: the two-node tests will be skipped"
# The interactive front's test opens front.html in Debian's headless Chromium.
	@command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && (apt-get install -y -q chromium-headless-shell >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q chromium-headless-shell >/dev/null; }); } || \
	  echo "no headless Chromium and no root: the browser test of front.html will be skipped"

test: install data tools
	$(BIN)/python -m pytest -q

# The small default on Fashion-MNIST, local Ray, 2 CPU workers: teacher, filter, supernet, search, export, report.
quickstart: install data
	$(BIN)/flora-ray run experiments/quickstart.yaml

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check flora_ray tests experiments
	$(BIN)/ruff format --check flora_ray tests experiments
