"""Our CUDA C kernels: the CUDA backend's `kernels` (CudaBackend.kernels is the `wrappers` module).

    common.cuh      the shared __device__ preamble: float/double math, sigmoid, activations,
                    warp/block reductions, online log-sum-exp, grid-stride loops, block sizes
    lstm.cu         fused LSTM cell forward and backward (gates + cell/hidden update; GEMMs on cuBLAS)
    xent.cu         fused log-softmax + cross-entropy: one online log-sum-exp pass per row (a warp per
                    narrow row, a block per wide row), one elementwise pass for the gradient, ignore_index
    embedding.cu    embedding backward: atomic scatter-add of rows
    elementwise.cu  bias + activation forward and backward
    optim.cu        SGD (momentum, Nesterov, weight decay) and Adam/AdamW (AMSGrad) over flat buffers
    norms.cu        gradient norms (2, inf, p), host-coefficient scaling, on-device clipping
    bucket.cu       bucket pack/unpack with a fused scale, for allreduce
    gelu.cu         GELU forward and backward, tanh and exact (erfc) forms (backward recomputes from the input)
    softmax.cu      softmax over the last axis, optionally causal (an online log-sum-exp pass, a warp or a
                    block per row), and its backward with the row dot product fused in
    layer_norm.cu   LayerNorm forward and backward, a warp per row; the weight and bias gradients by column
    loader.py       compiles each source once per process with cupy.RawModule, caches named kernels
    random.cu       counter-based uniform random numbers (dropout masks), bit for bit kernels_numpy's
    launch_config.py launch configurations (pure Python, tested on the CPU)
    wrappers.py     kernels_numpy's names and signatures, launching the kernels above
    emulator.py     runs the .cu kernels on the CPU for tests (C++ with emulator_runtime.h's stand-in
                    built-ins); loader.kernel's signature, cupy.RawKernel's call convention;
                    emulator_memory.py puts an inaccessible page after every array argument

Every kernel has a NumPy reference of the same name in disttrain.tensor.kernels_numpy.

What checks the kernels (tests/kernels_cuda on the CPU, tests/gpu on a GPU):
  - CPU, in CI: every source compiles with nvcc to PTX for sm_80 and sm_90 with warnings as errors,
    also as the self-contained text NVRTC gets; ptxas reports no spills and registers that fit the
    launch blocks; the launch helpers; the wrappers' names/signatures; every launch's arguments
    checked against the kernel's C parameter list; the NumPy references against independent math;
    every kernel, through its wrapper, against its reference on the emulator; every op and
    a few training steps with the CPU backend's kernels swapped for the wrappers over the emulator,
    against the NumPy kernels (tests/kernels_cuda, the "emulated" runs).
  - GPU (marked `gpu`): the same tests of tests/kernels_cuda on the "cuda" device; tests/gpu:
    CUDA-graph replay vs eager, random-state round trips, memory-pool figures. The emulator does
    not reproduce the GPU's rounding, memory or concurrency; which GPU runs have been made is in
    benchmarks/RESULTS.md.
This package imports nothing at import time; loader.py guards `import cupy` (`loader.available`).
"""
