// Scaled dot-product attention, forward and backward: kernels_numpy.attention_forward / attention_backward.
//
// One problem is one leading index m: queries Q (L, E), keys K (S, E), values V (S, Ev). A thread takes whole
// problems (the row-block team's blocks are blocks of problems), so a problem's scores, probabilities and
// products stay in that core's cache, and the (L, S) probabilities are never written out: forward keeps each
// query's log-sum-exp, from which backward recomputes them (FlashAttention's trade, by rows, not tiles).
//
// The arrays are strided: matrix m of array a starts at a + offsets[a][m] (elements), its rows are row[a]
// elements apart and a row's elements are contiguous. So q, k and v can be views of one projection's output,
// (B, H, T, E) cut from (T, B, 3, H, E), without a copy. With `causal`, query i sees keys j <= i only.
//
// The products are too small for a BLAS call to pay (64 x 64 x 32 in the Transformer LM: the call costs about
// what the arithmetic does), so they run here on rows of whole register blocks: the arrays' own rows where
// their width is a whole number of blocks (heads of 32), else copies padded to it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "clones.h"
#include "simd_math.h"
#include "team.h"

namespace {

using i64 = int64_t;

// The products keep a block of one row's columns in two vector registers' worth (GCC vector extensions, so the
// accumulators stay in registers on every clone: 2 x 16 floats with AVX-512, lowered to narrower registers
// without it). Scratch rows are padded to whole blocks.
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
    typedef float type __attribute__((vector_size(64)));
};
template <>
struct VecOf<double> {
    typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr i64 LANES = 64 / sizeof(T);
template <typename T>
constexpr i64 BLOCK = 2 * LANES<T>;

template <typename T>
i64 padded(i64 n) { return (n + BLOCK<T> - 1) / BLOCK<T> * BLOCK<T>; }

template <typename T>
inline Vec<T> load(const T* x) {
    Vec<T> v;
    std::memcpy(&v, x, sizeof v);
    return v;
}

template <typename T>
inline void store(T* x, Vec<T> v) { std::memcpy(x, &v, sizeof v); }

// One array's matrices: matrix m's row r starts at base + offsets[m] + r * row
template <typename P>
struct Strided {
    P base;
    const i64* offsets;
    i64 row;
    P at(i64 m, i64 r) const { return base + offsets[m] + r * row; }
};

template <typename T>
struct Problem {
    i64 queries, keys, width, value_width;  // L, S, E, Ev
    T scale;
    bool causal;
    // the keys query i sees: [0, seen(i))
    i64 seen(i64 i) const { return causal ? std::min(i + 1, keys) : keys; }
    // the queries that see key j: [first_query(j), L)
    i64 first_query(i64 j) const { return causal ? j : 0; }
};

// A matrix as the products read and write it: row r at data + r * ld, whole blocks of columns accessible
template <typename P>
struct Rows {
    P data;
    i64 ld;
    P row(i64 r) const { return data + r * ld; }
};

// A zero-filled (rows, padded(cols)) scratch matrix: its padding stays zero, so whole blocks can be read
template <typename T>
struct Scratch {
    std::vector<T> data;
    i64 ld;
    Scratch(i64 rows, i64 cols) : data(rows * padded<T>(cols), T(0)), ld(padded<T>(cols)) {}
    T* row(i64 r) { return data.data() + r * ld; }
    Rows<T*> view() { return {data.data(), ld}; }
};

template <typename T>
Rows<const T*> as_const(Rows<T*> a) { return {a.data, a.ld}; }

template <typename T>
bool whole_blocks(i64 cols, i64 row_stride) { return cols % BLOCK<T> == 0 && row_stride >= cols; }

// Matrix m of a (rows, cols) for the products to read: in place where its rows are whole blocks already (the
// Transformer's heads of 32), else a padded copy in scratch
template <typename T>
inline Rows<const T*> blocks_of(Strided<const T*> a, i64 m, i64 rows, i64 cols, Scratch<T>& scratch) {
    if (whole_blocks<T>(cols, a.row)) return {a.at(m, 0), a.row};
    for (i64 r = 0; r < rows; ++r) std::memcpy(scratch.row(r), a.at(m, r), sizeof(T) * cols);
    return {scratch.data.data(), scratch.ld};
}

// Where a product writes matrix m of `to`: in place where its rows are whole blocks, else scratch, from which
// write_out copies it
template <typename T>
inline Rows<T*> target_of(Strided<T*> to, i64 m, i64 cols, Scratch<T>& scratch) {
    return whole_blocks<T>(cols, to.row) ? Rows<T*>{to.at(m, 0), to.row} : scratch.view();
}

template <typename T>
inline void write_out(Strided<T*> to, i64 m, i64 rows, i64 cols, Rows<T*> from) {
    if (from.data == to.at(m, 0)) return;
    for (i64 r = 0; r < rows; ++r) std::memcpy(to.at(m, r), from.row(r), sizeof(T) * cols);
}

// Row by row: a's rows may lie pages apart (a projection's rows, T * B * 3D elements apart), and reading down
// its columns would touch a page per element
template <typename T>
inline void transpose_in(Strided<const T*> a, i64 m, i64 rows, i64 cols, Scratch<T>& out) {
    for (i64 r = 0; r < rows; ++r) {
        const T* x = a.at(m, r);
        for (i64 c = 0; c < cols; ++c) out.data[c * out.ld + r] = x[c];
    }
}

// Rows r0 .. r0 + R - 1 of product() below over one range of terms and columns: R rows x two vectors of
// accumulators, so the FMAs of one row do not wait on each other and each loaded row of b serves R rows
template <typename T, int R, typename A>
inline void product_rows(i64 r0, i64 lo, i64 hi, i64 width, const A& a, Rows<const T*> b, Rows<T*> c) {
    for (i64 c0 = 0; c0 < width; c0 += BLOCK<T>) {
        Vec<T> acc[R][2] = {};
        for (i64 t = lo; t < hi; ++t) {
            const Vec<T> b0 = load(b.row(t) + c0), b1 = load(b.row(t) + c0 + LANES<T>);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const T x = a(r0 + r, t);
                acc[r][0] += x * b0;
                acc[r][1] += x * b1;
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            store(c.row(r0 + r) + c0, acc[r][0]);
            store(c.row(r0 + r) + c0 + LANES<T>, acc[r][1]);
        }
    }
}

// c[r][0:cols(r)) = sum over t in [terms(r).first, terms(r).second) of a(r, t) b[t][0:cols(r)), for r < rows.
// b and c have whole blocks of columns (padded scratch, or rows of whole blocks). Rows go four at a time over
// the union of their ranges, so a(r, t) must be zero wherever t is outside row r's own range but inside a
// neighbour's, and c gets whole blocks up to the widest of the four.
template <typename T, typename A, typename Terms, typename Cols>
inline void product(i64 rows, const A& a, Rows<const T*> b, Rows<T*> c, const Terms& terms, const Cols& cols) {
    constexpr int R = 4;
    i64 r0 = 0;
    for (; r0 + R <= rows; r0 += R) {
        auto [lo, hi] = terms(r0);
        i64 width = cols(r0);
        for (int r = 1; r < R; ++r) {
            const auto [l, h] = terms(r0 + r);
            lo = std::min(lo, l);
            hi = std::max(hi, h);
            width = std::max(width, cols(r0 + r));
        }
        product_rows<T, R>(r0, lo, hi, width, a, b, c);
    }
    for (; r0 < rows; ++r0) {
        const auto [lo, hi] = terms(r0);
        product_rows<T, 1>(r0, lo, hi, cols(r0), a, b, c);
    }
}

// The sum and the maximum of a vector's lanes as a tree, halves onto halves: log2(LANES) dependent steps, where
// adding lane after lane would be LANES of them (the cost that matters on rows this short)
template <typename T, typename Op>
inline T reduce_lanes(Vec<T> v, Op op) {
    T lanes[LANES<T>];
    std::memcpy(lanes, &v, sizeof v);
#pragma GCC unroll 8
    for (i64 width = LANES<T> / 2; width > 0; width /= 2) {
#pragma GCC unroll 16
        for (i64 l = 0; l < width; ++l) lanes[l] = op(lanes[l], lanes[l + width]);
    }
    return lanes[0];
}

// Sum and maximum of s[0:whole), whole a multiple of BLOCK, in vector registers (an `omp simd` reduction keeps
// its lanes in memory, which costs more than a short row's arithmetic)
template <typename T>
inline T sum_blocks(const T* s, i64 whole) {
    Vec<T> acc0 = {}, acc1 = {};
    for (i64 j = 0; j < whole; j += BLOCK<T>) {
        acc0 += load(s + j);
        acc1 += load(s + j + LANES<T>);
    }
    return reduce_lanes<T>(acc0 + acc1, [](T a, T b) { return a + b; });
}

template <typename T>
inline T max_blocks(const T* s, i64 whole) {
    Vec<T> acc = load(s);
    for (i64 j = LANES<T>; j < whole; j += LANES<T>) {
        const Vec<T> x = load(s + j);
        acc = x > acc ? x : acc;
    }
    return reduce_lanes<T>(acc, [](T a, T b) { return b > a ? b : a; });
}

// Row i's probabilities in place from its scores s[0:n): exp(scale s - shift), shift the row maximum (forward,
// returning the log-sum-exp) or the given log-sum-exp (backward); the entries after n, to the row's end, zero.
// The passes run over whole blocks, the entries after n set to -inf first: a scalar loop over the tail of a
// causal row would cost more than the idle lanes.
template <typename T>
inline T softmax_row(T* s, i64 n, i64 ld, T scale, const T* given_lse) {
#pragma omp simd
    for (i64 j = 0; j < n; ++j) s[j] *= scale;
    const i64 whole = padded<T>(n);
    std::fill(s + n, s + whole, -INFINITY);
    const T top = given_lse ? *given_lse : max_blocks<T>(s, whole);
#pragma omp simd
    for (i64 j = 0; j < whole; ++j) s[j] = dt::exp_(s[j] - top);
    std::fill(s + whole, s + ld, T(0));
    if (given_lse) return top;
    const T sum = sum_blocks<T>(s, whole);
    const T inv = T(1) / sum;
#pragma omp simd
    for (i64 j = 0; j < n; ++j) s[j] *= inv;
    return top + std::log(sum);
}

// A thread's scratch, reused from one problem to the next (their padding stays zero)
template <typename T>
struct ForwardScratch {
    Scratch<T> kt, vs, p, o;
    explicit ForwardScratch(const Problem<T>& pb)
        : kt(pb.width, pb.keys), vs(pb.keys, pb.value_width), p(pb.queries, pb.keys), o(pb.queries, pb.value_width) {}
};

template <typename T>
struct BackwardScratch {
    Scratch<T> qs, ks, kt, vt, gs, p, ds, grad;
    explicit BackwardScratch(const Problem<T>& pb)
        : qs(pb.queries, pb.width), ks(pb.keys, pb.width), kt(pb.width, pb.keys), vt(pb.value_width, pb.keys),
          gs(pb.queries, pb.value_width), p(pb.queries, pb.keys), ds(pb.queries, pb.keys),
          grad(std::max(pb.queries, pb.keys), std::max(pb.width, pb.value_width)) {}
};

template <typename T>
DT_CLONES void attention_forward_problem(Strided<const T*> q, Strided<const T*> k, Strided<const T*> v,
                                         Strided<T*> out, T* lse, const Problem<T>& pb, i64 m,
                                         ForwardScratch<T>& scratch) {
    const i64 L = pb.queries, S = pb.keys, E = pb.width, Ev = pb.value_width;
    auto& [kt, vs, p, o] = scratch;
    transpose_in<T>(k, m, S, E, kt);
    const Rows<const T*> vm = blocks_of<T>(v, m, S, Ev, vs);
    const Rows<T*> om = target_of<T>(out, m, Ev, o);
    const auto all_width = [&](i64) { return std::pair<i64, i64>(0, E); };
    const auto seen = [&](i64 i) { return pb.seen(i); };
    product<T>(L, [&](i64 i, i64 e) { return q.at(m, i)[e]; }, as_const(kt.view()), p.view(), all_width, seen);
    for (i64 i = 0; i < L; ++i) lse[m * L + i] = softmax_row<T>(p.row(i), pb.seen(i), p.ld, pb.scale, nullptr);
    product<T>(L, [&](i64 i, i64 j) { return p.row(i)[j]; }, vm, om,
               [&](i64 i) { return std::pair<i64, i64>(0, pb.seen(i)); }, [&](i64) { return Ev; });
    write_out<T>(out, m, L, Ev, om);
}

// P recomputed from lse; dP = dO V^T; dS = P (dP - rowdot) scale with rowdot_i = dO_i . O_i (= sum_j dP_ij P_ij);
// dQ = dS K, dK = dS^T Q, dV = P^T dO
template <typename T>
DT_CLONES void attention_backward_problem(Strided<const T*> q, Strided<const T*> k, Strided<const T*> v,
                                          Strided<const T*> out, const T* lse, Strided<const T*> d_out,
                                          Strided<T*> dq, Strided<T*> dk, Strided<T*> dv, const Problem<T>& pb,
                                          i64 m, BackwardScratch<T>& scratch) {
    const i64 L = pb.queries, S = pb.keys, E = pb.width, Ev = pb.value_width;
    auto& [qs, ks, kt, vt, gs, p, ds, grad] = scratch;
    const Rows<const T*> qm = blocks_of<T>(q, m, L, E, qs), km = blocks_of<T>(k, m, S, E, ks);
    const Rows<const T*> gm = blocks_of<T>(d_out, m, L, Ev, gs);
    transpose_in<T>(k, m, S, E, kt);
    transpose_in<T>(v, m, S, Ev, vt);
    const auto seen = [&](i64 i) { return pb.seen(i); };
    const auto keys_seen = [&](i64 i) { return std::pair<i64, i64>(0, pb.seen(i)); };
    const auto queries_seeing = [&](i64 j) { return std::pair<i64, i64>(pb.first_query(j), L); };
    product<T>(L, [&](i64 i, i64 e) { return qm.row(i)[e]; }, as_const(kt.view()), p.view(),
               [&](i64) { return std::pair<i64, i64>(0, E); }, seen);
    product<T>(L, [&](i64 i, i64 c) { return gm.row(i)[c]; }, as_const(vt.view()), ds.view(),
               [&](i64) { return std::pair<i64, i64>(0, Ev); }, seen);
    for (i64 i = 0; i < L; ++i) {
        const i64 n = pb.seen(i);
        T* pi = p.row(i);
        softmax_row<T>(pi, n, p.ld, pb.scale, lse + m * L + i);
        const T* oi = out.at(m, i);
        const T* gi = gm.row(i);
        T rowdot = 0;
#pragma omp simd reduction(+ : rowdot)
        for (i64 c = 0; c < Ev; ++c) rowdot += gi[c] * oi[c];
        T* dsi = ds.row(i);
#pragma omp simd
        for (i64 j = 0; j < ds.ld; ++j) dsi[j] = j < n ? pi[j] * (dsi[j] - rowdot) * pb.scale : T(0);
    }
    const auto into = [&](Strided<T*> to, i64 rows, i64 cols, auto a, Rows<const T*> b, auto terms) {
        const Rows<T*> target = target_of<T>(to, m, cols, grad);
        product<T>(rows, a, b, target, terms, [&](i64) { return cols; });
        write_out<T>(to, m, rows, cols, target);
    };
    into(dq, L, E, [&](i64 i, i64 j) { return ds.row(i)[j]; }, km, keys_seen);
    into(dk, S, E, [&](i64 j, i64 i) { return ds.row(i)[j]; }, qm, queries_seeing);
    into(dv, S, Ev, [&](i64 j, i64 i) { return p.row(i)[j]; }, gm, queries_seeing);
}

// offsets: one list of `problems` element offsets per array, in argument order; row: each array's row stride
template <typename P>
Strided<P> strided(P base, const i64* offsets, const i64* row, i64 problems, int a) {
    return Strided<P>{base, offsets + a * problems, row[a]};
}

// dims: L, S, E, Ev
template <typename T>
Problem<T> problem(const i64* dims, double scale, int causal) {
    return Problem<T>{dims[0], dims[1], dims[2], dims[3], T(scale), causal != 0};
}

}  // namespace

extern "C" {

#define DT_EXPORT_ATTENTION(S, T)                                                                             \
    void dt_attention_forward_##S(const T* q, const T* k, const T* v, T* out, T* lse, const i64* offsets,     \
                                  const i64* row, i64 problems, const i64* dims, double scale, int causal,    \
                                  const i64* bounds, i64 blocks) {                                            \
        const Problem<T> pb = problem<T>(dims, scale, causal);                                                \
        const auto at = [&](auto base, int a) { return strided(base, offsets, row, problems, a); };          \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            ForwardScratch<T> scratch(pb);                                                                    \
            for (i64 m = lo; m < hi; ++m)                                                                     \
                attention_forward_problem<T>(at(q, 0), at(k, 1), at(v, 2), at(out, 3), lse, pb, m, scratch);  \
        });                                                                                                   \
    }                                                                                                         \
    void dt_attention_backward_##S(const T* q, const T* k, const T* v, const T* out, const T* lse,            \
                                   const T* d_out, T* dq, T* dk, T* dv, const i64* offsets, const i64* row,   \
                                   i64 problems, const i64* dims, double scale, int causal,                   \
                                   const i64* bounds, i64 blocks) {                                           \
        const Problem<T> pb = problem<T>(dims, scale, causal);                                                \
        const auto at = [&](auto base, int a) { return strided(base, offsets, row, problems, a); };          \
        dt::for_blocks(bounds, blocks, [&](i64 lo, i64 hi) {                                                  \
            BackwardScratch<T> scratch(pb);                                                                   \
            for (i64 m = lo; m < hi; ++m)                                                                     \
                attention_backward_problem<T>(at(q, 0), at(k, 1), at(v, 2), at(out, 3), lse, at(d_out, 4),    \
                                              at(dq, 5), at(dk, 6), at(dv, 7), pb, m, scratch);               \
        });                                                                                                   \
    }

DT_EXPORT_ATTENTION(f32, float)
DT_EXPORT_ATTENTION(f64, double)

}  // extern "C"
