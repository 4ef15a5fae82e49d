"""benchmarks/packed_gemm_loop.cpp still builds against native.cpp and times a GEMM (its build line is the one
its header gives), so the figures benchmarks/RESULTS.md quotes from it can be measured again."""
import pathlib
import re
import shutil
import subprocess

import pytest

from disttrain.kernels_cpu import native

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None, reason="the packed GEMM loop needs a C++ compiler (g++)"),
    pytest.mark.skipif(native.library() is None or not native.packed_gemm_available(),
                       reason="the packed recurrent GEMM needs an AVX-512 CPU"),
]


def test_the_loop_builds_and_times_one_shape(tmp_path):
    binary = tmp_path / "packed_gemm_loop"
    build = ["g++", "-O3", "-std=c++17", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-pthread",
             f"-I{ROOT / 'disttrain/kernels_cpu'}", str(ROOT / "benchmarks/packed_gemm_loop.cpp"),
             str(ROOT / "disttrain/kernels_cpu/team.cpp"), "-o", str(binary)]
    built = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    ran = subprocess.run([str(binary), "3", "5", "40"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert re.fullmatch(r"\s*3 x\s+5 x\s+40: +[0-9.]+ us a call, +[0-9.]+ GFLOP/s\n", ran.stdout), ran.stdout
