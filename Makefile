# One command sets up and runs each job on a fresh machine (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sd_memfree_installed

.PHONY: demo test install browser clean

# torch/torchvision are pinned to the builds that lie on this machine's disk (CPU or CUDA).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium renders report.html in the tests (Debian's package; needs root). Without it
# those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ; } || echo "chromium not installed: report-rendering tests will be skipped"

demo: $(STAMP)
	$(BIN)/sd-memfree demo --out demo_out

test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo_out bench_out
