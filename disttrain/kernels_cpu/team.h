// The row-block team of team.cpp, for native.cpp's kernels: for_blocks(bounds, blocks, f) calls f(lo, hi) for
// each block [bounds[i], bounds[i + 1]), i < blocks, side by side, block 0 on the calling thread and block i on
// the team's worker i, and returns when all are done. The blocks must not depend on each other; a block may
// call the BLAS (never the row-block team again: its calls run one at a time).
#ifndef DISTTRAIN_TEAM_H
#define DISTTRAIN_TEAM_H

#include <cstdint>
#include <memory>
#include <type_traits>

extern "C" {
typedef void (*dt_block_fn)(void* context, int64_t lo, int64_t hi);
void dt_run_blocks(dt_block_fn fn, void* context, const int64_t* bounds, int64_t blocks);
}

namespace dt {

template <typename F>
void for_blocks(const int64_t* bounds, int64_t blocks, F&& f) {
    using Fn = std::remove_reference_t<F>;
    dt_run_blocks([](void* context, int64_t lo, int64_t hi) { (*static_cast<Fn*>(context))(lo, hi); },
                  const_cast<void*>(static_cast<const void*>(std::addressof(f))), bounds, blocks);
}

}  // namespace dt

#endif
