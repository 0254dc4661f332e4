# vlm_post: `make demo` runs the CPU demo end to end, `make test` the test suite.
# Both install first, into .venv, from the exact pins in requirements/lock.txt.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vlm_post-installed
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean-demo

setup: $(STAMP)

# Idempotent: re-runs only when the pins or the package metadata change.
$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c requirements/lock.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q

# Bench extras (the side-by-side baselines, e.g. TRL) go into .venv only here, never as runtime dependencies.
bench: setup
	$(PY) -m pip install --quiet -c requirements/lock.txt -e '.[bench]'
	@# bench/_*.py are helpers the scripts share, not scripts
	@for script in bench/[!_]*.py; do [ -e "$$script" ] || continue; echo "== $$script"; $(PY) "$$script" || exit 1; done

clean-demo:
	rm -rf runs/demo
