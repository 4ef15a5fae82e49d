// The CPU backend's compiled kernels (attention's are in attention.cpp): the LSTM layer over a whole segment
// (forward and backward), the fused log-softmax + cross-entropy (forward and backward), Linear's forward with its
// bias, the row scatter-add of the embedding backward, the Transformer's GELU, softmax and LayerNorm, and the
// multi-tensor passes of gradient clipping and the optimizers (their own sections below). Layouts and arithmetic
// are those of disttrain/tensor/kernels_numpy.py, the reference these are tested against.
//
// Every kernel works on a block of rows [lo, hi) (batch rows for the LSTM, logit rows for the
// cross-entropy) and touches nothing outside it, so each exported kernel takes a list of blocks and runs
// them side by side on the row-block team (team.h): an LSTM batch row's recurrence never reads another row,
// so the blocks need no synchronisation between time steps. The recurrent GEMMs call the BLAS that
// NumPy loaded (its Fortran gemm, whose address dt_set_blas receives), on the calling thread: the
// wrappers hold that BLAS to one thread while the blocks run (the forward's, on AVX-512, our own GEMM on a
// packed W_hh^T). Linear's GEMM is one BLAS call on the BLAS's threads; the scatter-add takes a block of
// columns.
//
// Plain C ABI (loaded with ctypes, which releases the GIL for the call); no Python API is used.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "clones.h"
#include "simd_math.h"
#include "team.h"

namespace {

using i64 = int64_t;

// ---- BLAS: Fortran ?gemm_ with 32-bit (LP64) or 64-bit (ILP64) integers -----------------------------

template <typename T, typename I>
using gemm_fn = void (*)(const char*, const char*, const I*, const I*, const I*, const T*, const T*, const I*,
                         const T*, const I*, const T*, T*, const I*);

struct Blas {
    void* sgemm = nullptr;
    void* dgemm = nullptr;
    bool int64 = false;
};
Blas blas;

template <typename T> void* gemm_address();
template <> void* gemm_address<float>() { return blas.sgemm; }
template <> void* gemm_address<double>() { return blas.dgemm; }

template <typename T, typename I>
void fortran_gemm(char ta, char tb, i64 m, i64 n, i64 k, T alpha, const T* a, i64 lda, const T* b, i64 ldb,
                  T beta, T* c, i64 ldc) {
    const I mi = m, ni = n, ki = k, ldai = lda, ldbi = ldb, ldci = ldc;
    reinterpret_cast<gemm_fn<T, I>>(gemm_address<T>())(&ta, &tb, &mi, &ni, &ki, &alpha, a, &ldai, b, &ldbi,
                                                       &beta, c, &ldci);
}

// C (M x N) = A (M x K) B (K x N) + beta C, all row-major: the column-major BLAS computes C^T = B^T A^T
template <typename T>
void gemm_rows(i64 m, i64 n, i64 k, const T* a, i64 lda, const T* b, i64 ldb, T beta, T* c, i64 ldc) {
    if (blas.int64)
        fortran_gemm<T, int64_t>('N', 'N', n, m, k, T(1), b, ldb, a, lda, beta, c, ldc);
    else
        fortran_gemm<T, int32_t>('N', 'N', n, m, k, T(1), b, ldb, a, lda, beta, c, ldc);
}

// The rows of C in BLAS calls of at most `chunk` rows each (chunk <= 0: one call), same arguments as gemm_rows
template <typename T>
void gemm_row_chunks(i64 chunk, i64 m, i64 n, i64 k, const T* a, i64 lda, const T* b, i64 ldb, T beta, T* c,
                     i64 ldc) {
    if (chunk <= 0) chunk = m;
    for (i64 r = 0; r < m; r += chunk)
        gemm_rows<T>(m - r < chunk ? m - r : chunk, n, k, a + r * lda, lda, b, ldb, beta, c + r * ldc, ldc);
}

// ---- the recurrence's GEMMs on a packed W_hh^T (forward) or W_hh (backward) ----------------------------
// The recurrent GEMMs are small, (rows, K) x (K, N) with rows <= the batch, and a BLAS call copies ("packs")
// the (K, N) operand each time or runs an unpacked kernel. Packed once per layer call, in panels of
// PANEL columns ([N / PANEL][K][PANEL], zero-padded), the product of up to 12 rows and a panel keeps its
// 24 AVX-512 accumulators in registers and reads each panel row once for all 12 rows. Every output is the
// same sequence of multiply-adds over k whatever the row blocking, so the results do not depend on how
// the batch is split over threads. AVX-512 only (dt_packed_gemm_available); elsewhere the BLAS runs, and for
// the backward's d_pre W_hh too where the whole batch fits its small-matrix kernels (wrappers.lstm_layer_backward).

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DT_PACKED_GEMM 1
#define DT_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define DT_PACKED_GEMM 0
#define DT_AVX512
#endif

constexpr i64 PANEL = 32;
constexpr int PACKED_ROWS = 12;

i64 packed_size(i64 k, i64 n) { return (n + PANEL - 1) / PANEL * k * PANEL; }

// panels of B (K x N) with B[kk][j] = src[kk * row_stride + j * col_stride], read along src's contiguous axis
void pack_panels(const float* src, i64 k, i64 n, i64 row_stride, i64 col_stride, float* out) {
    for (i64 j0 = 0; j0 < n; j0 += PANEL) {
        float* panel = out + j0 * k;
        const i64 cols = n - j0 < PANEL ? n - j0 : PANEL;
        if (cols < PANEL) std::memset(panel, 0, sizeof(float) * k * PANEL);
        if (col_stride == 1) {
            for (i64 kk = 0; kk < k; ++kk)
                std::memcpy(panel + kk * PANEL, src + kk * row_stride + j0, sizeof(float) * cols);
        } else {
            for (i64 j = 0; j < cols; ++j)
                for (i64 kk = 0; kk < k; ++kk) panel[kk * PANEL + j] = src[kk * row_stride + (j0 + j) * col_stride];
        }
    }
}

// How packed_block writes its sums into C: C = sums, C = C + sums (a BLAS GEMM's beta = 1), or the sums
// continuing from C (the next slice of K)
enum class Into { store, add, resume };

// R rows of A (lda) times kc rows of one panel into c (ldc, `cols` <= PANEL columns)
template <int R>
DT_AVX512 void packed_block(const float* a, i64 lda, const float* panel, i64 kc, float* c, i64 ldc, i64 cols,
                            Into into) {
    float acc[R][PANEL];
    for (int r = 0; r < R; ++r)
#pragma omp simd
        for (i64 j = 0; j < PANEL; ++j) acc[r][j] = into == Into::resume && j < cols ? c[r * ldc + j] : 0.0f;
    for (i64 kk = 0; kk < kc; ++kk) {
        const float* row = panel + kk * PANEL;
        for (int r = 0; r < R; ++r) {
            const float v = a[r * lda + kk];
#pragma omp simd
            for (i64 j = 0; j < PANEL; ++j) acc[r][j] += v * row[j];
        }
    }
    if (cols == PANEL) {   // whole panels as vector stores
        for (int r = 0; r < R; ++r) {
            float* out = c + r * ldc;
            if (into == Into::add) {
#pragma omp simd
                for (i64 j = 0; j < PANEL; ++j) out[j] += acc[r][j];
            } else {
#pragma omp simd
                for (i64 j = 0; j < PANEL; ++j) out[j] = acc[r][j];
            }
        }
        return;
    }
    for (int r = 0; r < R; ++r)
        for (i64 j = 0; j < cols; ++j) c[r * ldc + j] = into == Into::add ? c[r * ldc + j] + acc[r][j] : acc[r][j];
}

using PackedBlock = void (*)(const float*, i64, const float*, i64, float*, i64, i64, Into);
// packed_block<R> by its row count R
constexpr PackedBlock PACKED_BLOCKS[PACKED_ROWS + 1] = {
    nullptr,           packed_block<1>,  packed_block<2>, packed_block<3>, packed_block<4>,
    packed_block<5>,   packed_block<6>,  packed_block<7>, packed_block<8>, packed_block<9>,
    packed_block<10>,  packed_block<11>, packed_block<12>};

// Rows of the panel's K a block of A's rows reads before the next block: PACKED_K * PANEL floats (32 KB)
// stay in the L1 cache for every block of rows
constexpr i64 PACKED_K = 256;

// m rows of A as the fewest blocks of at most PACKED_ROWS (12), as even as they go (10: one block, 16: 8 + 8,
// 20: 10 + 10, 32: 11 + 11 + 10). Up to 12 rows keep up to 24 accumulators busy for the two panel loads of
// each k, and read each panel from the L2 cache once for all of them; a block of 1 to 3 rows has too few to
// keep both FMA units busy. Worked out once per GEMM, not for every panel and slice of K (integer divisions).
struct RowBlocks {
    i64 count, rows, larger;   // `count` blocks of `rows` rows, the first `larger` of them one row more
    explicit RowBlocks(i64 m)
        : count((m + PACKED_ROWS - 1) / PACKED_ROWS), rows(m / count), larger(m % count) {}
    i64 rows_of(i64 block) const { return block < larger ? rows + 1 : rows; }
};

// C (m x N, ldc) = A (m x K, lda) B, or C + A B (accumulate), B packed by pack_panels: per panel and slice of
// K, the RowBlocks of A. Each output is one chain of multiply-adds over k (added to C after the first slice of
// K when accumulating), the same whatever the blocks of rows.
void packed_gemm(i64 m, i64 n, i64 k, const float* a, i64 lda, const float* packed, float* c, i64 ldc,
                 bool accumulate) {
    if (m <= 0) return;
    const RowBlocks blocks(m);
    for (i64 j0 = 0; j0 < n; j0 += PANEL) {
        const i64 cols = n - j0 < PANEL ? n - j0 : PANEL;
        for (i64 k0 = 0; k0 < k; k0 += PACKED_K) {
            const i64 kc = k - k0 < PACKED_K ? k - k0 : PACKED_K;
            const float* panel = packed + j0 * k + k0 * PANEL;
            const Into into = k0 > 0 ? Into::resume : accumulate ? Into::add : Into::store;
            for (i64 block = 0, r = 0; block < blocks.count; ++block) {
                const i64 rows = blocks.rows_of(block);
                const float* a_block = a + r * lda + k0;
                float* c_block = c + r * ldc + j0;
                PACKED_BLOCKS[rows](a_block, lda, panel, kc, c_block, ldc, cols, into);
                r += rows;
            }
        }
    }
}

// The recurrence's GEMM, C = A B + beta C with beta 0 or 1: on the packed B where there is one (float32 on
// AVX-512), else the BLAS in calls of `chunk` rows (gemm_row_chunks)
template <typename T>
void recurrent_gemm(const float* packed, i64 chunk, i64 m, i64 n, i64 k, const T* a, i64 lda, const T* b, i64 ldb,
                    T beta, T* c, i64 ldc) {
    if constexpr (std::is_same_v<T, float>) {
        if (packed) {
            packed_gemm(m, n, k, a, lda, packed, c, ldc, beta != 0.0f);
            return;
        }
    }
    gemm_row_chunks<T>(chunk, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

// ---- LSTM ------------------------------------------------------------------------------------------
// Gate order i, f, g, o (PyTorch's). sigmoid: dt::sigmoid_, in float32 1 / (1 + exp(-x)), a few ulp from the
// NumPy kernels' tanh(x / 2) / 2 + 1/2 and fewer operations than a tanh; in float64 that same form.

// One batch row of one step: pre (4H) = gates_x + h W_hh^T becomes the activations [i, f, g, o] in
// place; writes h, c and tanh(c) (H each) from c_prev.
template <typename T>
DT_CLONES void lstm_activate_row(T* pre, const T* c_prev, T* h, T* c, T* tanh_c, i64 hidden) {
    T* pi = pre;
    T* pf = pre + hidden;
    T* pg = pre + 2 * hidden;
    T* po = pre + 3 * hidden;
#pragma omp simd
    for (i64 j = 0; j < hidden; ++j) {
        T i = dt::sigmoid_(pi[j]);
        T f = dt::sigmoid_(pf[j]);
        T g = dt::tanh_(pg[j]);
        T o = dt::sigmoid_(po[j]);
        pi[j] = i;
        pf[j] = f;
        pg[j] = g;
        po[j] = o;
        T cj = f * c_prev[j] + i * g;
        T tc = dt::tanh_(cj);
        c[j] = cj;
        tanh_c[j] = tc;
        h[j] = o * tc;
    }
}

// Batch rows [lo, hi) of a layer over `steps` steps. acts (T, B, 4H) holds gates_x on entry and the
// activations on return; w_t (H, 4H) is W_hh^T, contiguous, or (float32) packed is W_hh^T packed by
// pack_panels and w_t is not read; out, cs, tanh_c (T, B, H). chunk: rows per BLAS call (0: the block's
// rows in one call), so that the wrappers can keep each call under the BLAS's small-matrix bound.
template <typename T>
void lstm_forward(T* acts, const T* h0, const T* c0, const T* w_t, const float* packed, T* out, T* cs, T* tanh_c,
                  i64 steps, i64 batch, i64 hidden, i64 lo, i64 hi, i64 chunk) {
    const i64 rows = hi - lo, four_h = 4 * hidden;
    for (i64 t = 0; t < steps; ++t) {
        T* pre = acts + (t * batch + lo) * four_h;
        const i64 here = (t * batch + lo) * hidden, before = ((t - 1) * batch + lo) * hidden;
        const T* h_prev = t ? out + before : h0 + lo * hidden;
        const T* c_prev = t ? cs + before : c0 + lo * hidden;
        recurrent_gemm<T>(packed, chunk, rows, four_h, hidden, h_prev, hidden, w_t, four_h, T(1), pre, four_h);
        for (i64 r = 0; r < rows; ++r)
            lstm_activate_row<T>(pre + r * four_h, c_prev + r * hidden, out + here + r * hidden,
                                 cs + here + r * hidden, tanh_c + here + r * hidden, hidden);
    }
}

// One batch row of one backward step (kernels_numpy._lstm_backward_factors and _lstm_step_backward,
// with the same products in the same order): from dh (the step's total incoming h gradient) and dc,
// writes d_pre (4H) and replaces dc by the gradient of c_prev.
template <typename T>
DT_CLONES void lstm_backward_row(const T* dh, T* dc, const T* act, const T* tanh_c, const T* c_prev, T* d_pre,
                                 i64 hidden) {
    const T one = T(1);
    const T* ai = act;
    const T* af = act + hidden;
    const T* ag = act + 2 * hidden;
    const T* ao = act + 3 * hidden;
#pragma omp simd
    for (i64 j = 0; j < hidden; ++j) {
        T i = ai[j], f = af[j], g = ag[j], o = ao[j], tc = tanh_c[j];
        T dc_total = dh[j] * ((one - tc * tc) * o) + dc[j];
        d_pre[j] = ((one - i) * i * g) * dc_total;
        d_pre[hidden + j] = ((one - f) * f * c_prev[j]) * dc_total;
        d_pre[2 * hidden + j] = ((one - g * g) * i) * dc_total;
        d_pre[3 * hidden + j] = ((one - o) * o * tc) * dh[j];
        dc[j] = dc_total * f;
    }
}

template <typename T>
DT_CLONES void add_rows(const T* a, const T* b, T* out, i64 n) {
#pragma omp simd
    for (i64 j = 0; j < n; ++j) out[j] = a[j] + b[j];
}

// Batch rows [lo, hi) of lstm_layer_backward. d_out (T, B, H); dh_n, dc_n (B, H); acts (T, B, 4H);
// tanh_c, cs (T, B, H); c0 (B, H); w (4H, H) = W_hh, or (float32) packed is W_hh packed by pack_panels and w
// is not read. Writes d_gates (T, B, 4H) and dh0, dc0 (B, H),
// which also carry dh and dc between the steps. dh_step (B, H): scratch. chunk: as lstm_forward's.
template <typename T>
void lstm_backward(const T* d_out, const T* dh_n, const T* dc_n, const T* acts, const T* tanh_c, const T* cs,
                   const T* c0, const T* w, const float* packed, T* d_gates, T* dh0, T* dc0, T* dh_step, i64 steps,
                   i64 batch, i64 hidden, i64 lo, i64 hi, i64 chunk) {
    const i64 rows = hi - lo, four_h = 4 * hidden;
    T* dh = dh0 + lo * hidden;
    T* dc = dc0 + lo * hidden;
    T* dh_t = dh_step + lo * hidden;
    std::memcpy(dh, dh_n + lo * hidden, sizeof(T) * rows * hidden);
    std::memcpy(dc, dc_n + lo * hidden, sizeof(T) * rows * hidden);
    for (i64 t = steps - 1; t >= 0; --t) {
        const i64 here = (t * batch + lo) * hidden;
        const T* c_prev = t ? cs + ((t - 1) * batch + lo) * hidden : c0 + lo * hidden;
        T* d_pre = d_gates + (t * batch + lo) * four_h;
        add_rows<T>(d_out + here, dh, dh_t, rows * hidden);
        for (i64 r = 0; r < rows; ++r)
            lstm_backward_row<T>(dh_t + r * hidden, dc + r * hidden, acts + (t * batch + lo + r) * four_h,
                                 tanh_c + here + r * hidden, c_prev + r * hidden, d_pre + r * four_h, hidden);
        recurrent_gemm<T>(packed, chunk, rows, hidden, four_h, d_pre, four_h, w, hidden, T(0), dh, hidden);
    }
}

// ---- log-softmax + cross-entropy ---------------------------------------------------------------------

template <typename T>
DT_CLONES T row_max(const T* x, i64 n) {
    T m = x[0];
#pragma omp simd reduction(max : m)
    for (i64 j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
    return m;
}

// sum_j exp(x_j - shift), storing the terms in e when e is not null. Every x_j - shift is <= 0 or NaN (shift: the
// row's maximum), unless ANY_SIGN
template <typename T, bool ANY_SIGN = false>
DT_CLONES T row_sumexp(const T* x, T shift, T* e, i64 n) {
    const auto exp = [](T v) { return ANY_SIGN ? dt::exp_(v) : dt::exp_nonpositive_(v); };
    T s = 0;
    if (e) {
#pragma omp simd reduction(+ : s)
        for (i64 j = 0; j < n; ++j) {
            T v = exp(x[j] - shift);
            e[j] = v;
            s += v;
        }
    } else {
#pragma omp simd reduction(+ : s)
        for (i64 j = 0; j < n; ++j) s += exp(x[j] - shift);
    }
    return s;
}

// Rows [lo, hi) of cross_entropy_forward: losses (N,) = log sum exp(x - max) - (x[target] - max), 0 on
// rows whose target is ignore_index; sumexp (N,); exp (N, C) the shifted exponentials, when not null.
// A target outside [0, C) on another row gives a NaN loss (the op checks the classes before).
template <typename T>
void cross_entropy_forward(const T* logits, const int64_t* target, i64 ignore_index, T* exp, T* sumexp,
                           T* losses, i64 classes, i64 lo, i64 hi) {
    for (i64 r = lo; r < hi; ++r) {
        const T* x = logits + r * classes;
        const T shift = row_max<T>(x, classes);
        const T s = row_sumexp<T>(x, shift, exp ? exp + r * classes : nullptr, classes);
        sumexp[r] = s;
        const bool valid = target[r] != ignore_index;
        const i64 k = valid ? target[r] : 0;
        if (k < 0 || k >= classes) {
            losses[r] = T(NAN);
            continue;
        }
        losses[r] = (std::log(s) - (x[k] - shift)) * T(valid);
    }
}

template <typename T>
DT_CLONES void scale_row(T* x, T k, i64 n) {
#pragma omp simd
    for (i64 j = 0; j < n; ++j) x[j] *= k;
}

// Rows [lo, hi) of cross_entropy_backward from forward's exp, in place: grad = exp * (row_scale / sumexp),
// minus row_scale at the target class (skipped for a target outside [0, C)).
template <typename T>
void cross_entropy_backward(T* grad, const T* sumexp, const T* row_scale, const int64_t* target, i64 classes,
                            i64 lo, i64 hi) {
    for (i64 r = lo; r < hi; ++r) {
        scale_row<T>(grad + r * classes, row_scale[r] / sumexp[r], classes);
        const i64 k = target[r];
        if (k >= 0 && k < classes) grad[r * classes + k] -= row_scale[r];
    }
}

}  // namespace

extern "C" {

// The BLAS's Fortran sgemm_ and dgemm_ addresses; int64: nonzero when its integers are 64-bit (ILP64).
void dt_set_blas(void* sgemm, void* dgemm, int int64) {
    blas.sgemm = sgemm;
    blas.dgemm = dgemm;
    blas.int64 = int64 != 0;
}

// Nonzero where the recurrence can run on a packed W_hh (dt_pack_panels): an AVX-512 CPU, this compiler.
int dt_packed_gemm_available() {
#if DT_PACKED_GEMM
    return __builtin_cpu_supports("x86-64-v4") != 0;
#else
    return 0;
#endif
}

// The floats dt_pack_panels writes for a (K x N) operand
i64 dt_packed_size(i64 k, i64 n) { return packed_size(k, n); }

// Pack B (K x N), B[kk][j] = src[kk * row_stride + j * col_stride], into out (dt_packed_size(k, n) floats)
void dt_pack_panels(const float* src, i64 k, i64 n, i64 row_stride, i64 col_stride, float* out) {
    pack_panels(src, k, n, row_stride, col_stride, out);
}

#define DT_EXPORT_ALL(S, T)                                                                                   \
    void dt_lstm_forward_##S(T* acts, const T* h0, const T* c0, const T* w_t, const float* packed, T* out,    \
                             T* cs, T* tanh_c, i64 steps, i64 batch, i64 hidden, const i64* bounds,           \
                             i64 blocks, i64 chunk) {                                                         \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            lstm_forward<T>(acts, h0, c0, w_t, packed, out, cs, tanh_c, steps, batch, hidden, lo, hi, chunk); \
        });                                                                                                   \
    }                                                                                                         \
    void dt_lstm_backward_##S(const T* d_out, const T* dh_n, const T* dc_n, const T* acts, const T* tanh_c,   \
                              const T* cs, const T* c0, const T* w, const float* packed, T* d_gates, T* dh0,  \
                              T* dc0, T* dh_step, i64 steps, i64 batch, i64 hidden, const i64* bounds,        \
                              i64 blocks, i64 chunk) {                                                        \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            lstm_backward<T>(d_out, dh_n, dc_n, acts, tanh_c, cs, c0, w, packed, d_gates, dh0, dc0, dh_step,  \
                             steps, batch, hidden, lo, hi, chunk);                                            \
        });                                                                                                   \
    }                                                                                                         \
    void dt_cross_entropy_forward_##S(const T* logits, const int64_t* target, i64 ignore_index, T* exp,       \
                                      T* sumexp, T* losses, i64 classes, const i64* bounds, i64 blocks) {     \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            cross_entropy_forward<T>(logits, target, ignore_index, exp, sumexp, losses, classes, lo, hi);     \
        });                                                                                                   \
    }                                                                                                         \
    void dt_cross_entropy_backward_##S(T* grad, const T* sumexp, const T* row_scale, const int64_t* target,   \
                                       i64 classes, const i64* bounds, i64 blocks) {                          \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            cross_entropy_backward<T>(grad, sumexp, row_scale, target, classes, lo, hi);                      \
        });                                                                                                   \
    }

DT_EXPORT_ALL(f32, float)
DT_EXPORT_ALL(f64, double)

}  // extern "C"

// ---- Transformer: tanh GELU, softmax over the last axis (optionally causal), LayerNorm --------------------
// kernels_numpy.gelu_forward / gelu_backward / softmax_forward / softmax_backward / layer_norm_forward /
// layer_norm_backward, one visit of each element or row each.

namespace {

constexpr double GELU_SCALE = 0.7978845608028654;  // sqrt(2 / pi), kernels_numpy.GELU_SCALE
constexpr double GELU_CUBIC = 0.044715;

// float32 only (wrappers.py says why).
// 0.5 x (1 + tanh(u)) = x sigmoid(2u) = x / (1 + exp(-2u)), u = s (x + k x^3): one exp and no 1 + tanh(u),
// which loses the digits of a small result where tanh(u) is near -1 (the reference's form does)
template <typename T>
DT_CLONES void gelu_forward(const T* x, T* y, i64 lo, i64 hi) {
    const T minus_2s = T(-2 * GELU_SCALE), k = T(GELU_CUBIC), one = T(1);
#pragma omp simd
    for (i64 j = lo; j < hi; ++j) {
        const T v = x[j];
        y[j] = v / (one + dt::exp_(minus_2s * (v * (v * v * k + one))));
    }
}

// d/dx x sigmoid(2u) = sigmoid(2u) + 2 x u' sigmoid(2u) (1 - sigmoid(2u)), u' = s (1 + 3 k x^2): the
// reference's 0.5 (1 + t) + 0.5 x (1 - t^2) u' with t = tanh(u) = 2 sigmoid(2u) - 1. 1 - sigmoid(2u) is
// taken as e sigmoid(2u), e = exp(-2u): the subtraction would leave only the ulps of 1 where x >> 0.
template <typename T>
DT_CLONES void gelu_backward(const T* grad_y, const T* x, T* grad_x, i64 lo, i64 hi) {
    const T minus_2s = T(-2 * GELU_SCALE), two_s = T(2 * GELU_SCALE), k = T(GELU_CUBIC), k3 = T(3 * GELU_CUBIC);
    const T one = T(1), zero = T(0);
#pragma omp simd
    for (i64 j = lo; j < hi; ++j) {
        const T v = x[j], v2 = v * v;
        const T e = dt::exp_(minus_2s * (v * (v2 * k + one)));
        const T sig = one / (one + e);
        T rest = e * sig;
        rest = rest == rest ? rest : zero;  // e = inf (x << 0): sig = 0, and so is the product; a NaN x stays NaN in sig
        grad_x[j] = grad_y[j] * (sig + two_s * (v2 * k3 + one) * v * sig * rest);
    }
}

// Rows [lo, hi) of x (rows, n): softmax of each row's first `kept` entries (all n, or with `causal` the
// entries j <= i of query i = row % queries), zeros after them
template <typename T>
void softmax_forward(const T* x, T* y, i64 n, i64 queries, int causal, i64 lo, i64 hi) {
    for (i64 r = lo; r < hi; ++r) {
        const T* xr = x + r * n;
        T* yr = y + r * n;
        const i64 query = causal ? r % queries : n - 1;
        const i64 kept = query + 1 < n ? query + 1 : n;
        const T top = row_max<T>(xr, kept);
        // a row of -inf: exp = 0; a +inf or a NaN first entry: no maximum to shift by
        const T s = std::isfinite(top) ? row_sumexp<T>(xr, top, yr, kept) : row_sumexp<T, true>(xr, T(0), yr, kept);
        scale_row<T>(yr, s > T(0) ? T(1) / s : T(1), kept);
        std::memset(yr + kept, 0, sizeof(T) * (n - kept));
    }
}

template <typename T>
DT_CLONES T row_dot(const T* a, const T* b, i64 n) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (i64 j = 0; j < n; ++j) s += a[j] * b[j];
    return s;
}

template <typename T>
DT_CLONES void softmax_backward_row(const T* g, const T* y, T* grad_x, T dot, i64 n) {
#pragma omp simd
    for (i64 j = 0; j < n; ++j) grad_x[j] = (g[j] - dot) * y[j];
}

// Rows [lo, hi) of (rows, n): grad_x = y (grad_y - sum(grad_y y)), each row's dot product and its
// gradient in one visit of the row
template <typename T>
void softmax_backward(const T* grad_y, const T* y, T* grad_x, i64 n, i64 lo, i64 hi) {
    for (i64 r = lo; r < hi; ++r) {
        const T* g = grad_y + r * n;
        const T* yr = y + r * n;
        softmax_backward_row<T>(g, yr, grad_x + r * n, row_dot<T>(g, yr, n), n);
    }
}

// Rows [lo, hi) of x (rows, n): y = (x - mean) rstd weight + bias (weight, bias: null for none), with
// each row's mean and rstd = 1 / sqrt(var + eps) written out for backward
template <typename T>
DT_CLONES void layer_norm_forward(const T* x, const T* weight, const T* bias, double eps, T* y, T* mean,
                                  T* rstd, i64 n, i64 lo, i64 hi) {
    for (i64 r = lo; r < hi; ++r) {
        const T* xr = x + r * n;
        T* yr = y + r * n;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (i64 j = 0; j < n; ++j) sum += xr[j];
        const T mu = sum / T(n);
        T squares = 0;
#pragma omp simd reduction(+ : squares)
        for (i64 j = 0; j < n; ++j) squares += (xr[j] - mu) * (xr[j] - mu);
        const T inv = T(1) / std::sqrt(squares / T(n) + T(eps));
        mean[r] = mu;
        rstd[r] = inv;
#pragma omp simd
        for (i64 j = 0; j < n; ++j) {
            T v = (xr[j] - mu) * inv;
            v = weight ? v * weight[j] : v;
            yr[j] = bias ? v + bias[j] : v;
        }
    }
}

// Rows of chunks [lo, hi) of `chunk` rows each: grad_x (rows, n) = rstd (g - mean(g) - xhat mean(g xhat)),
// g = grad_y weight, xhat = (x - mean) rstd; and per chunk c the column sums of grad_y xhat and grad_y
// over its rows in weight_sums[c], bias_sums[c] (n each; null: not wanted), which the caller adds up:
// the same sums whichever thread runs a chunk
template <typename T>
DT_CLONES void layer_norm_backward(const T* grad_y, const T* x, const T* weight, const T* mean, const T* rstd,
                                   T* grad_x, T* weight_sums, T* bias_sums, i64 rows, i64 n, i64 chunk, i64 lo,
                                   i64 hi) {
    for (i64 c = lo; c < hi; ++c) {
        T* ws = weight_sums ? weight_sums + c * n : nullptr;
        T* bs = bias_sums ? bias_sums + c * n : nullptr;
        if (ws) std::memset(ws, 0, sizeof(T) * n);
        if (bs) std::memset(bs, 0, sizeof(T) * n);
        const i64 end = (c + 1) * chunk < rows ? (c + 1) * chunk : rows;
        for (i64 r = c * chunk; r < end; ++r) {
            const T* g = grad_y + r * n;
            const T* xr = x + r * n;
            T* gx = grad_x + r * n;
            const T mu = mean[r], inv = rstd[r];
            T g_sum = 0, gx_sum = 0;
#pragma omp simd reduction(+ : g_sum, gx_sum)
            for (i64 j = 0; j < n; ++j) {
                const T gw = weight ? g[j] * weight[j] : g[j];
                g_sum += gw;
                gx_sum += gw * ((xr[j] - mu) * inv);
            }
            const T g_mean = g_sum / T(n), gx_mean = gx_sum / T(n);
#pragma omp simd
            for (i64 j = 0; j < n; ++j) {
                const T xhat = (xr[j] - mu) * inv;
                const T gw = weight ? g[j] * weight[j] : g[j];
                gx[j] = (gw - g_mean - xhat * gx_mean) * inv;
                if (ws) ws[j] += g[j] * xhat;
                if (bs) bs[j] += g[j];
            }
        }
    }
}

// The exact GELU, x Phi(x), Phi(x) = 0.5 erfc(-x / sqrt 2): erfc keeps Phi's relative accuracy in the left
// tail, where 0.5 (1 + erf) keeps no digits. kernels_numpy.gelu_erf_forward / gelu_erf_backward.
// float32 (an MLP's hidden layer: the hot case) evaluates the reference's Cephes rational approximations in
// float arithmetic with both branches computed and one selected, and exp_nonpositive_f32, so the loop
// vectorises (libm's erfcf is a scalar call, ~9x slower than torch's); float64 (the gradient checks) calls libm.
constexpr double SQRT1_2 = 0.7071067811865476;
constexpr double INV_SQRT_2PI = 0.3989422804014327;  // kernels_numpy.INV_SQRT_2PI

// kernels_numpy.ERF_T ... ERFC_S, highest power first (U, Q, S with their leading 1)
constexpr float ERF_T[] = {9.60497373987051638749E0f, 9.00260197203842689217E1f, 2.23200534594684319226E3f,
                           7.00332514112805075473E3f, 5.55923013010394962768E4f};
constexpr float ERF_U[] = {1.0f, 3.35617141647503099647E1f, 5.21357949780152679795E2f, 4.59432382970980127987E3f,
                           2.26290000613890934246E4f, 4.92673942608635921086E4f};
constexpr float ERFC_P[] = {2.46196981473530512524E-10f, 5.64189564831068821977E-1f, 7.46321056442269912687E0f,
                            4.86371970985681366614E1f, 1.96520832956077098242E2f, 5.26445194995477358631E2f,
                            9.34528527171957607540E2f, 1.02755188689515710272E3f, 5.57535335369399327526E2f};
constexpr float ERFC_Q[] = {1.0f, 1.32281951154744992508E1f, 8.67072140885989742329E1f, 3.54937778887819891062E2f,
                            9.75708501743205489753E2f, 1.82390916687909736289E3f, 2.24633760818710981792E3f,
                            1.65666309194161350182E3f, 5.57535340817727675546E2f};
constexpr float ERFC_R[] = {5.64189583547755073984E-1f, 1.27536670759978104416E0f, 5.01905042251180477414E0f,
                            6.16021097993053585195E0f, 7.40974269950448939160E0f, 2.97886665372100240670E0f};
constexpr float ERFC_S[] = {1.0f, 2.26052863220117276590E0f, 9.39603524938001434673E0f, 1.20489539808096656605E1f,
                            1.70814450747565897222E1f, 9.60896809063285878198E0f, 3.36907645100081516050E0f};

template <int N>
inline float horner(const float (&c)[N], float z) {
    float acc = c[0];
    for (int i = 1; i < N; ++i) acc = acc * z + c[i];
    return acc;
}

// Phi(x) and the normal density phi(x) for float32, as kernels_numpy._normal_cdf64: exp(-x^2 / 2) as
// exp(-m^2 / 2) exp(-(m f + f^2 / 2)), |x| = m + f with m a multiple of 1/128 (m^2 exact below |x| = 16, past
// which Phi underflows float32), so the rounding of x^2 does not multiply into the tail. NaN stays NaN.
inline void normal_cdf_pdf_f32(float x, float& cdf, float& pdf) {
    const float z = x * float(SQRT1_2);
    const float a = std::fabs(z);
    const float zc = z < -1.0f ? -1.0f : (z > 1.0f ? 1.0f : z);
    const float z2 = zc * zc;
    const float central = 0.5f + 0.5f * (zc * horner(ERF_T, z2) / horner(ERF_U, z2));
    const float capped = a > 16.0f ? 16.0f : a;
    const float ratio = capped < 8.0f ? horner(ERFC_P, capped) / horner(ERFC_Q, capped)
                                      : horner(ERFC_R, capped) / horner(ERFC_S, capped);
    const float xa = std::fabs(x) > 22.0f ? 22.0f : std::fabs(x);
    const float m = std::floor(xa * 128.0f + 0.5f) * (1.0f / 128.0f);
    const float f = xa - m;
    const float gauss = dt::exp_nonpositive_f32(-0.5f * (m * m)) * dt::exp_nonpositive_f32(-(m * f + 0.5f * (f * f)));
    const float half_erfc = 0.5f * gauss * ratio;   // Phi(-|x|)
    cdf = a < 1.0f ? central : (z < 0.0f ? half_erfc : 1.0f - half_erfc);
    pdf = gauss * float(INV_SQRT_2PI);
}

template <typename T>
DT_CLONES void gelu_erf_forward(const T* x, T* y, i64 lo, i64 hi) {
    if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
        for (i64 j = lo; j < hi; ++j) {
            float cdf, pdf;
            normal_cdf_pdf_f32(x[j], cdf, pdf);
            y[j] = x[j] * cdf;
        }
    } else {
        for (i64 j = lo; j < hi; ++j) y[j] = x[j] * (T(0.5) * std::erfc(-x[j] * T(SQRT1_2)));
    }
}

// grad_y (Phi(x) + x phi(x)), phi the normal density
template <typename T>
DT_CLONES void gelu_erf_backward(const T* grad_y, const T* x, T* grad_x, i64 lo, i64 hi) {
    if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
        for (i64 j = lo; j < hi; ++j) {
            float cdf, pdf;
            normal_cdf_pdf_f32(x[j], cdf, pdf);
            grad_x[j] = grad_y[j] * (cdf + x[j] * pdf);
        }
    } else {
        for (i64 j = lo; j < hi; ++j) {
            const T v = x[j];
            const T cdf = T(0.5) * std::erfc(-v * T(SQRT1_2));
            grad_x[j] = grad_y[j] * (cdf + v * std::exp(T(-0.5) * v * v) * T(INV_SQRT_2PI));
        }
    }
}

}  // namespace

extern "C" {

#define DT_EXPORT_GELU_ERF(S, T)                                                                              \
    void dt_gelu_erf_forward_##S(const T* x, T* y, const i64* bounds, i64 blocks) {                           \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) { gelu_erf_forward<T>(x, y, lo, hi); });            \
    }                                                                                                         \
    void dt_gelu_erf_backward_##S(const T* grad_y, const T* x, T* grad_x, const i64* bounds, i64 blocks) {    \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) { gelu_erf_backward<T>(grad_y, x, grad_x, lo, hi); }); \
    }
DT_EXPORT_GELU_ERF(f32, float)
DT_EXPORT_GELU_ERF(f64, double)

void dt_gelu_forward_f32(const float* x, float* y, const i64* bounds, i64 blocks) {
    dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) { gelu_forward<float>(x, y, lo, hi); });
}
void dt_gelu_backward_f32(const float* grad_y, const float* x, float* grad_x, const i64* bounds, i64 blocks) {
    dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) { gelu_backward<float>(grad_y, x, grad_x, lo, hi); });
}

#define DT_EXPORT_ROWS(S, T)                                                                                  \
    void dt_softmax_forward_##S(const T* x, T* y, i64 n, i64 queries, int causal, const i64* bounds,          \
                                i64 blocks) {                                                                 \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            softmax_forward<T>(x, y, n, queries, causal, lo, hi);                                             \
        });                                                                                                   \
    }                                                                                                         \
    void dt_softmax_backward_##S(const T* grad_y, const T* y, T* grad_x, i64 n, const i64* bounds,            \
                                 i64 blocks) {                                                                \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            softmax_backward<T>(grad_y, y, grad_x, n, lo, hi);                                                \
        });                                                                                                   \
    }                                                                                                         \
    void dt_layer_norm_forward_##S(const T* x, const T* weight, const T* bias, double eps, T* y, T* mean,     \
                                   T* rstd, i64 n, const i64* bounds, i64 blocks) {                           \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            layer_norm_forward<T>(x, weight, bias, eps, y, mean, rstd, n, lo, hi);                            \
        });                                                                                                   \
    }                                                                                                         \
    void dt_layer_norm_backward_##S(const T* grad_y, const T* x, const T* weight, const T* mean,              \
                                    const T* rstd, T* grad_x, T* weight_sums, T* bias_sums, i64 rows, i64 n,  \
                                    i64 chunk, const i64* bounds, i64 blocks) {                               \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            layer_norm_backward<T>(grad_y, x, weight, mean, rstd, grad_x, weight_sums, bias_sums, rows, n,    \
                                   chunk, lo, hi);                                                            \
        });                                                                                                   \
    }

DT_EXPORT_ROWS(f32, float)
DT_EXPORT_ROWS(f64, double)

}  // extern "C"

// ---- Linear's forward with its bias; the embedding's scatter-add --------------------------------------

namespace {

// Rows [lo, hi) of out (N x F) set to row (F)
template <typename T>
void fill_rows(T* out, const T* row, i64 f, i64 lo, i64 hi) {
    for (i64 r = lo; r < hi; ++r) std::memcpy(out + r * f, row, sizeof(T) * f);
}

// out (N x F) += x (N x K) w^T, w (F x K), all row-major, on the calling thread's BLAS (its own threads):
// the column-major BLAS computes out^T = w x^T with w read transposed. out holds the bias rows (fill_rows)
// first; the BLAS adds the product to them (beta = 1) where with beta = 0 it would first write zeros, so the
// bias costs no pass of its own over the output.
template <typename T>
void linear_bias_gemm(const T* x, const T* w, T* out, i64 n, i64 k, i64 f) {
    if (blas.int64)
        fortran_gemm<T, int64_t>('T', 'N', f, n, k, T(1), w, k, x, k, T(1), out, f);
    else
        fortran_gemm<T, int32_t>('T', 'N', f, n, k, T(1), w, k, x, k, T(1), out, f);
}

template <typename T>
DT_CLONES void add_to_row(T* target, const T* values, i64 lo, i64 hi) {
#pragma omp simd
    for (i64 j = lo; j < hi; ++j) target[j] += values[j];
}

// Columns [lo, hi) of target[index[r]] += values[r] for r = 0..n_index-1 in order (np.add.at's order), target
// (V x D), values (n_index x D); a negative index counts from the end. The caller checks the indices.
template <typename T>
void index_add_rows(T* target, const int64_t* index, const T* values, i64 n_index, i64 n_cols, i64 n_target_rows,
                    i64 lo, i64 hi) {
    for (i64 r = 0; r < n_index; ++r) {
        const i64 dest = index[r] < 0 ? index[r] + n_target_rows : index[r];
        add_to_row<T>(target + dest * n_cols, values + r * n_cols, lo, hi);
    }
}

}  // namespace

extern "C" {

#define DT_EXPORT_LINEAR_EMBEDDING(S, T)                                                                      \
    void dt_linear_bias_gemm_##S(const T* x, const T* w, const T* bias, T* out, i64 n, i64 k, i64 f,          \
                                 const i64* bounds, i64 blocks) {                                             \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) { fill_rows<T>(out, bias, f, lo, hi); });          \
        linear_bias_gemm<T>(x, w, out, n, k, f);                                                              \
    }                                                                                                         \
    void dt_index_add_rows_##S(T* target, const int64_t* index, const T* values, i64 n_index, i64 n_cols,     \
                               i64 n_target_rows, const i64* bounds, i64 blocks) {                            \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            index_add_rows<T>(target, index, values, n_index, n_cols, n_target_rows, lo, hi);                 \
        });                                                                                                   \
    }

DT_EXPORT_LINEAR_EMBEDDING(f32, float)
DT_EXPORT_LINEAR_EMBEDDING(f64, double)

}  // extern "C"

// ---- multi-tensor passes: sums of squares (gradient norms), scaling, the SGD and Adam updates ------------
// Each takes a list of tensors as their data addresses and their element offsets in the list's
// concatenation (offsets[0] = 0, offsets[t + 1] - offsets[t] = tensor t's size) and works on the range
// [lo, hi) of that concatenation, so that one hand-off to the intra-op threads covers every tensor of a
// gradient clipping or an optimizer step, however many there are. The sums of squares take a range of
// chunks instead (see there). The arithmetic is kernels_numpy's per-array functions', in the same order and
// without fused multiply-adds, so scaling, SGD and Adam are bitwise the reference's: GCC contracts a * b + c into
// an FMA in C++ even under -std=c++17 (only ISO C turns that off), hence fp-contract=off for this section.

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

namespace {

// span(t, begin, end) for the part [begin, end) of each tensor t that the concatenated range [lo, hi) covers
template <typename Span>
void for_each_span(const i64* offsets, i64 n_tensors, i64 lo, i64 hi, Span span) {
    i64 t = std::upper_bound(offsets + 1, offsets + n_tensors + 1, lo) - (offsets + 1);  // first ending after lo
    for (; t < n_tensors && offsets[t] < hi; ++t) {
        const i64 begin = lo > offsets[t] ? lo - offsets[t] : 0;
        const i64 end = (hi < offsets[t + 1] ? hi : offsets[t + 1]) - offsets[t];
        if (begin < end) span(t, begin, end);
    }
}

// Independent partial sums of sum_squares: enough vector accumulators (4 of AVX-512, 8 of AVX2) that the
// adds do not wait on each other's latency, as one accumulator's chain would
constexpr int SQUARE_SUMS = 32;

// In float64 whatever T: a float32 square is exact in double, and the sum keeps digits the float32
// accumulation of the reference (BLAS sdot) loses; element j goes to partial sum j % SQUARE_SUMS
template <typename T>
DT_CLONES double sum_squares(const T* x, i64 n) {
    double sums[SQUARE_SUMS] = {};
    i64 j = 0;
    for (; j + SQUARE_SUMS <= n; j += SQUARE_SUMS) {
#pragma omp simd
        for (int k = 0; k < SQUARE_SUMS; ++k) {
            const double v = x[j + k];
            sums[k] += v * v;
        }
    }
    for (int k = 0; j < n; ++j, ++k) {
        const double v = x[j];
        sums[k] += v * v;
    }
    double s = 0;
    for (int k = 0; k < SQUARE_SUMS; ++k) s += sums[k];
    return s;
}

// Chunks [lo, hi) of the tensors' elements, tensor t's cut into chunks of `chunk` elements numbered from
// chunk_offsets[t] (its last chunk may be shorter): partials[c] = the sum of squares of chunk c. The caller
// adds each tensor's chunks up in order: the same sums whichever thread ran a chunk.
template <typename T>
void foreach_sum_squares(const T* const* xs, const i64* offsets, const i64* chunk_offsets, i64 n_tensors,
                         i64 chunk, double* partials, i64 lo, i64 hi) {
    i64 t = std::upper_bound(chunk_offsets + 1, chunk_offsets + n_tensors + 1, lo) - (chunk_offsets + 1);
    for (i64 c = lo; c < hi; ++c) {
        while (c >= chunk_offsets[t + 1]) ++t;
        const i64 begin = (c - chunk_offsets[t]) * chunk, size = offsets[t + 1] - offsets[t];
        partials[c] = sum_squares<T>(xs[t] + begin, size - begin < chunk ? size - begin : chunk);
    }
}

template <typename T>
void foreach_scale(T* const* xs, const i64* offsets, i64 n_tensors, double coef, i64 lo, i64 hi) {
    const T k = T(coef);
    for_each_span(offsets, n_tensors, lo, hi,
                  [&](i64 t, i64 begin, i64 end) { scale_row<T>(xs[t] + begin, k, end - begin); });
}

template <typename T>
struct SgdScalars {
    T minus_lr, momentum, undamped, weight_decay;  // undamped: 1 - dampening
};

// kernels_numpy.sgd_step's update on n elements, its options fixed at compile time so that each variant is
// one vectorised loop: g = -grad (MAXIMIZE); g = g + weight_decay p (DECAY); with MOMENTUM b = g (FIRST) or
// b = b momentum + (1 - dampening) g, then g = g + momentum b (NESTEROV) or b; p = p + g (-lr), which is
// the reference's p - g where lr = 1
template <typename T, bool MAXIMIZE, bool DECAY, bool MOMENTUM, bool FIRST, bool NESTEROV>
DT_CLONES void sgd_span(T* p, const T* grad, T* buf, i64 n, SgdScalars<T> s) {
#pragma omp simd
    for (i64 j = 0; j < n; ++j) {
        T g = MAXIMIZE ? -grad[j] : grad[j];
        if constexpr (DECAY) g = g + s.weight_decay * p[j];
        if constexpr (MOMENTUM) {
            const T b = FIRST ? g : buf[j] * s.momentum + s.undamped * g;
            buf[j] = b;
            g = NESTEROV ? g + s.momentum * b : b;
        }
        p[j] = p[j] + g * s.minus_lr;
    }
}

template <typename T, bool... Options>
struct SgdVariant {
    static constexpr auto fn = &sgd_span<T, Options...>;
};

// Kernel<T, options...>::fn, the variant compiled for these runtime options
template <template <typename, bool...> class Kernel, typename T, size_t N, bool... Chosen>
auto variant(const bool (&options)[N]) {
    if constexpr (sizeof...(Chosen) == N) {
        return Kernel<T, Chosen...>::fn;
    } else {
        return options[sizeof...(Chosen)] ? variant<Kernel, T, N, Chosen..., true>(options)
                                          : variant<Kernel, T, N, Chosen..., false>(options);
    }
}

// kernels_numpy.sgd_step on the elements [lo, hi) of the concatenated parameters. buffers: null without
// momentum; first[t] nonzero where tensor t's buffer is new (its first step: b = g).
template <typename T>
void foreach_sgd(T* const* params, const T* const* grads, T* const* buffers, const int8_t* first,
                 const i64* offsets, i64 n_tensors, double lr, double momentum, double dampening,
                 double weight_decay, int nesterov, int maximize, i64 lo, i64 hi) {
    const SgdScalars<T> s{T(-lr), T(momentum), T(1.0 - dampening), T(weight_decay)};
    const bool with_momentum = momentum != 0.0;
    for_each_span(offsets, n_tensors, lo, hi, [&](i64 t, i64 begin, i64 end) {
        const bool options[5] = {maximize != 0, weight_decay != 0.0, with_momentum, with_momentum && first[t] != 0,
                                 with_momentum && nesterov != 0};
        T* buffer = with_momentum ? buffers[t] + begin : nullptr;
        variant<SgdVariant, T>(options)(params[t] + begin, grads[t] + begin, buffer, end - begin, s);
    });
}

template <typename T>
struct AdamScalars {
    T decay, one_minus_decay_lr, lerp_weight, beta2, one_minus_beta2, minus_step_size, bias_correction2_sqrt, eps;
};

// kernels_numpy.adam_step's update on n elements, its options fixed at compile time: g = -grad (MAXIMIZE);
// with DECAY, p = p (1 - lr weight_decay) (DECOUPLED, AdamW) or g = g + weight_decay p; m = lerp(m, g,
// 1 - beta1) by torch's two-sided formula (SMALL_WEIGHT: m + (g - m) w, else g - (g - m)(1 - w));
// v = v beta2 + ((1 - beta2) g) g; v_max = max(v_max, v) (AMSGRAD); p = p + (m (-step_size)) / (sqrt(v or
// v_max) / sqrt(1 - beta2^t) + eps)
template <typename T, bool MAXIMIZE, bool DECAY, bool DECOUPLED, bool AMSGRAD, bool SMALL_WEIGHT>
DT_CLONES void adam_span(T* p, const T* grad, T* m, T* v, T* v_max, i64 n, AdamScalars<T> s) {
#pragma omp simd
    for (i64 j = 0; j < n; ++j) {
        T g = MAXIMIZE ? -grad[j] : grad[j];
        if constexpr (DECAY && DECOUPLED) p[j] = p[j] * s.one_minus_decay_lr;
        if constexpr (DECAY && !DECOUPLED) g = g + s.decay * p[j];
        const T diff = g - m[j];
        m[j] = SMALL_WEIGHT ? m[j] + diff * s.lerp_weight : g - diff * s.lerp_weight;
        const T v_new = v[j] * s.beta2 + s.one_minus_beta2 * g * g;
        v[j] = v_new;
        T second = v_new;
        if constexpr (AMSGRAD) {
            const T old = v_max[j];
            second = old > v_new || old != old ? old : v_new;  // np.maximum: a NaN wins
            v_max[j] = second;
        }
        const T denom = std::sqrt(second) / s.bias_correction2_sqrt + s.eps;
        p[j] = p[j] + m[j] * s.minus_step_size / denom;
    }
}

template <typename T, bool... Options>
struct AdamVariant {
    static constexpr auto fn = &adam_span<T, Options...>;
};

// kernels_numpy.adam_step on the elements [lo, hi) of the concatenated parameters, tensor t at its own
// step (step_sizes[t] = lr / (1 - beta1^t), bias_corrections2_sqrt[t] = sqrt(1 - beta2^t): adam_scalars);
// max_exp_avg_sqs: null without AMSGrad
template <typename T>
void foreach_adam(T* const* params, const T* const* grads, T* const* exp_avgs, T* const* exp_avg_sqs,
                  T* const* max_exp_avg_sqs, const double* step_sizes, const double* bias_corrections2_sqrt,
                  const i64* offsets, i64 n_tensors, double lr, double beta1, double beta2, double eps,
                  double weight_decay, int decoupled, int maximize, i64 lo, i64 hi) {
    const double weight = 1.0 - beta1;
    const bool small_weight = (weight < 0 ? -weight : weight) < 0.5;
    const bool options[5] = {maximize != 0, weight_decay != 0.0, decoupled != 0, max_exp_avg_sqs != nullptr,
                             small_weight};
    const auto update = variant<AdamVariant, T>(options);
    for_each_span(offsets, n_tensors, lo, hi, [&](i64 t, i64 begin, i64 end) {
        const AdamScalars<T> s{T(weight_decay), T(1.0 - lr * weight_decay), T(small_weight ? weight : 1.0 - weight),
                               T(beta2), T(1.0 - beta2), T(-step_sizes[t]), T(bias_corrections2_sqrt[t]), T(eps)};
        update(params[t] + begin, grads[t] + begin, exp_avgs[t] + begin, exp_avg_sqs[t] + begin,
               max_exp_avg_sqs ? max_exp_avg_sqs[t] + begin : nullptr, end - begin, s);
    });
}

}  // namespace

#pragma GCC pop_options

extern "C" {

#define DT_EXPORT_FOREACH(S, T)                                                                               \
    void dt_foreach_sum_squares_##S(const T* const* xs, const i64* offsets, const i64* chunk_offsets,         \
                                    i64 n_tensors, i64 chunk, double* partials, const i64* bounds,            \
                                    i64 blocks) {                                                             \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            foreach_sum_squares<T>(xs, offsets, chunk_offsets, n_tensors, chunk, partials, lo, hi);           \
        });                                                                                                   \
    }                                                                                                         \
    void dt_foreach_scale_##S(T* const* xs, const i64* offsets, i64 n_tensors, double coef,                   \
                              const i64* bounds, i64 blocks) {                                                \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            foreach_scale<T>(xs, offsets, n_tensors, coef, lo, hi);                                           \
        });                                                                                                   \
    }                                                                                                         \
    void dt_foreach_sgd_##S(T* const* params, const T* const* grads, T* const* buffers, const int8_t* first,  \
                            const i64* offsets, i64 n_tensors, double lr, double momentum, double dampening,  \
                            double weight_decay, int nesterov, int maximize, const i64* bounds,               \
                            i64 blocks) {                                                                     \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            foreach_sgd<T>(params, grads, buffers, first, offsets, n_tensors, lr, momentum, dampening,        \
                           weight_decay, nesterov, maximize, lo, hi);                                         \
        });                                                                                                   \
    }

#define DT_EXPORT_FOREACH_ADAM(S, T)                                                                          \
    void dt_foreach_adam_##S(T* const* params, const T* const* grads, T* const* exp_avgs,                     \
                             T* const* exp_avg_sqs, T* const* max_exp_avg_sqs, const double* step_sizes,      \
                             const double* bias_corrections2_sqrt, const i64* offsets, i64 n_tensors,         \
                             double lr, double beta1, double beta2, double eps, double weight_decay,          \
                             int decoupled, int maximize, const i64* bounds, i64 blocks) {                    \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            foreach_adam<T>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes,                \
                            bias_corrections2_sqrt, offsets, n_tensors, lr, beta1, beta2, eps, weight_decay,  \
                            decoupled, maximize, lo, hi);                                                     \
        });                                                                                                   \
    }

DT_EXPORT_FOREACH(f32, float)
DT_EXPORT_FOREACH(f64, double)
DT_EXPORT_FOREACH_ADAM(f32, float)
DT_EXPORT_FOREACH_ADAM(f64, double)

}  // extern "C"
