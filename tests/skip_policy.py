"""Which skips are allowed, and the count of skips by reason that `make test` ends with.

A skip for a missing tool or data set (a C++ compiler, nvcc, CuPy and its NVRTC where a wheel exists,
torch, mpiexec, the PTB files) hides tests that CI is meant to run, so under CI=true, DISTTRAIN_REQUIRE_ALL=1
or pytest --require-tools it fails the test instead. Skips for what this kind of machine cannot have (a CUDA
GPU) or for how the run was started (an MPI test outside mpiexec, too few ranks) stay skips.

Each pytest run writes its counts to $DISTTRAIN_SKIP_LOG (rank 0 only under mpiexec: the ranks skip alike)
when that is set, else prints them; `python tests/skip_policy.py LOG` prints the one line for all the runs.
"""
import json
import os
import platform
import re
import sys
from collections import Counter

CUPY_WHEELS = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")

# (label, pattern of the skip reason, required: missing it fails a strict run)
REASONS = [
    ("no C++ compiler", r"needs a C\+\+ compiler", True),
    ("no nvcc", r"nvcc not found", True),
    ("no NVRTC", r"NVRTC library not found", CUPY_WHEELS),
    ("no CuPy", r"CuPy \(the cuda extra\) is not installed|could not import 'cupyx?'", CUPY_WHEELS),
    ("no torch", r"could not import 'torch'", True),
    ("no mpiexec", r"no mpiexec", True),
    ("no PTB data", r"PTB not found", True),
    ("no CUDA GPU", r"needs a CUDA GPU|a GPU is present", False),
    ("MPI test outside mpiexec", r"need --with-mpi option", False),
    ("not an MPI test (under mpiexec)", r"does not work under mpi", False),
    ("too few MPI ranks", r"Test requires \d+ MPI processes", False),
    ("not glibc", r"glibc", False),
    ("no AVX-512 CPU", r"needs an AVX-512 CPU", False),
]


def strict(config):
    return (config.getoption("require_tools") or os.environ.get("CI", "").lower() == "true"
            or os.environ.get("DISTTRAIN_REQUIRE_ALL") == "1")


def classify(reason):
    """(label, required) of a skip reason; an unknown reason is its own label and not required."""
    for label, pattern, required in REASONS:
        if re.search(pattern, reason):
            return label, required
    return reason.removeprefix("Skipped: ")[:80], False


def skip_reason(report):
    """The reason text of a skipped test or collection report."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def fail_if_required(report, config):
    """Turn a strict run's skip for a missing tool or data set into a failure naming both."""
    if not (report.skipped and strict(config)) or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    label, required = classify(reason)
    if required:
        report.outcome = "failed"
        report.longrepr = (f"skipped for a missing tool or data set ({label}: {reason}); a strict run (CI=true, "
                           f"DISTTRAIN_REQUIRE_ALL=1 or --require-tools) needs it installed")


def counts(stats):
    """{label: number of tests} of the skips in a terminal reporter's stats (a skipped module counts once)."""
    found = Counter()
    for report in stats.get("skipped", []):
        found[classify(skip_reason(report))[0]] += 1
    return found


def record(terminalreporter):
    """Write this run's skip counts to $DISTTRAIN_SKIP_LOG, or print them when it is unset.

    Under pytest-xdist only the controller writes: it receives every worker's reports."""
    if _mpi_rank() != 0 or hasattr(terminalreporter.config, "workerinput"):
        return
    found = counts(terminalreporter.stats)
    log = os.environ.get("DISTTRAIN_SKIP_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"args": list(terminalreporter.config.invocation_params.args),
                                "skips": found}) + "\n")
    else:
        terminalreporter.write_line(summary_line([found], 1))


def _mpi_rank():
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def summary_line(runs, n_runs):
    """One line: the skips of `runs` (Counters of label -> tests) added up, most frequent reason first."""
    total = sum(runs, Counter())
    where = f"{n_runs} pytest run{'s' if n_runs != 1 else ''}"
    if not total:
        return f"skips by reason ({where}): none"
    parts = ", ".join(f"{n} {label}" for label, n in total.most_common())
    return f"skips by reason ({where}, {sum(total.values())} in all): {parts}"


def main(path):
    runs = []
    if os.path.exists(path):
        with open(path) as f:
            runs = [Counter(json.loads(line)["skips"]) for line in f if line.strip()]
    print(summary_line(runs, len(runs)))


if __name__ == "__main__":
    main(sys.argv[1])
