// The LSTM recurrence's packed GEMM alone (native.cpp packed_gemm), in a C++ loop on one core: microseconds a
// call and GFLOP/s for the row counts the shipped jobs give a thread (ptb_small: 10 or 20 rows of K x N =
// 200 x 800; the char LM: 16 or 32 rows of 256 x 1024), where a Python loop would time its own calls. Build and
// run from the repository root:
//
//   g++ -O3 -std=c++17 -fopenmp-simd -fno-math-errno -fno-trapping-math -pthread -Idisttrain/kernels_cpu \
//       benchmarks/packed_gemm_loop.cpp disttrain/kernels_cpu/team.cpp -o /tmp/packed_gemm_loop
//   /tmp/packed_gemm_loop            (or with M K N for one shape)
#include "native.cpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

void time_shape(i64 m, i64 k, i64 n) {
    std::vector<float> a(m * k, 0.5f), b(k * n, 0.25f), c(m * n), packed(packed_size(k, n));
    pack_panels(b.data(), k, n, n, 1, packed.data());
    const int calls = 20000;
    packed_gemm(m, n, k, a.data(), k, packed.data(), c.data(), n, false);
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < calls; ++r) packed_gemm(m, n, k, a.data(), k, packed.data(), c.data(), n, false);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("%3ld x %4ld x %4ld: %7.2f us a call, %6.1f GFLOP/s\n", static_cast<long>(m), static_cast<long>(k),
                static_cast<long>(n), seconds / calls * 1e6, 2.0 * m * n * k * calls / seconds / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
    if (!dt_packed_gemm_available()) {
        std::printf("the packed GEMM needs an AVX-512 CPU\n");
        return 1;
    }
    if (argc == 4) {
        time_shape(std::atol(argv[1]), std::atol(argv[2]), std::atol(argv[3]));
        return 0;
    }
    for (const i64 m : {10, 20}) time_shape(m, 200, 800);
    for (const i64 m : {13, 16, 32}) time_shape(m, 256, 1024);
    return 0;
}
