# MeanCache: `make demo` runs calibrate → plan → generate on the embedded demo model; `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# On a CPU machine the CPU build of torch 2.13.0 is what pip finds locally; a torch already present is kept.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint bench schedules mutate clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

demo: install
	mkdir -p out
	$(BIN)/meancache calibrate --model demo --out out/demo-calibration.safetensors
	$(BIN)/meancache plan --calibration out/demo-calibration.safetensors --budget 10 --model demo --out out/demo-schedule.yaml
	$(BIN)/meancache generate --model demo --prompt "a yellow star on a purple background" --seed 7 \
		--schedule out/demo-schedule.yaml --out out/demo.png --compare

test: install
	$(BIN)/python -m pytest -q

# Both embedded models: the demo (docs/benchmarks.md) and the hard model (docs/benchmarks-hard.md), about an hour on
# two cores.
bench: install
	$(BIN)/meancache bench --model demo --out docs/bench
	$(BIN)/meancache bench --model hard --out docs/bench-hard

schedules: install
	$(BIN)/python -m meancache_cli.shipped

# Mutation check of core/ and hooks.py with the fast tests (not part of `make test`; run it before a change to
# the core lands). Configured in pyproject.toml [tool.mutmut]; results are cached in mutants/, so a rerun only
# tests the mutants of changed functions. MUTANTS narrows the run, e.g. MUTANTS='meancache_cli.core.planner*'.
# Fails when a surviving or untested mutant is not explained in docs/mutation.md.
MUTATE_JOBS ?= 2
MUTANTS ?=
mutate: install
	$(BIN)/python -m pip install -q "mutmut>=3,<4"
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(BIN)/mutmut results
	@$(BIN)/mutmut results | awk -F: '/: (survived|no tests)$$/ {gsub(/ /, "", $$1); print $$1}' | \
		while read -r name; do grep -qF "$$name" docs/mutation.md || { echo "$$name is not in docs/mutation.md"; exit 1; }; done

lint: install
	$(BIN)/ruff check meancache_cli tests

clean:
	rm -rf out .pytest_cache mutants
