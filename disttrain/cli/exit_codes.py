"""The exit statuses of the `disttrain` commands, in one place: `disttrain launch` restarts a failed attempt by them.

    0   done
    1   a failure (a crash, a lost rank): what a restart from the last checkpoint may get past
    2   an unusable job file, options or checkpoint, a memory budget the job cannot keep, or an output
        directory holding an earlier run (or in use by another run): the same command would fail the same way
    3   stopped by a NaN or infinite loss, gradient norm or weight ([train] on_nonfinite): the same run resumed
        from its last checkpoint would diverge again
    74  a file the run needs could not be written (a full disk, a read-only file system, its directory removed),
        as sysexits' EX_IOERR: a restart would meet the same disk; free space or fix it, then --resume
    124 a rank did not arrive within [parallel] timeout_s (as coreutils' timeout)
    130 / 143 stopped by SIGINT / SIGTERM after writing a checkpoint
"""
from disttrain.parallel.watchdog import EXIT_TIMEOUT

__all__ = ["EXIT_DONE", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_DIVERGED", "EXIT_IO", "EXIT_TIMEOUT", "EXIT_SIGNAL",
           "NOT_RESTARTED"]

EXIT_DONE = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_IO = 74
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}

# What `disttrain launch` does not restart, and the reason it gives
NOT_RESTARTED = {EXIT_DONE: "done",
                 EXIT_USAGE: "a mistake in the job or options",
                 EXIT_DIVERGED: "the run diverged: a restart would diverge again",
                 EXIT_IO: "its files could not be written: a restart would fail the same way",
                 EXIT_SIGNAL["SIGINT"]: "stopped by SIGINT",
                 EXIT_SIGNAL["SIGTERM"]: "stopped by SIGTERM"}
