// The CUDA built-ins our kernels use, for running them on the CPU with a C++ compiler (emulator.py).
//
// emulator.py compiles each .cu source as C++ with this header in front, so the kernel code under
// test is the very text NVRTC compiles for the GPU; only the built-ins below stand in for the device.
//
// How a launch runs: blocks one after another; inside a block, kernels that synchronise (__syncthreads,
// __shfl_xor_sync) run each thread as a fiber on its own stack, switched cooperatively on one OS
// thread; kernels that never synchronise run their threads as plain calls. The fiber scheduler runs
// every runnable thread until it blocks, then releases a warp whose 32 lanes all wait at a shuffle
// (exchanging their values) or the block when all its threads wait at __syncthreads. Anything the GPU
// would hang on or leave undefined is an error naming the block and warp: a barrier some threads
// skip, a shuffle some lanes of a warp skip, a shuffle in a partial warp or with a partial mask.
// Atomics are plain read-modify-writes: one OS thread runs everything, in a fixed order, so an
// emulated launch is deterministic (repeated indices are summed in thread order).
//
// NOTE: fibers switch with _setjmp/_longjmp (no signal-mask system call) after starting once
// through makecontext; the build passes -U_FORTIFY_SOURCE so glibc's longjmp check does not refuse
// the jump between stacks.
#ifndef DT_EMULATOR_RUNTIME_H
#define DT_EMULATOR_RUNTIME_H

#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// A __shared__ variable is one per block; blocks run one at a time, so one static per kernel is one
// per block. (emulator.py turns `extern __shared__` into `extern`: the dynamic buffer is below.)
#define __shared__ static

#define threadIdx (::dt_emu::thread_idx)
#define blockIdx (::dt_emu::block_idx)
#define blockDim (::dt_emu::block_dim)
#define gridDim (::dt_emu::grid_dim)

namespace dt_emu {
namespace {  // internal linkage: every emulated source is its own shared library with its own state

enum class State { ready, at_barrier, at_shuffle, done };

struct Fiber {
    jmp_buf context;
    State state = State::done;
    bool started = false;
    dim3 index;
    unsigned long long shuffle_value = 0, shuffle_result = 0;
    int shuffle_lane_mask = 0;
    unsigned shuffle_members = 0;
};

constexpr std::size_t kStackBytes = 64 * 1024;
constexpr unsigned kWarp = 32, kMaxBlock = 1024, kMaxGridYZ = 65535;
constexpr std::size_t kSharedBytes = 48 * 1024;  // the default dynamic shared memory limit per block

dim3 thread_idx, block_idx, block_dim, grid_dim;
std::vector<Fiber> fibers;
std::unique_ptr<char[]> stacks;  // not value-initialised: a page is touched only if a fiber uses it
jmp_buf scheduler;
std::size_t current = 0;
bool cooperative = false;
std::function<void()> body;  // one thread's run of the kernel being launched

std::string where() {
    char text[96];
    std::snprintf(text, sizeof text, "block (%u, %u, %u)", block_idx.x, block_idx.y, block_idx.z);
    return text;
}

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error(what + " in " + where()); }

// The calling thread's fiber; only kernels launched with fibers may synchronise.
Fiber& self_fiber() {
    if (!cooperative) fail("a synchronising built-in in a kernel launched without fibers");
    return fibers[current];
}

// Called by a fiber: park in `state` and return to the scheduler; continues when released.
void park(State state) {
    Fiber& self = self_fiber();
    self.state = state;
    if (!_setjmp(self.context)) _longjmp(scheduler, 1);
}

// Every thread of every block runs here, on its own stack: one kernel body per block it is resumed for.
void fiber_main() {
    for (;;) {
        body();
        park(State::done);
    }
}

void resume(std::size_t i) {
    Fiber& fiber = fibers[i];
    current = i;
    thread_idx = fiber.index;
    if (_setjmp(scheduler)) return;  // the fiber parked or finished
    if (fiber.started) _longjmp(fiber.context, 1);
    fiber.started = true;
    ucontext_t start;
    getcontext(&start);
    start.uc_stack.ss_sp = stacks.get() + i * kStackBytes;
    start.uc_stack.ss_size = kStackBytes;
    start.uc_link = nullptr;  // fiber_main never returns
    makecontext(&start, fiber_main, 0);
    setcontext(&start);
}

// The lanes of warp `w` when all wait at the same shuffle: exchange and make them runnable.
bool release_warp(unsigned w, unsigned n_threads) {
    const unsigned first = w * kWarp, lanes = std::min(kWarp, n_threads - first);
    unsigned waiting = 0;
    for (unsigned lane = 0; lane < lanes; ++lane) waiting += fibers[first + lane].state == State::at_shuffle;
    if (waiting == 0) return false;
    const std::string warp = "warp " + std::to_string(w);
    if (lanes != kWarp) fail(warp + ": __shfl_xor_sync in a partial warp of " + std::to_string(lanes) + " lanes");
    if (waiting != kWarp)
        fail(warp + ": __shfl_xor_sync reached by " + std::to_string(waiting) +
             " of 32 lanes (the others wait at __syncthreads or have exited): the GPU would hang");
    const int mask = fibers[first].shuffle_lane_mask;
    for (unsigned lane = 0; lane < kWarp; ++lane) {
        const Fiber& f = fibers[first + lane];
        if (f.shuffle_members != 0xffffffffu) fail(warp + ": __shfl_xor_sync with a partial member mask");
        if (f.shuffle_lane_mask != mask || mask < 0 || mask >= int(kWarp))
            fail(warp + ": lanes shuffle with different or out-of-range lane masks");
    }
    for (unsigned lane = 0; lane < kWarp; ++lane) {
        Fiber& f = fibers[first + lane];
        f.shuffle_result = fibers[first + (lane ^ unsigned(mask))].shuffle_value;
        f.state = State::ready;
    }
    return true;
}

// All threads wait at __syncthreads: release them. Returns false when the block has finished.
bool release_barrier(unsigned n_threads) {
    unsigned waiting = 0, exited = 0;
    for (unsigned i = 0; i < n_threads; ++i) {
        waiting += fibers[i].state == State::at_barrier;
        exited += fibers[i].state == State::done;
    }
    if (exited == n_threads) return false;
    if (waiting + exited != n_threads) fail("scheduler: threads neither runnable nor waiting");
    if (exited)
        fail("__syncthreads reached by " + std::to_string(waiting) + " of " + std::to_string(n_threads) +
             " threads (the others have exited)");
    for (unsigned i = 0; i < n_threads; ++i) fibers[i].state = State::ready;
    return true;
}

void run_block_with_fibers(unsigned n_threads) {
    for (unsigned i = 0; i < n_threads; ++i) fibers[i].state = State::ready;
    for (;;) {
        for (unsigned i = 0; i < n_threads; ++i)
            if (fibers[i].state == State::ready) resume(i);
        bool released = false;
        for (unsigned w = 0; w * kWarp < n_threads; ++w) released |= release_warp(w, n_threads);
        if (!released && !release_barrier(n_threads)) return;
    }
}

void run_block_plainly() {
    for (unsigned z = 0; z < block_dim.z; ++z)
        for (unsigned y = 0; y < block_dim.y; ++y)
            for (unsigned x = 0; x < block_dim.x; ++x) {
                thread_idx = dim3{x, y, z};
                body();
            }
}

void prepare_fibers(unsigned n_threads) {
    fibers.assign(n_threads, Fiber{});
    stacks.reset(new char[n_threads * kStackBytes]);
    unsigned i = 0;
    for (unsigned z = 0; z < block_dim.z; ++z)
        for (unsigned y = 0; y < block_dim.y; ++y)
            for (unsigned x = 0; x < block_dim.x; ++x) fibers[i++].index = dim3{x, y, z};
}

void release_launch() {
    fibers.clear();
    stacks.reset();
    body = nullptr;
}

void check_launch(const dim3& grid, const dim3& block, unsigned long long shared_bytes) {
    const unsigned long long threads = 1ull * block.x * block.y * block.z;
    if (threads == 0 || threads > kMaxBlock)
        throw std::invalid_argument("block of " + std::to_string(threads) + " threads (CUDA allows 1 to 1024)");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ)
        throw std::invalid_argument("grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                                    std::to_string(grid.z) + ") outside CUDA's limits");
    if (shared_bytes > kSharedBytes)
        throw std::invalid_argument(std::to_string(shared_bytes) + " bytes of dynamic shared memory (max 49152)");
}

void run_grid() {
    const unsigned n_threads = block_dim.x * block_dim.y * block_dim.z;
    for (unsigned z = 0; z < grid_dim.z; ++z)
        for (unsigned y = 0; y < grid_dim.y; ++y)
            for (unsigned x = 0; x < grid_dim.x; ++x) {
                block_idx = dim3{x, y, z};
                if (cooperative) run_block_with_fibers(n_threads);
                else run_block_plainly();
            }
}

// A kernel touching memory it may not (emulator.py puts an inaccessible page after every array)
// raises SIGSEGV; the handler jumps back here, from whichever stack faulted, and the launch fails
// with the address, which emulator.py names as an argument and element.
sigjmp_buf fault_return;
void* fault_address = nullptr;

void on_fault(int, siginfo_t* info, void*) {
    fault_address = info->si_addr;
    siglongjmp(fault_return, 1);
}

void run_grid_catching_faults() {
    struct sigaction action = {}, previous_segv = {}, previous_bus = {};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous_segv);
    sigaction(SIGBUS, &action, &previous_bus);
    const bool faulted = sigsetjmp(fault_return, 1) != 0;
    if (!faulted) run_grid();
    sigaction(SIGSEGV, &previous_segv, nullptr);
    sigaction(SIGBUS, &previous_bus, nullptr);
    if (faulted) {
        char text[64];
        std::snprintf(text, sizeof text, "memory fault at address %p", fault_address);
        fail(text);
    }
}

}  // namespace

template <class... Args, std::size_t... I>
void invoke(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<Args>*>(args[I])...);
}

// Launch `kernel` over the grid; args[k] points at the value of parameter k. Returns 0, or 1 with
// the reason in `error`.
template <class... Args>
int launch(void (*kernel)(Args...), const unsigned* grid, const unsigned* block, unsigned long long shared_bytes,
           int with_fibers, void** args, char* error, int error_size) {
    try {
        const dim3 g{grid[0], grid[1], grid[2]}, b{block[0], block[1], block[2]};
        check_launch(g, b, shared_bytes);
        body = [kernel, args] { invoke(kernel, args, std::index_sequence_for<Args...>{}); };
        cooperative = with_fibers != 0;
        grid_dim = g;
        block_dim = b;
        if (cooperative) prepare_fibers(b.x * b.y * b.z);
        run_grid_catching_faults();
        release_launch();
        return 0;
    } catch (const std::exception& e) {
        release_launch();
        std::snprintf(error, error_size, "%s", e.what());
        return 1;
    }
}

// The parameter list as type codes ("*cf,*f,q,i": const float*, float*, long long, int), for
// emulator.py's argument checks.
template <class T> constexpr const char* type_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, float>) return "f";
    else if constexpr (std::is_same_v<U, double>) return "d";
    else if constexpr (std::is_same_v<U, long long>) return "q";
    else if constexpr (std::is_same_v<U, unsigned long long>) return "Q";
    else if constexpr (std::is_same_v<U, int>) return "i";
    else if constexpr (std::is_same_v<U, unsigned int>) return "I";
    else static_assert(sizeof(U) == 0, "a kernel parameter type the emulator does not know");
}

// A pointer is "*" then "c" when the kernel only reads through it, then the pointee's code.
template <class T> std::string parameter_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) {
        using Pointee = std::remove_pointer_t<U>;
        return std::string(std::is_const_v<Pointee> ? "*c" : "*") + type_code<Pointee>();
    } else {
        return type_code<U>();
    }
}

template <class... Args> const char* signature(void (*)(Args...)) {
    static const std::string codes = [] {
        std::string out;
        ((out += (out.empty() ? "" : ",") + parameter_code<Args>()), ...);
        return out;
    }();
    return codes.c_str();
}

}  // namespace dt_emu

// ---- the built-ins -------------------------------------------------------------------------------------

// common.cuh's dynamic shared memory (declared there `extern __shared__`): one buffer, blocks run in turn.
alignas(16) static unsigned char dt_shared_bytes[dt_emu::kSharedBytes];

inline void __syncthreads() { dt_emu::park(dt_emu::State::at_barrier); }

template <class T> T __shfl_xor_sync(unsigned members, T value, int lane_mask) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffles move at most 8 bytes");
    dt_emu::Fiber& self = dt_emu::self_fiber();
    std::memcpy(&self.shuffle_value, &value, sizeof value);
    self.shuffle_lane_mask = lane_mask;
    self.shuffle_members = members;
    dt_emu::park(dt_emu::State::at_shuffle);
    T result;
    std::memcpy(&result, &dt_emu::self_fiber().shuffle_result, sizeof result);
    return result;
}

template <class T> T atomicAdd(T* address, T value) {
    const T old = *address;
    *address = old + value;
    return old;
}

inline unsigned long long atomicMax(unsigned long long* address, unsigned long long value) {
    const unsigned long long old = *address;
    if (value > old) *address = value;
    return old;
}

template <class To, class From> To dt_emu_bit_cast(From from) {
    static_assert(sizeof(To) == sizeof(From), "bit casts keep the size");
    To to;
    std::memcpy(&to, &from, sizeof to);
    return to;
}
inline float __int_as_float(int i) { return dt_emu_bit_cast<float>(i); }
inline double __longlong_as_double(long long i) { return dt_emu_bit_cast<double>(i); }
inline long long __double_as_longlong(double d) { return dt_emu_bit_cast<long long>(d); }

#endif  // DT_EMULATOR_RUNTIME_H
