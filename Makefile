# Every target builds its own virtual environment from scratch when it is missing,
# so `make run` and `make test` work on a fresh machine with only python3 and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: run test test-gpu bench clean

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

# the plain run skips tests/mpi; the mpiexec runs execute them on 2 and 4 ranks (oversubscribed on 2 cores);
# the ops' tests run a second time on the NumPy kernels, the CPU backend's fallback without a C++ compiler
test: $(VENV)/.test
	$(PY) -m pytest -q -p no:cacheprovider
	DISTTRAIN_CPU_KERNELS=numpy $(PY) -m pytest -q -p no:cacheprovider tests/autograd tests/nn tests/kernels_cpu
	$(VENV)/bin/mpiexec -n 2 $(PY) -m pytest -q -p no:cacheprovider --with-mpi tests/mpi
	$(VENV)/bin/mpiexec -n 4 $(PY) -m pytest -q -p no:cacheprovider --with-mpi tests/mpi

# on a machine with an NVIDIA GPU: the gpu-marked tests and the GPU benchmarks
test-gpu: $(VENV)/.test
	$(PIP) -e '.[cuda]'
	$(PY) -m pytest -q -p no:cacheprovider -m gpu tests
	$(PY) benchmarks/bench_kernels_gpu.py
	$(PY) benchmarks/bench_train_gpu.py

bench: $(VENV)/.test
	$(PY) benchmarks/bench_mlp_step.py
	$(PY) benchmarks/bench_autograd_overhead.py
	$(PY) benchmarks/bench_checkpointing.py
	$(PY) benchmarks/bench_lm_speed.py --steps 20 --rounds 9
	$(PY) benchmarks/bench_lm_speed.py --job jobs/charlm.toml --steps 5 --rounds 9
	$(PY) benchmarks/bench_host_allocator.py
	$(PY) benchmarks/bench_intraop.py
	$(VENV)/bin/mpiexec -n 2 $(PY) benchmarks/bench_allreduce_overlap.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
