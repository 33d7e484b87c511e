# dicom-node: `make demo` runs the node end to end; `make test` runs every test.
# Both create .venv (Python 3.11) when missing and install the pinned dependencies.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench venv clean

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

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/outputs.py

# Install as a systemd service (scripts/install --help): sudo make install; staged for packaging
# or tests: make install DESTDIR=/tmp/stage INSTALL_FLAGS="--no-venv --venv /path/to/venv"
.PHONY: install
install:
	DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" SYSCONFDIR="$(SYSCONFDIR)" SYSTEMD_DIR="$(SYSTEMD_DIR)" \
		PYTHON="$(PYTHON)" \
		scripts/install $(INSTALL_FLAGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
