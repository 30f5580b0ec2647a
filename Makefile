# `make demo` runs the offline quickstart, `make test` the test suite; both create
# .venv from requirements.txt on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test lint bench install-check clean

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
# Test reference only; --no-deps keeps torchvision (a CUDA build on PyPI) out.
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

demo: $(VENV)/.installed
	$(PY) -m negclip_jax.demo --workdir $(WORKDIR)

# One worker per CPU (at most 4), each module on one worker (its module fixtures run once).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadscope --durations=15 tests

# The style the tree is held to (pyproject.toml [tool.ruff]); `ruff format .` fixes layout.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed
	$(PY) benchmarks/step_throughput.py
	$(PY) benchmarks/eval_throughput.py

# Wheel + `pip install ".[EXTRA]"` into a fresh venv, then negclip-train/-export of the tiny
# preset from outside the repository (downloads the dependencies; minutes).
install-check:
	scripts/check_install.sh $(EXTRA)

clean:
	rm -rf $(VENV) runs
