# Two entry points for a fresh machine (see README): `make run` and `make test`.
# Both create .venv and install the pinned dependencies (constraints.txt) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUITE ?= default
OUT ?= runs/$(SUITE)

.PHONY: setup run test bench smoke clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/fractalbench run $(SUITE) --out $(OUT)

smoke: $(STAMP)
	$(BIN)/fractalbench run smoke --out runs/smoke

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pytest -q -m slow benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
