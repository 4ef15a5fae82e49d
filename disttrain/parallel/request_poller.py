"""RequestPoller: a thread that drives MPI's progress on non-blocking requests while the caller computes.

MPICH advances a non-blocking collective or message only inside an MPI call; a rank busy in backward makes
none, so a bucket's allreduce (parallel/buckets.py) or a pipeline stage's send (parallel/pipeline/p2p.py) would
sit until the next wait. The poller tests the watched requests every `interval` seconds until they complete.
"""
import threading
import time

__all__ = ["RequestPoller"]


class RequestPoller:
    """A daemon thread that tests in-flight requests every `interval` seconds, idle when there are none."""

    def __init__(self, interval):
        self.interval = interval
        self._queue = []
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="disttrain-mpi-progress", daemon=True)
        self._thread.start()

    def watch(self, handle):
        self._queue.append(handle)
        self._wake.set()

    def stop(self):
        self._stopped = True
        self._wake.set()
        self._thread.join()

    def _run(self):
        queue = self._queue
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            while queue and not self._stopped:
                # in start order: once the first is still running, so (almost surely) are the later ones
                while queue and queue[0].test():
                    queue.pop(0)
                if queue:
                    time.sleep(self.interval)
