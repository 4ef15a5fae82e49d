# Every target builds its own virtual environment from scratch when it is missing,
# so `make run` and `make test` work on a fresh machine with only python3 and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: run test test-mpi bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

# torch (the `bench` extra) is the cross-check oracle in tests and the comparator in benchmarks
$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test,bench]'
	touch $@

run: $(VENV)/.base
	$(VENV)/bin/disttrain run jobs/charlm.toml

test: $(VENV)/.test
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(VENV)/.test
	$(PY) benchmarks/bench_mlp_step.py
	$(PY) benchmarks/bench_autograd_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
