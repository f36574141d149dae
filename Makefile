# Two set-up commands: `make demo` (install, train the default spec on digits, sample,
# evaluate log p(x) on the test digits) and `make test`; `make docs` builds the documentation.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned first so that pip takes the local CPU wheel; the rest then finds it satisfied.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench docs clean

$(BIN)/pyrovae: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/pyrovae

demo: install
	$(BIN)/pyrovae train --out runs/demo --force
	$(BIN)/pyrovae sample runs/demo -n 64 -o runs/demo/samples.png --force
	$(BIN)/pyrovae evaluate runs/demo --num-samples 1000
	$(BIN)/pyrovae report runs/demo --limit 300

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The site is built offline, every warning an error; the tutorials run at every build, on one
# CPU thread unless OMP_NUM_THREADS says otherwise.
$(VENV)/.docs: pyproject.toml $(BIN)/pyrovae
	$(BIN)/pip install -q -e ".[dev,docs]"
	touch $@

docs: $(VENV)/.docs
	rm -rf docs/_build docs/api/generated docs/jupyter_execute
	PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} env -u MPLBACKEND \
		$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html
	@echo "docs/_build/html/index.html"

bench: install
	$(BIN)/python benchmarks/train_overhead.py

clean:
	rm -rf $(VENV) runs docs/_build docs/api/generated docs/jupyter_execute
