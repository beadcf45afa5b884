# Two entry points for a fresh machine (see README): `make run` and `make test`.
# Both create .venv and install the pinned dependencies (constraints.txt) on first use;
# `make test` (and `make setup`) also install headless Chromium for the HTML report's browser test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUITE ?= default
OUT ?= runs/$(SUITE)
# auto: install Debian's `chromium` with apt-get when it is missing and we are root; no: never
INSTALL_BROWSER ?= auto
BROWSER_LOG ?= $(or $(TMPDIR),/tmp)/fractalbench-chromium-install.log

.PHONY: setup browser run test bench smoke baseline train-baseline clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) browser

# Headless Chromium for tests/reports/test_report_browser.py. Never fails the build: when it
# cannot be installed (not root, no apt-get, no network, INSTALL_BROWSER=no) it says so in one
# line and that test is skipped. Quick when Chromium is already there; `apt-get update` only runs
# when a first install attempt fails (stale or missing package lists, as on a fresh container).
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then \
	  :; \
	elif [ "$(INSTALL_BROWSER)" = no ]; then \
	  echo "chromium: not installed (INSTALL_BROWSER=no); the browser test of the HTML report will be skipped"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || grep -qs '^ID=ubuntu' /etc/os-release; then \
	  echo "chromium: not installed and cannot install it here (needs root and Debian's apt-get); the browser test of the HTML report will be skipped"; \
	else \
	  echo "chromium: installing Debian's chromium package with apt-get (log: $(BROWSER_LOG))"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt_install="apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 chromium"; \
	  if $$apt_install >$(BROWSER_LOG) 2>&1 \
	     || { apt-get update -q -o DPkg::Lock::Timeout=120 >>$(BROWSER_LOG) 2>&1 && $$apt_install >>$(BROWSER_LOG) 2>&1; }; then \
	    echo "chromium: installed ($$(chromium --version 2>/dev/null || echo /usr/bin/chromium))"; \
	  else \
	    echo "chromium: apt-get could not install it (see $(BROWSER_LOG)); the browser test of the HTML report will be skipped"; \
	  fi; \
	fi

run: $(STAMP)
	$(BIN)/fractalbench run $(SUITE) --out $(OUT)

smoke: $(STAMP)
	$(BIN)/fractalbench run smoke --out runs/smoke

# lint first (ruff, configured in pyproject.toml), then the tests
test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# after an intended change: retrain the CI gate's checkpoints (benchmarks/gate_checkpoints) and rewrite its
# baseline run (benchmarks/gate_baseline); the training check's baseline of this CPU's vendor
# (benchmarks/baseline_smoke.json, or _AuthenticAMD) is rewritten by `make train-baseline`
baseline: $(STAMP)
	$(BIN)/python benchmarks/gate.py refresh

train-baseline: $(STAMP)
	$(BIN)/python benchmarks/gate.py train-refresh

bench: $(STAMP)
	$(BIN)/python -m pytest -q -m slow benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
