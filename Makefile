# dicom-node: `make demo` runs the node end to end; `make test` runs every test.
# Both create .venv (Python 3.11) when missing and install the pinned dependencies.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast check lint typecheck docs bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: pip takes it from this machine's disk (a CUDA build that also runs on CPU)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dicom-node demo

# The suite runs in parallel (pytest-xdist): most tests wait on real peers (PostgreSQL, Orthanc,
# DCMTK, Chromium), so three workers keep two cores busy.  TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 3

test: check
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

test-fast: check
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow"

# What `make test` checks before the suite, and what the pre-commit hooks run.
check: lint typecheck docs

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The manual (docs/, mkdocs.yml) into site/; --strict turns a broken link into a failure.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet --site-dir site

bench: $(STAMP)
	$(BIN)/python bench/cli.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/outputs.py
	$(BIN)/python bench/validate.py

# Install as a systemd service (scripts/install --help): sudo make install; staged for packaging
# or tests: make install DESTDIR=/tmp/stage INSTALL_FLAGS="--no-venv --venv /path/to/venv"
.PHONY: install
install:
	DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" SYSCONFDIR="$(SYSCONFDIR)" SYSTEMD_DIR="$(SYSTEMD_DIR)" \
		PYTHON="$(PYTHON)" \
		scripts/install $(INSTALL_FLAGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache site
