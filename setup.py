"""The compiled CPU kernels (disttrain/kernels_cpu/*.cpp), built when disttrain is installed.

Metadata lives in pyproject.toml; this file only declares the extension, which setuptools does not yet
take from pyproject.toml without an experimental flag. `optional=True`: without a C++ compiler the
install still succeeds and disttrain runs on its NumPy kernels (it says so once when it first needs them).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "disttrain.kernels_cpu._native",
    sources=["disttrain/kernels_cpu/native.cpp", "disttrain/kernels_cpu/attention.cpp",
             "disttrain/kernels_cpu/team.cpp"],
    depends=["disttrain/kernels_cpu/clones.h", "disttrain/kernels_cpu/simd_math.h", "disttrain/kernels_cpu/team.h"],
    language="c++",
    # -fopenmp-simd: `#pragma omp simd` only; no OpenMP runtime or thread pool (the intra-op threads run the
    # row blocks). -fno-trapping-math: lets GCC turn the clamps and selects of exp/tanh into vector blends
    # (nothing here reads floating-point exception flags); results do not change. No -march=native:
    # native.cpp picks AVX-512 / AVX2 code at load time (target_clones).
    extra_compile_args=["-O3", "-std=c++17", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-pthread"],
    extra_link_args=["-pthread"],  # team.cpp's std::thread
    optional=True,
)])
