#!/usr/bin/env bash
# Issue 6's GPU checks as one prepared run, for a lent GPU machine without internet (the device tool):
# the gpu-marked tests, then the kernel-bandwidth and training-throughput benchmarks, each under a time
# limit so that the whole run ends within ~9 minutes. Logs and JSON results go to $OUT (default
# ./gpu-results); benchmarks/RESULTS.md records them with the device's name.
#
# It uses the machine's python3 and what it has installed (NumPy, CuPy, pytest, PyTorch with CUDA);
# disttrain runs from this checkout through PYTHONPATH, nothing is built. Wheels carried in .whl/ (the
# device tool's README says how) are installed to /tmp/site first. With internet, `make test-gpu`
# does the same in a virtual environment.
#
#     bash benchmarks/gpu_checks.sh            # PYTHON=... to pick another interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
    date -u
    nvidia-smi -L || echo "nvidia-smi: not found"
    "$PY" -c "import numpy, cupy; print('numpy', numpy.__version__, 'cupy', cupy.__version__, 'devices',
cupy.cuda.runtime.getDeviceCount())"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

# The modules that hold gpu-marked tests (listed, so that modules needing what the machine lacks, such
# as pytest-mpi, are not even imported).
GPU_TESTS=(tests/gpu tests/kernels_cuda tests/nn/test_nn_gpu.py tests/autograd/test_errors.py
           tests/checkpointing/test_memory_meter.py)
status=0
timeout 330 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfE "${GPU_TESTS[@]}" 2>&1 | tee "$OUT/tests.log" || status=1
timeout 90 "$PY" benchmarks/bench_kernels_gpu.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/bench_kernels.log" || status=1
timeout 150 "$PY" benchmarks/bench_train_gpu.py --out "$OUT/train.json" 2>&1 | tee "$OUT/bench_train.log" || status=1
echo "gpu_checks: exit $status; results in $OUT"
exit $status
