"""`import disttrain as dt`: the README's spellings (dt.train.fit, dt.parallel.DataParallel) work after it alone,
and the import stays light: no MPI, no ZeroMQ until a mode needs them."""
import subprocess
import sys


def test_the_upper_packages_load_on_first_use_and_not_before():
    script = ("import sys, disttrain as dt\n"
              "print(sorted(m for m in ('mpi4py', 'zmq', 'disttrain.train', 'disttrain.parallel') if m in sys.modules))\n"
              "print(dt.train.fit.__module__, dt.parallel.DataParallel.__name__, dt.data.source.ArrayData.__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "disttrain.train.fit DataParallel ArrayData"]
