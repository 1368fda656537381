"""Small shared pieces: timings and their summaries, memory as the kernel counts it, progress."""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

# /proc/<pid>/status fields, in kB there, reported in MB.
MEMORY_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def progress(tag: str, msg: str) -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def timed(fn, *args):
    """(seconds fn(*args) took, its result)"""
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def summary(samples, unit: str) -> dict:
    """Median with min and max: the median resists the noise of a shared 2-core machine, and
    min/max show how much noise there was."""
    samples = [float(s) for s in samples]
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples), "unit": unit, "samples": samples}


def read_memory(pid: int | str = "self") -> dict:
    """Resident memory in MB: anonymous (heap, float32 copies, KV cache), file-backed (memory-mapped
    weights, shared libraries) and the peak of the total (VmHWM)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in MEMORY_FIELDS:
                out[key] = int(value.split()[0]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class MemorySampler:
    """Polls another process's /proc/<pid>/status from a thread of this process (so the measured
    process runs undisturbed) and keeps the largest RssAnon, RssFile and VmRSS seen. Sampling
    every `interval` seconds can miss a spike shorter than that; VmHWM (the kernel's own peak of
    the total) cannot."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.peak

    def _run(self):
        while not self._stop.is_set():
            for key, value in read_memory(self.pid).items():
                if value > self.peak.get(key, 0.0):
                    self.peak[key] = value
            self._stop.wait(self.interval)
