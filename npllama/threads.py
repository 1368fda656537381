"""How many threads npllama computes with: the cores that are free, measured, not assumed.

BLAS splits each product between its threads and waits for the slowest. When another process
(a browser, a build) holds a core, the thread the OS puts beside it runs only part of the time,
and each of a decode step's hundred-odd products waits for it: with two threads, decode then
runs several times slower than with one. So, unless told a number (`threads=`, `-t`,
NPLLAMA_NUM_THREADS, as llama.cpp's `-t`), npllama measures every quarter second how much CPU
time processes other than itself took, and gives BLAS only the cores left free.

The count is set for the length of each forward pass and the caller's own setting restored
after it (a C call of about a microsecond each way).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController

from .errors import ArgumentError

ENV = "NPLLAMA_NUM_THREADS"
SAMPLE_SECONDS = 0.25  # long enough for /proc/stat's 10 ms ticks, short enough to follow the load


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def requested_threads(threads: int | None) -> int | None:
    """The thread count asked for, by argument or else by NPLLAMA_NUM_THREADS; None: adapt."""
    if threads is None and os.environ.get(ENV, "").strip():
        value = os.environ[ENV].strip()
        if not (value.isdigit() and int(value) >= 1):
            raise ArgumentError(f"{ENV} is {value!r}; it must be a positive integer")
        threads = int(value)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ArgumentError(f"threads (-t) is {threads!r}; it must be a positive integer")
    return threads


def machine_busy_seconds() -> float | None:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat), or None
    where there is no such file (then npllama does not adapt)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:9]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Threads:
    """The thread count for each forward pass: fixed when asked for, else the free cores."""

    def __init__(self, threads: int | None = None):
        asked = requested_threads(threads)
        self.adaptive = asked is None
        self.max = asked or available_cores()
        self.current = self.max
        self._blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        self._sample = self._read()

    def _read(self) -> tuple[float, float | None, float]:
        return time.monotonic(), machine_busy_seconds(), time.process_time()

    def update(self) -> int:
        """Re-measure the free cores if the last measurement is a quarter second old."""
        if not self.adaptive or time.monotonic() - self._sample[0] < SAMPLE_SECONDS:
            return self.current
        (t0, busy0, own0), (t1, busy1, own1) = self._sample, self._read()
        self._sample = (t1, busy1, own1)
        if busy0 is None or busy1 is None:
            return self.current
        foreign = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)  # cores other processes used
        self.current = max(1, min(self.max, round(available_cores() - foreign)))
        return self.current

    @contextmanager
    def applied(self):
        """BLAS runs with `update()` threads inside the block, and as before it after."""
        with self.blas_threads(self.update()) as n:
            yield n

    @contextmanager
    def blas_threads(self, n: int):
        before = [lib.num_threads for lib in self._blas]
        for lib in self._blas:
            lib.set_num_threads(n)
        try:
            yield n
        finally:
            for lib, count in zip(self._blas, before):
                lib.set_num_threads(count)
