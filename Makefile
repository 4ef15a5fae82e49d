# Every target builds its own virtual environment from scratch when it is missing,
# so `make run` and `make test` work on a fresh machine with only python3 and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: run test test-gpu bench mutate clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

# torch (the `bench` extra) is the cross-check oracle in tests and the comparator in benchmarks; CuPy and its
# NVRTC (the `nvrtc` extra) let the CUDA code's compile and import tests run without a GPU
$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test,bench,nvrtc]'
	touch $@

# The main job. Run again, it continues the run in runs/charlm (a finished run only prints its results again)
# instead of replacing it; `make run OVERWRITE=1` starts it over.
RUN_DIR := runs/charlm
RUN_AGAIN = $(if $(OVERWRITE),--overwrite,$(if $(wildcard $(RUN_DIR)/checkpoints/step-*),--resume))
run: $(VENV)/.base
	@if [ "$(RUN_AGAIN)" = "--resume" ]; then \
	    echo "make run: $(RUN_DIR) holds a run: continuing it (make run OVERWRITE=1 starts over)"; fi
	@$(VENV)/bin/disttrain run jobs/charlm.toml --out $(RUN_DIR) $(RUN_AGAIN) || { status=$$?; \
	    if [ $$status -eq 2 ]; then echo "make run: to start $(RUN_DIR) over: make run OVERWRITE=1"; fi; exit $$status; }

# the plain run skips tests/mpi; the mpiexec runs execute them on 2 and 4 ranks (oversubscribed on 2 cores);
# the ops' tests run a second time on the NumPy kernels, the CPU backend's fallback without a C++ compiler.
# The two plain runs spread their tests over TEST_WORKERS processes (pytest-xdist; 0: one process).
# Each run adds its skip counts to the log, and the last line counts them by reason (tests/skip_policy.py);
# with CI=true (or DISTTRAIN_REQUIRE_ALL=1) a test skipped for a missing tool or data set fails.
TEST_WORKERS ?= auto
test: export DISTTRAIN_SKIP_LOG := $(abspath $(VENV))/test-skips.jsonl
test: $(VENV)/.test
	rm -f $$DISTTRAIN_SKIP_LOG
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS)
	DISTTRAIN_CPU_KERNELS=numpy $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) tests/autograd tests/nn tests/kernels_cpu
	$(VENV)/bin/mpiexec -n 2 $(PY) -m pytest -q -p no:cacheprovider --with-mpi tests/mpi
	$(VENV)/bin/mpiexec -n 4 $(PY) -m pytest -q -p no:cacheprovider --with-mpi tests/mpi
	@$(PY) tests/skip_policy.py $$DISTTRAIN_SKIP_LOG

# mutation testing (tools/mutate.py, docs/TESTING.md): hours for every module; pick some and sample, e.g.
#   make mutate MODULES="parallel/buckets.py autograd/ops" MUTATE_ARGS="--sample 100"
mutate: $(VENV)/.test
	nice -n 10 $(PY) tools/mutate.py $(MODULES) $(MUTATE_ARGS)

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
	$(PY) benchmarks/bench_lm_speed.py --job jobs/charlm_transformer.toml --steps 5 --rounds 9
	$(PY) benchmarks/bench_lstm_layer.py
	$(PY) benchmarks/bench_attention.py
	$(PY) benchmarks/bench_checkpoint_budget.py
	$(PY) benchmarks/bench_largest_transformer.py
	$(PY) benchmarks/bench_host_allocator.py
	$(PY) benchmarks/bench_intraop.py
	$(PY) benchmarks/bench_clip_step.py
	$(PY) benchmarks/bench_blas_team.py
	$(VENV)/bin/mpiexec -n 2 $(PY) benchmarks/bench_allreduce_overlap.py
	$(VENV)/bin/mpiexec -n 4 $(PY) benchmarks/bench_sharded_optimizer.py memory
	$(VENV)/bin/mpiexec -n 2 $(PY) benchmarks/bench_sharded_optimizer.py step

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
