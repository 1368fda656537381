"""The harness every suite runs on (README.md: how it measures). `python harness.py MODULE` serves calls
of MODULE's functions, a JSON line each way; `python harness.py MODULE FUNCTION JSON` makes one call
(under mpiexec too). No npllama import at the top: batch.py --base's workers import it from another tree."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import psutil
from tabulate import tabulate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.append(str(ROOT))  # npllama and oracle, installed or not (last: batch.py puts another tree first)
MB = 2**20
SPIN = "import os\nos.sched_setaffinity(0, {%d})\nprint(flush=True)\nwhile os.getppid() == %d: sum(range(9999))"


def progress(tag: str, msg: str) -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def summary(samples, unit: str) -> dict:
    """Median with min and max: the median resists a shared machine's noise, min-max shows it."""
    samples = [float(s) for s in samples]
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples),
            "unit": unit, "samples": samples}


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def cell(s: dict | None) -> str:  # "median (min-max)"
    return "-" if not s else fmt(s["median"]) + ("" if s["min"] == s["max"] else f" ({fmt(s['min'])}-{fmt(s['max'])})")


def table(headers, rows) -> str:
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def machine_info() -> dict:
    import numpy as np
    from threadpoolctl import threadpool_info
    cpu = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in Path("/proc/cpuinfo").read_text()
                                             .splitlines() if ":" in line)}
    info = {"cpu": cpu.get("model name", platform.processor()), "cpu_count": os.cpu_count(),
            "simd": [f for f in cpu.get("flags", "").split() if f.startswith(("avx", "fma", "amx"))],
            "cores_available": len(os.sched_getaffinity(0)), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(), "numpy": np.__version__,
            "blas": next(({k: p[k] for k in ("internal_api", "version", "architecture", "num_threads")}
                          for p in threadpool_info() if p["user_api"] == "blas" and "numpy" in p["filepath"]), {})}
    with contextlib.suppress(ImportError):
        import torch
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return info


def machine_line(m: dict) -> str:
    b = m["blas"]
    return (f"{m['cpu']} ({' '.join(m['simd'])}), {m['cores_available']} cores, {m['ram_gb']} GB RAM; Python "
            f"{m['python']}, numpy {m['numpy']} ({b.get('internal_api')} {b.get('version')}, {b.get('architecture')}, "
            f"{b.get('num_threads')} threads)" + (f", torch {m['torch']}" if "torch" in m else ""))


def code_info() -> dict:
    """Which npllama was measured: others edit it while a benchmark runs."""
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()  # noqa
    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "npllama").splitlines()}


def memory_mb(pid: int | None = None) -> dict:
    """Resident memory (this process's by default): anonymous (heap, KV cache...), file-backed (mapped weights)."""
    m = psutil.Process(pid).memory_info()
    return {"RssAnon": (m.rss - m.shared) / MB, "RssFile": m.shared / MB, "VmRSS": m.rss / MB}


def cpu_seconds(pids, own: bool = False) -> float:
    """CPU time of the processes `pids`, and with `own` of this one and its children that have ended."""
    total = sum(psutil.Process().cpu_times()[:4]) if own else 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += sum(psutil.Process(pid).cpu_times()[:2])
    return total


def foreign_load(own=()):
    """A function giving the cores that processes other than the benchmark's kept busy since this call: the
    machine's busy time (as npllama.threads reads it) less the benchmark's own, a wall second."""
    from npllama.threads import machine_busy_seconds
    read = lambda: (time.perf_counter(), machine_busy_seconds(), cpu_seconds(own, own=True))  # noqa: E731
    t0, busy0, own0 = read()

    def cores() -> float:
        t1, busy1, own1 = read()
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0) if busy0 is not None else 0.0
    return cores


@contextlib.contextmanager
def spinner():
    """A busy loop pinned to the last core, as a browser or a build holds one (it ends with its parent):
    its pid, and a function giving the cores it took since it started."""
    code = SPIN % (max(os.sched_getaffinity(0)), os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    proc.stdout.readline()  # spinning from here on
    t0 = time.perf_counter()
    try:
        yield proc.pid, lambda: cpu_seconds([proc.pid]) / (time.perf_counter() - t0)
    finally:
        proc.kill()
        proc.wait()


def settle(own) -> None:
    """Waits (3 s at most) until the benchmark's own processes stop spinning: BLAS threads spin a while
    after each call, and would take a core from the next measurement."""
    t0 = time.perf_counter()
    while own and time.perf_counter() - t0 < 3:
        before = cpu_seconds(own)
        time.sleep(0.05)
        if cpu_seconds(own) - before <= 0.01:  # under a tick of CPU in 50 ms
            break


def measure(call, own=(), busy: bool = False) -> dict | None:
    """call()'s reply, with the cores other processes used meanwhile (and the busy loop's, when `busy`)."""
    settle(own)
    with spinner() if busy else contextlib.nullcontext((None, None)) as (pid, spun):
        cores = foreign_load([*own, *([pid] if busy else [])])
        reply = call()
        if reply is not None:
            reply.update(foreign_cores=cores(), **({"spinner_cores": spun()} if busy else {}))
    return reply


def rounds(cases: list[dict], run, n: int, own=lambda: (), tag: str = "bench") -> list[dict]:
    """n rounds of run(case) for every case, the order reversed every other round, a case beside a busy
    core if its "load" is "busy"; the replies go to case["runs"] (a failed one, None, is left out)."""
    for r in range(n):
        for case in cases if r % 2 == 0 else cases[::-1]:
            reply = measure(lambda: run(case), own(), case.get("load") == "busy")
            if reply is not None:
                case.setdefault("runs", []).append(reply)
                shown = ", ".join(f"{k} {fmt(v)}" for k, v in reply.items() if isinstance(v, (int, float)))
                progress(tag, f"round {r + 1}/{n}, {' '.join(str(v) for k, v in case.items() if k != 'runs')}: {shown}")
    return cases


def stat(case: dict, unit: str, value) -> dict | None:
    """The summary of a case's runs, value(reply) or reply[value], with the CPU each run took and the
    cores others (and the busy loop) took meanwhile."""
    if not (runs := case.get("runs")):
        return None
    loads = {k: [x[k] for x in runs] for k in ("cpu_seconds", "foreign_cores", "spinner_cores") if k in runs[0]}
    return dict(summary([value(x) if callable(value) else x[value] for x in runs], unit), **loads)


class Worker:
    """A `python harness.py MODULE` process asked a call at a time; a call returning something other than
    a dict makes it the subject of later calls. Its memory is sampled from here, the measured process
    undisturbed. A failure is kept, not raised: the worker is asked nothing more."""

    def __init__(self, tag: str, module: str):
        self.tag, self.error, self.peak, self.last = tag, None, {}, {}
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, __file__, module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.pid = self.proc.pid
        self.sampler = threading.Thread(target=self.sample, daemon=True)
        self.sampler.start()

    def sample(self):
        while self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                self.peak.update({k: max(v, self.peak.get(k, 0.0)) for k, v in memory_mb(self.pid).items()})
            time.sleep(0.02)

    def ask(self, fn: str, **kwargs) -> dict | None:
        if self.error:
            return None
        try:
            self.proc.stdin.write(json.dumps({"fn": fn, **kwargs}) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline() or '{"error": "the worker exited"}')
        except OSError as e:
            reply = {"error": f"the worker died: {e}"}
        if "error" not in reply:
            self.last = reply
            return reply
        self.error = f"{fn}: {reply['error']}"
        progress(self.tag, f"FAILED: {self.error}")

    def close(self) -> dict:
        cpu = cpu_seconds([self.pid])
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # no more calls: the worker exits
        self.proc.wait()
        self.sampler.join()
        return {"status": "error" if self.error else "ok", **({"error": self.error} if self.error else {}),
                "peak_memory_mb": dict(self.peak, VmHWM=self.last.get("peak_rss_mb")), "cpu_s": cpu,
                "wall_s": time.perf_counter() - self.t0}


def run_once(module: str, fn: str, launcher=(), **kwargs) -> dict:
    """One call in a fresh process (`launcher`, as mpiexec -n 2, before it): its reply."""
    done = subprocess.run([*launcher, sys.executable, __file__, module, fn, json.dumps(kwargs)], capture_output=True,
                          text=True)
    reply = json.loads((done.stdout.strip().splitlines() or ['{"error": "no reply"}'])[-1])
    if done.returncode or "error" in reply:
        raise SystemExit(f"{module}.{fn} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return reply


def serve(module: str, fn: str | None = None, kwargs: str = "{}") -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stdout carries replies alone: what libraries print goes to stderr
    subject = importlib.import_module(module)
    for request in (json.loads(line) for line in sys.stdin) if fn is None else [dict(json.loads(kwargs), fn=fn)]:
        cpu0 = time.process_time()
        try:
            reply = getattr(subject, request.pop("fn"))(**request)
            if reply is not None and not isinstance(reply, dict):
                subject, reply = reply, {}
        except Exception as e:  # reported, not raised: the parent records it and carries on
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        if reply is not None:  # None: an MPI rank other than 0. ru_maxrss: the kernel's own peak (VmHWM), kB
            reply.update(cpu_seconds=time.process_time() - cpu0,
                         peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            replies.write(json.dumps(reply) + "\n")
            replies.flush()


def listed(kind=str):
    """A comma-separated option: "1,4,16" -> [1, 4, 16]."""
    return lambda text: [kind(v) for v in text.split(",")]


def parser(doc: str, name: str, loads: str = "idle", n_rounds: int = 3, models: str | None = None,
           tokens: int | None = None) -> argparse.ArgumentParser:
    """The options every suite has, and --models and --tokens where it gives their defaults."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", "--repeats", type=int, default=n_rounds, help="measurements of each case (median, min-max)")
    p.add_argument("--loads", type=listed(), default=loads.split(","),
                   help=f"idle, busy (beside a busy loop on one core) or both [default: {loads}]")
    p.add_argument("--under-load", dest="loads", action="store_const", const=["idle", "busy"], help="--loads idle,busy")
    p.add_argument("--out", type=Path, default=HERE / "results" / name, help="OUT.json and OUT.md [%(default)s]")
    if models:
        p.add_argument("--models", type=listed(), default=models, help="comma-separated [%(default)s]")
    if tokens:
        p.add_argument("--tokens", type=int, default=tokens, help="tokens decoded a measurement [%(default)s]")
    return p


def preset(p: argparse.ArgumentParser, flag: str, defaults: dict, help: str, argv=None, **kwargs) -> None:
    """An option that, given, sets other options' defaults (bench.py --quick): typed as if typed in."""
    p.add_argument(flag, help=f"{help}; its defaults: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                                    for k, v in defaults.items()), **kwargs)
    if any(arg.split("=")[0] == flag for arg in (sys.argv[1:] if argv is None else argv)):
        p.set_defaults(**defaults)


def write(out: Path, title: str, body: str, results: dict) -> dict:
    """OUT.json (results, the machine, the code, the command) and OUT.md (the machine above the tables)."""
    machine = machine_info()
    results = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
               "machine": machine, "code": code_info(), **results}
    text = f"# {title}\n\n{machine_line(machine)}\n\n{body.strip()}\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    serve(*sys.argv[1:])
