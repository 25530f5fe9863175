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
	$(BIN)/meancache plan --calibration out/demo-calibration.safetensors --budget 10 --out out/demo-schedule.yaml
	$(BIN)/meancache generate --model demo --prompt "a yellow star on a purple background" --seed 7 \
		--schedule out/demo-schedule.yaml --out out/demo.png --compare

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/meancache bench --model demo --out docs/bench

schedules: install
	$(BIN)/python -m meancache_cli.shipped

# Mutation check of core/ and hooks.py with the fast tests (minutes; not part of `make test`).
mutate: install
	$(BIN)/python -m pip install -q "mutmut>=3,<4"
	$(BIN)/mutmut run
	$(BIN)/mutmut results > docs/mutants.txt || true

lint: install
	$(BIN)/ruff check meancache_cli tests

clean:
	rm -rf out .pytest_cache
