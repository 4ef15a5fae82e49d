// disttrain's CPU threads: one team for OpenBLAS's parallel jobs and one for the compiled kernels' row blocks.
//
// OpenBLAS's jobs (openblas_set_threads_callback_function, OpenBLAS >= 0.3.27; native.py registers
// dt_blas_run_jobs where NumPy's OpenBLAS has it). Why: after a multi-threaded GEMM, OpenBLAS's own workers
// keep polling for the next job for about 2^28 cycles (a tenth of a second) before they sleep. A training step
// runs its GEMMs a few milliseconds apart with other work between them (the LSTM recurrence's batch blocks, the
// cross-entropy's row blocks, the optimizer's passes), and each of those threads then shares its core with a
// polling BLAS worker. The team's threads poll for POLL_FOR, then sleep until the next call.
//
// The contract (OpenBLAS's exec_blas, driver/others/blas_server.c): the callback runs job i as
// dojob(i, jobdata + i * elsize, dojob_data) for i < numjobs and returns when all are done. The jobs of one
// call must run at the same time: OpenBLAS's threaded level-3 jobs wait for each other's partial results, so
// here job 0 runs on the caller and job i on worker i, never two jobs on one thread. Calls run one at a
// time, because the jobs of every call use the same scratch buffers of OpenBLAS.
//
// The row blocks (dt_run_blocks, team.h): native.cpp's kernels each take a list of blocks and run block i on
// worker i of a second team the same way, instead of a hand-off per block through Python's thread pool (tens
// of microseconds of Future, queue and GIL traffic each way, several times a training step). A second team,
// not the BLAS one, because a block may call the BLAS (the LSTM's recurrent GEMM where it is not packed):
// inside the BLAS team's one call at a time, that call would wait for itself.
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <system_error>
#include <thread>

#include "team.h"

namespace {

using dojob_fn = void (*)(int thread_num, void* jobdata, int dojob_data);

// How long an idle thread polls before it sleeps: long enough to catch the next job of a burst of
// calls, short enough not to compete for the core with the work that follows a GEMM.
constexpr auto POLL_FOR = std::chrono::microseconds(20);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

// Poll `ready` for POLL_FOR; true when it became true meanwhile
template <typename Ready>
bool poll(Ready ready) {
    const auto until = std::chrono::steady_clock::now() + POLL_FOR;
    for (int round = 0;; ++round) {
        if (ready()) return true;
        cpu_relax();
        if (round % 64 == 63 && std::chrono::steady_clock::now() > until) return false;
    }
}

struct Call {
    dojob_fn dojob = nullptr;
    char* jobdata = nullptr;
    std::size_t elsize = 0;
    int dojob_data = 0;
    int numjobs = 0;
};

class Team {
public:
    // advice: what to change when a thread cannot start (added to the message)
    Team(const char* thread_name, const char* advice) : thread_name_(thread_name), advice_(advice) {}

    void run(const Call& call) {
        std::lock_guard<std::mutex> one_call_at_a_time(call_mutex_);
        grow(call.numjobs - 1);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            call_ = call;
            pending_.store(call.numjobs - 1, std::memory_order_relaxed);
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        call.dojob(0, call.jobdata, call.dojob_data);
        if (!poll([this] { return pending_.load(std::memory_order_acquire) == 0; })) {
            std::unique_lock<std::mutex> lock(mutex_);
            done_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
        }
    }

private:
    // Called before the call is published: a new worker starts from the generation before it. Without
    // the thread, OpenBLAS's other jobs would wait for this one forever: say so and stop instead.
    void grow(int workers) {
        while (threads_ < workers) {
            const int index = threads_ + 1;
            const std::uint64_t before = generation_.load(std::memory_order_acquire);
            try {
                std::thread([this, index, before] { work(index, before); }).detach();
            } catch (const std::system_error& error) {
                std::fprintf(stderr, "disttrain: cannot start thread %d of the %s team (%s); %s\n", index,
                             thread_name_, error.what(), advice_);
                std::abort();
            }
            threads_ = index;
        }
    }

    // Worker `index` runs job `index` of every call after generation `seen` that has one
    void work(int index, std::uint64_t seen) {
        pthread_setname_np(pthread_self(), thread_name_);
        for (;;) {
            const auto called = [this, seen] { return generation_.load(std::memory_order_acquire) != seen; };
            std::unique_lock<std::mutex> lock(mutex_);
            if (!called()) {
                lock.unlock();
                if (!poll(called)) {
                    lock.lock();
                    wake_.wait(lock, called);
                } else {
                    lock.lock();
                }
            }
            // the call and its generation read together: a later call cannot begin before this job is done
            seen = generation_.load(std::memory_order_acquire);
            const Call call = call_;
            lock.unlock();
            if (index >= call.numjobs) continue;
            call.dojob(index, call.jobdata + index * call.elsize, call.dojob_data);
            if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                std::lock_guard<std::mutex> done_lock(mutex_);
                done_.notify_one();
            }
        }
    }

    const char* thread_name_;
    const char* advice_;
    std::mutex call_mutex_;
    std::mutex mutex_;
    std::condition_variable wake_, done_;
    Call call_;
    std::atomic<std::uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    int threads_ = 0;
};

// One of the teams, made on first use. Never destroyed: its threads are detached and may be waiting at exit.
// A forked child has none of the parent's threads, so it starts a team of its own (the parent's is left as
// it was).
class TeamSlot {
public:
    TeamSlot(const char* thread_name, const char* advice) : thread_name_(thread_name), advice_(advice) {}

    Team& get() {
        std::call_once(at_fork_registered_, [] { pthread_atfork(nullptr, nullptr, forget_teams_in_child); });
        Team* current = team_.load(std::memory_order_acquire);
        if (current != nullptr) return *current;
        Team* fresh = new Team(thread_name_, advice_);
        if (team_.compare_exchange_strong(current, fresh, std::memory_order_acq_rel)) return *fresh;
        delete fresh;  // another thread made one first; this one has no threads yet
        return *current;
    }

    void forget() { team_.store(nullptr); }

private:
    static void forget_teams_in_child();
    static std::once_flag at_fork_registered_;
    const char* thread_name_;
    const char* advice_;
    std::atomic<Team*> team_{nullptr};
};

std::once_flag TeamSlot::at_fork_registered_;
TeamSlot blas_team("disttrain-blas",
                   "run with fewer threads (dt.set_num_threads) or DISTTRAIN_BLAS_THREADS=openblas");
TeamSlot block_team("disttrain-rows", "run with fewer threads (dt.set_num_threads)");

void TeamSlot::forget_teams_in_child() {
    blas_team.forget();
    block_team.forget();
}

std::atomic<std::uint64_t> blas_team_calls{0};   // what tests and benchmarks read to see the jobs came here
std::atomic<std::uint64_t> block_team_calls{0};

struct Blocks {
    dt_block_fn fn;
    void* context;
    const int64_t* bounds;
};

void run_block(int index, void* jobdata, int /*dojob_data*/) {
    const Blocks& blocks = *static_cast<const Blocks*>(jobdata);
    blocks.fn(blocks.context, blocks.bounds[index], blocks.bounds[index + 1]);
}

}  // namespace

extern "C" {

// openblas_threads_callback
void dt_blas_run_jobs(int /*sync: always 1*/, dojob_fn dojob, int numjobs, std::size_t elsize, void* jobdata,
                      int dojob_data) {
    const Call call{dojob, static_cast<char*>(jobdata), elsize, dojob_data, numjobs};
    if (numjobs <= 1) {
        if (numjobs == 1) dojob(0, jobdata, dojob_data);
        return;
    }
    blas_team.get().run(call);
    blas_team_calls.fetch_add(1, std::memory_order_relaxed);
}

// How many calls of more than one job have run on the BLAS team in this process
std::uint64_t dt_blas_team_calls() { return blas_team_calls.load(std::memory_order_relaxed); }

void dt_run_blocks(dt_block_fn fn, void* context, const int64_t* bounds, int64_t blocks) {
    if (blocks <= 1) {
        if (blocks == 1) fn(context, bounds[0], bounds[1]);
        return;
    }
    Blocks all{fn, context, bounds};
    block_team.get().run(Call{run_block, reinterpret_cast<char*>(&all), 0, 0, static_cast<int>(blocks)});
    block_team_calls.fetch_add(1, std::memory_order_relaxed);
}

// How many calls of more than one block have run on the row-block team in this process
std::uint64_t dt_block_team_calls() { return block_team_calls.load(std::memory_order_relaxed); }

}  // extern "C"
