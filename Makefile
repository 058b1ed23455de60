# flora-ray: the two commands a newcomer needs are `make quickstart` and `make test`.
# Both create .venv, install exactly the locked dependencies (requirements.lock, hash-checked), the package and the
# Fashion-MNIST data, and then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flora-ray-installed
LOCK := requirements.lock
EXTRAS := dev,export,tracking,bench
LATEST := .venv-latest
# The newest-versions canary runs these (search, pipeline, CLI and the cluster smoke tests).
LATEST_TESTS := tests/search tests/pipeline tests/cli tests/cluster/test_cluster_files.py \
	tests/cluster/test_two_node_harness.py tests/test_architecture.py

.PHONY: install data tools test test-bench test-fast test-latest quickstart lint lock gpu-check gpu-check-smoke

# Exactly the lock (every package pinned and hash-checked, nothing resolved here), then flora-ray itself on top.
$(STAMP): $(LOCK) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $@

install: $(STAMP)

# Re-resolve the lock from pyproject.toml's ranges: the newest versions they allow, for every platform and
# Python >= 3.10, with hashes. Run `make test` and `make test-latest` after it, and commit the lock.
# `make lock LOCK_UPGRADE=` keeps the locked versions that still fit (only what pyproject.toml changed moves).
LOCK_UPGRADE ?= --upgrade
lock: install
	$(BIN)/uv pip compile pyproject.toml --universal --generate-hashes --python-version 3.10 $(LOCK_UPGRADE) \
	  --extra dev --extra export --extra tracking --extra bench -o $(LOCK)

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

# The product's tests. The benchmark scripts' smoke tests (tests/benchmarks, marked `bench` there) are
# `make test-bench`; .ci/run runs both. TEST_WORKERS pytest-xdist processes share the tests, a module to each at a
# time (--dist loadscope: a module's shared fixture, such as a trained run or a two-node cluster, is built once);
# TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadscope
test: install data tools
	$(BIN)/python -m pytest -q -m "not bench" $(XDIST)

test-bench: install data tools
	$(BIN)/python -m pytest -q -m bench $(XDIST)

# The small default on Fashion-MNIST, local Ray, 2 CPU workers: teacher, filter, supernet, search, export, report.
quickstart: install data
	$(BIN)/flora-ray run experiments/quickstart.yaml

# On a CUDA machine: the DeiT-S recipe shortened to minutes on generated JPEG files, one worker per GPU; prints and
# writes images/s per GPU, GPU busy share, peak memory and loader cores (experiments/gpu_check.py; ARGS=--out FILE).
# Without CUDA it refuses in one line. gpu-check-smoke: the same steps on the CPU with a tiny model.
gpu-check: install
	$(BIN)/python experiments/gpu_check.py $(ARGS)

gpu-check-smoke: install
	$(BIN)/python experiments/gpu_check.py --smoke $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not bench"

# The canary for new releases (not part of CI): a separate venv with the newest versions pyproject.toml's ranges
# allow, no lock, then the search, pipeline, CLI and cluster smoke tests. Run it whenever the dependencies change.
test-latest: data tools
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	$(LATEST)/bin/python -m flora_ray.testing.versions $(LOCK)
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider $(LATEST_TESTS)

lint: install
	$(BIN)/ruff check flora_ray tests experiments
	$(BIN)/ruff format --check flora_ray tests experiments
