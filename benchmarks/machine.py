"""The machine the benchmark runs on: what it is, which npllama it measures, how busy other
processes keep it (the waits before each measurement, the foreign load during it), the load the
benchmark puts on it itself (`Spinner`), and what it can do (the bandwidth probes, run in a
worker process)."""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from stats import progress, summary, timed

ROOT = Path(__file__).resolve().parent.parent


def blas_threads() -> int | None:
    """Threads NumPy's BLAS will use, asked from the library itself (torch's is not NumPy's)."""
    import numpy as np
    from threadpoolctl import threadpool_info
    bundled = Path(np.__file__).parent.parent / "numpy.libs"  # where NumPy's wheel keeps OpenBLAS
    return next((p["num_threads"] for p in threadpool_info()
                 if p["user_api"] == "blas" and Path(p["filepath"]).parent == bundled), None)


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


def children_ns() -> int:
    """CPU time of this process's children that have exited and been waited for (a llama-bench
    run measured and gone within the interval)."""
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((use.ru_utime + use.ru_stime) * 1e9)


class ForeignLoad:
    """How many cores other processes (not this benchmark) kept busy over an interval: the
    machine's busy time minus the benchmark processes' own CPU time (this one, `pids`, and the
    children that ended meanwhile), per wall second."""

    def __init__(self, pids):
        self.pids = [os.getpid(), *pids]
        self.t0, self.busy0, self.own0 = time.perf_counter(), machine_busy_ns(), self.own_ns()

    def own_ns(self) -> int:
        return sum(map(cpu_ns, self.pids)) + children_ns()

    def cores(self) -> float:
        wall = time.perf_counter() - self.t0
        foreign = (machine_busy_ns() - self.busy0) - (self.own_ns() - self.own0)
        return max(0.0, foreign / 1e9 / wall) if wall > 0 else 0.0


class Spinner:
    """A busy loop on one core, the load of the "under load" figures: what a user's browser or
    build does to a 2-core machine. It is pinned to the last core this process may run on, ends
    by itself after `seconds` or when the benchmark is gone (its parent changes), and `stop` ends
    it when the rounds under load are over. The waits for a quiet machine count it as one of the
    benchmark's own processes; `cores` says how much it ran over an interval."""

    CODE = ("import os, time\n"
            "os.sched_setaffinity(0, {{{core}}})\n"
            "print('spinning', flush=True)\n"
            "end = time.monotonic() + {seconds}\n"
            "while time.monotonic() < end and os.getppid() == {parent}:\n"
            "    sum(range(10000))\n")

    def __init__(self, seconds: float = 3600):
        self.core = max(os.sched_getaffinity(0))
        code = self.CODE.format(core=self.core, seconds=seconds, parent=os.getpid())
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        self.proc.stdout.readline()  # it spins once it says so: the first measurement is under load
        self.pid = self.proc.pid

    def cores(self, t0: float, ns0: int) -> float:
        """Cores it kept busy since perf_counter() was t0 and its cpu_ns() was ns0."""
        return (cpu_ns(self.pid) - ns0) / 1e9 / (time.perf_counter() - t0)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class QuietMachine:
    """Before each measurement, waits until other processes use under `threshold` cores over a
    `window`: on a 2-core machine one busy neighbour halves what an engine gets, and its two BLAS
    threads then wait for each other at every call. At most `max_wait` seconds each time and
    `budget` seconds in the whole run (--max-wait, --wait-budget); `waited` is the total."""

    def __init__(self, max_wait: float, budget: float, threshold: float = 0.25, window: float = 0.5):
        self.max_wait, self.budget, self.threshold, self.window = max_wait, budget, threshold, window
        self.waited = 0.0

    def wait(self, pids: list[int], tag: str) -> float | None:
        """Seconds waited, None once waiting is off (--max-wait 0, or the budget spent)."""
        if self.max_wait <= 0 or self.waited >= self.budget:
            return None
        t0, limit = time.perf_counter(), min(self.max_wait, self.budget - self.waited)
        while True:
            load = ForeignLoad(pids)
            time.sleep(self.window)
            cores = load.cores()
            if cores < self.threshold or time.perf_counter() - t0 >= limit:
                break
        waited = time.perf_counter() - t0
        self.waited += waited
        if cores >= self.threshold:
            progress(tag, f"machine still busy after {waited:.0f}s ({cores:.1f} cores used by other "
                     "processes): measuring anyway")
        if self.waited >= self.budget:
            progress(tag, f"waited {self.waited:.0f}s in all for a quiet machine (--wait-budget): from "
                     "now on measuring without waiting")
        return waited


# --- What the machine can do (measured in a worker process) ---------------------------------

TILE_ROWS = 128  # rows of a cast probe's tile: 2 MB of float32 at 4096 columns, npllama's tile


class Probes:
    """GB/s of a float32 matrix-vector product over an `mb`-megabyte matrix, far larger than the
    caches (the weight bytes a decode step must stream), three ways; of bf16 -> float32 upcasts,
    whole-matrix and through npllama's streamed tiles, and of the int16 streamed path; and the
    one-core rate of casting a tile of each storage (bf16, float16, int16, int8) to float32."""

    def __init__(self, threads: int, mb: int):
        import ml_dtypes
        import numpy as np
        import torch
        import torch.nn.functional as F

        from npllama.formats.int16 import Int16Matrix, to_int16
        from npllama.resident_or_streamed import StreamedWeight, TilePool
        from npllama.threads import Threads
        torch.set_num_threads(threads)
        cols = 4096 if mb >= 64 else 1024
        rows = max(1, mb * 2**20 // (4 * cols))
        self.matrix = [rows, cols]
        rng = np.random.default_rng(0)
        w = rng.standard_normal((rows, cols), dtype=np.float32)  # [out, in]
        x = rng.standard_normal(cols, dtype=np.float32)  # [in]
        wt, xt = torch.from_numpy(w), torch.from_numpy(x)[None]  # [out, in], [1, in]
        b = w.astype(ml_dtypes.bfloat16)  # [out, in] bf16
        streamed = StreamedWeight(b, TilePool(Threads(threads)))
        q = Int16Matrix(*to_int16(w))  # [out, in] int16 and row scales
        streamed_int16 = StreamedWeight(q, TilePool(Threads(threads)))
        out = np.empty_like(w)  # [out, in]
        out.fill(0)  # touch the pages once so the preallocated case measures the copy alone
        self.probes = {
            "matvec_numpy_gemv": ("float32 W @ x (NumPy, sgemv)", w.nbytes, lambda: w @ x),
            "matvec_numpy_linear": ("float32 x[None] @ W.T (NumPy, npllama's linear)", w.nbytes,
                                    lambda: x[None] @ w.T),
            "matvec_torch_linear": ("float32 F.linear(x[None], W) (torch)", w.nbytes,
                                    lambda: F.linear(xt, wt)),
            "upcast_astype": ("bf16 -> float32, .astype (new array)", b.nbytes,
                              lambda: b.astype(np.float32)),
            "upcast_into": ("bf16 -> float32 into a preallocated array", b.nbytes,
                            lambda: np.copyto(out, b)),
            # The streamed path's ceiling: what an 8B decode step does with every matrix.
            "streamed_matvec": ("bf16 x[None] @ W.T streamed by npllama's tiles (GB/s of bf16)",
                                b.nbytes, lambda: x[None] @ streamed.T),
            "streamed_matvec_int16": ("int16 x[None] @ W.T streamed by npllama's tiles (GB/s of int16)",
                                      q.nbytes, lambda: x[None] @ streamed_int16.T),
        }
        # What each storage costs to turn into a float32 tile, on one core (the cast a streamed
        # matmul does before BLAS sees the tile): the rate decides which storage streams faster.
        tile = np.empty((TILE_ROWS, cols), np.float32)
        for name, stored in (("bf16", b), ("float16", w.astype(np.float16)), ("int16", q.q),
                             ("int8", (q.q >> 8).astype(np.int8))):
            part = stored[:TILE_ROWS]
            self.probes[f"cast_{name}"] = (f"{name} -> float32 tile cast, one core (G elements/s)", part.size,
                                           lambda part=part: np.copyto(tile, part))

    def run(self, keys, repeats: int) -> dict:
        res = {}
        for key in keys:
            label, nbytes, fn = self.probes[key]
            fn()  # warm-up
            rates = [nbytes / timed(fn)[0] / 1e9 for _ in range(repeats)]
            res[key] = dict(summary(rates, "GB/s"), label=label)
        return res

    def bandwidth(self, repeats: int) -> dict:
        """Every probe; the limit is the best median of the matrix-vector ones."""
        probes = self.run(self.probes, max(repeats, 5))
        best = max((k for k in probes if k.startswith("matvec")), key=lambda k: probes[k]["median"])
        return {"matrix": self.matrix, "probes": probes, "limit_gb_s": probes[best]["median"],
                "limit_probe": best}

    def matvec(self) -> dict:
        """The limit alone, between decode measurements: under the same conditions as they."""
        res = self.run([k for k in self.probes if k.startswith("matvec")], 5)
        return {"gb_s": max(r["median"] for r in res.values()),
                "probes": {k: r["median"] for k, r in res.items()}}


def products_title(under_load: bool, rounds: int) -> str:
    """The first line of fixed_split.py's and storage.py's tables: the machine, and how measured."""
    m = machine_info()
    return (f"{m.get('cpu', '?')}, {m['cores_available']} cores{', a busy loop on one core' if under_load else ''}: "
            f"ms per decode step's weight products, median of {rounds} rounds\n")
