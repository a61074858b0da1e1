# Two entry points (see README): `make demo` runs the main job on the embedded corpus, `make test` runs the suite.
# Both create .venv and install requirements.txt into it first when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint bench-quick clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest -q -n auto --dist loadfile tests

bench-quick: $(STAMP)
	$(PY) -m benchmarks run --suite all --quick --out results/quick

clean:
	rm -rf runs results wandb .pytest_cache
