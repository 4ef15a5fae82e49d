"""Compiled CPU kernels for the hot paths of a training step: the LSTM layer over a whole segment (forward
and backward, one call per layer per segment, its recurrent GEMMs on NumPy's BLAS or, the forward's on
AVX-512 CPUs, on a W_hh^T packed once per call) and the fused log-softmax + cross-entropy (forward and
backward); also Linear's forward with its bias added by the GEMM itself and the embedding backward's
scatter-add; for the Transformer, the tanh GELU, the softmax over the last axis (causal or not) and
LayerNorm, one pass or one visit of each row each way; for gradient clipping and the optimizers, the L2 norms,
the scaling and the SGD and Adam updates of a whole list of arrays in one pass over all their elements.

    native.cpp    the kernels, C++ with a plain C ABI, built by setup.py when disttrain is installed
    attention.cpp the Transformer's kernels (GELU, softmax, LayerNorm, scaled dot-product attention)
    team.cpp/.h   the threads: one team for OpenBLAS's parallel jobs, one for the kernels' row blocks
    simd_math.h   exp and tanh that the compiler vectorises
    clones.h      per-CPU builds of the hot loops (AVX2, AVX-512), picked at load
    native.py     loads the built library with ctypes and hands it NumPy's BLAS gemm
    wrappers.py   the CPU backend's kernel table: kernels_numpy's names, these kernels where they apply

Why this mechanism (a C++ extension compiled at install, called through ctypes, its threads in
team.cpp, as many as disttrain.tensor.threads says) rather than numba or OpenMP: docs/ARCHITECTURE.md, "Compiled CPU kernels".
$DISTTRAIN_CPU_KERNELS=numpy makes the CPU backend use the NumPy kernels instead.
"""
