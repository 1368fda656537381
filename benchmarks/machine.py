"""The machine the benchmark runs on: what it is, which npllama it measures, and how busy other
processes keep it (the waits before each measurement and the foreign load during it)."""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def blas_threads() -> int | None:
    """Threads OpenBLAS (as bundled with NumPy) will use, asked from the library itself."""
    import numpy as np
    for lib in glob.glob(str(Path(np.__file__).parent.parent / "numpy.libs" / "*openblas*")):
        try:
            cdll = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                    "openblas_get_num_threads"):
            if hasattr(cdll, sym):
                return int(getattr(cdll, sym)())
    return None


def machine_info() -> dict:
    import numpy as np
    import torch
    info = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cores_available": len(os.sched_getaffinity(0)), "numpy_blas_threads": blas_threads(),
            "torch_default_threads": torch.get_num_threads()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        lines = cpuinfo.splitlines()
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in lines if l.startswith("model name"))
        flags = next(l.split(":", 1)[1].split() for l in lines if l.startswith("flags"))
        info["cpu_simd"] = [f for f in flags if f.startswith(("avx", "fma", "amx", "sse4"))]
        mem = Path("/proc/meminfo").read_text().splitlines()
        info["ram_gb"] = round(int(next(l for l in mem if l.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["numpy_blas"] = {k: blas.get(k) for k in ("name", "version", "openblas configuration")}
    except Exception:  # show_config's layout is not an API
        pass
    info["torch_blas"] = next((l.strip() for l in torch.__config__.show().splitlines()
                               if "BLAS_INFO" in l), None)
    return info


def code_info() -> dict:
    """Which npllama was measured: others edit it while the benchmark runs."""
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    digest = hashlib.sha256()
    for f in sorted((ROOT / "npllama").glob("*.py")):
        digest.update(f.name.encode() + f.read_bytes())
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": (git("status", "--porcelain", "npllama") or "").splitlines(),
            "npllama_sources_sha256": digest.hexdigest()[:16]}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a running process, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_ns(pid: int) -> int:
    """Nanoseconds all threads of a process have run so far (/proc/<pid>/task/*/schedstat)."""
    total = 0
    for f in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            total += int(Path(f).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def wait_until_idle(pids: list[int], window: float = 0.02, busy: float = 0.05, timeout: float = 3.0) -> float:
    """Wait until the processes use less than `busy` of a core over `window` seconds; return the
    seconds waited. BLAS and OpenMP worker threads spin for a while after each call: measured
    right after the other engine, an engine would share the cores with that spinning, which
    costs a short measurement (a small prefill) many times its own time."""
    t0 = time.perf_counter()
    while pids and time.perf_counter() - t0 < timeout:
        before = sum(cpu_ns(p) for p in pids)
        time.sleep(window)
        if sum(cpu_ns(p) for p in pids) - before < busy * window * 1e9:
            break
    return time.perf_counter() - t0


def machine_busy_ns() -> int:
    """CPU time all cores have spent busy (user, nice, system, irq, softirq, steal), in ns."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) * 10**9 // os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """How many cores other processes (not this benchmark) kept busy over an interval: the
    machine's busy time minus the benchmark processes' own CPU time, per wall second."""

    def __init__(self, pids):
        self.pids = [os.getpid(), *pids]
        self.t0, self.busy0, self.own0 = time.perf_counter(), machine_busy_ns(), sum(map(cpu_ns, self.pids))

    def cores(self) -> float:
        wall = time.perf_counter() - self.t0
        foreign = (machine_busy_ns() - self.busy0) - (sum(map(cpu_ns, self.pids)) - self.own0)
        return max(0.0, foreign / 1e9 / wall) if wall > 0 else 0.0


def wait_for_quiet_machine(pids, max_wait: float, threshold: float = 0.25,
                           window: float = 0.5) -> tuple[float, float]:
    """Wait (at most max_wait seconds) until other processes use under `threshold` cores over a
    `window`: on a 2-core machine one busy neighbour halves what an engine gets, and its two BLAS
    threads then wait for each other at every call. Returns (seconds waited, last foreign load)."""
    t0 = time.perf_counter()
    while True:
        load = ForeignLoad(pids)
        time.sleep(window)
        cores = load.cores()
        if cores < threshold or time.perf_counter() - t0 >= max_wait:
            return time.perf_counter() - t0, cores
