"""npllama against a torch baseline doing the same work, side by side, in one run.

    python benchmarks/bench.py                      # smollm2 and 1b, 3 repeats (half an hour or more)
    python benchmarks/bench.py --quick              # tiny model, proves the script works (a minute)
    python benchmarks/bench.py --models 1b --decode-tokens 32 --contexts 128,1024
    python benchmarks/bench.py --with-8b --models 8b --contexts 128,1024   # writes a 16 GB file
    python benchmarks/bench.py --models 1b --profile                      # + cProfile of decode

The baseline is torch eager with a KV cache (benchmarks/torch_llama.py, written the way Meta's
reference is; see its docstring for why not oracle.reference.Oracle), given the same weights and
dtype, with torch.set_num_threads equal to the threads NumPy's BLAS uses. Both engines compute
logits of the last position only, feed back the argmax (greedy) and use the same token ids.

Figures, for each engine on each model:
  load            npllama.load(...) until it returns; torch: state dict load + model build
                  (tokenizer not loaded by torch, KV cache allocation excluded on both sides);
  prefill         tok/s of one forward pass over a 16-, 128- and 512-token prompt (--prefill);
  decode          tok/s over --decode-tokens greedy steps after a --decode-prompt-token prompt;
  decode at ctx   ms/token of --context-steps steps once the cache holds 128 / 1024 / 4096 real
                  positions (--contexts), filled by real prefill in --prefill-chunk chunks;
  memory          peak RssAnon and RssFile (sampled from /proc/<pid>/status every 20 ms by this
                  process) and VmHWM (the kernel's exact peak of the total), per engine in its own
                  subprocess (benchmarks/worker.py) so the numbers never mix;
  % of bandwidth  (bytes of weights one decode step reads / decode time per token) / the
                  bandwidth limit: the fastest of three large float32 matrix-vector products
                  (NumPy W@x, NumPy x@W.T, torch F.linear; GB/s of matrix bytes). The limit is
                  probed between decode rounds (same conditions as the decode) and, for the
                  "run's best" figure, also at the start and end of the run. Also measured:
                  bf16 -> float32 upcast GB/s (bytes of bf16 read), whole-matrix and through
                  npllama's streamed tiles (the ceiling of the 8b's streamed decode).
Each timing is the median of --repeats runs, shown with min-max. Progress goes to stderr; the
markdown table to stdout (and --markdown PATH); everything, with machine info, to --json PATH.

Fairness on a shared machine: both engines' processes stay alive and their measurements are
interleaved round by round (alternating which goes first), so load from other processes falls
on both alike; before each measurement the bench waits until the other engine's BLAS/OpenMP
threads have stopped spinning, then (up to --max-wait seconds, --wait-budget in all) until
processes outside the benchmark use under a quarter of a core. The cores those processes used
during each measurement are recorded next to it (JSON `foreign_cores`) and summarised in the
table: on 2 cores, one busy neighbour can make a 2-thread BLAS decode several times slower.

--profile adds, per model, a cProfile of npllama's decode steps and a table of each weight
matmul's time and GB/s (npllama's `linear` wrapped with a timer in the profiling process).

Models (--models, comma-separated): tiny, smollm2 (the default SmolLM2-135M GGUF), 1b (random
Llama-3.2-1B shape, float32), 8b (random Meta-Llama-3-8B, bf16 memory-mapped; needs --with-8b).
Random checkpoints are written once into --cache-dir (default ~/.cache/npllama/bench).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import glob
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from prepare import MODEL_NAMES, default_cache_dir  # noqa: E402
from stats import MemorySampler, summary  # noqa: E402

ENGINES = ("npllama", "torch")
WAITED = {"s": 0.0}  # seconds spent waiting for a quiet machine in this run (see --wait-budget)
QUICK = dict(models="tiny", max_wait=0, prefill="8,16", decode_tokens=4, decode_prompt=8, contexts="32,64",
             context_steps=2, prefill_chunk=32, bw_mb=16, repeats=2, profile_steps=2, profile_context=16)


# --- Command line ---------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(choices):
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}: choose from {', '.join(choices)}")
        return names
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark npllama against a torch eager baseline (same weights, same dtype, "
                    "same threads): load, prefill, decode, decode at long context, memory, and "
                    "decode as a percentage of the machine's measured bandwidth limit.",
        epilog="How each figure is measured: see the docstring of benchmarks/bench.py.")
    p.add_argument("--models", type=name_list(MODEL_NAMES), default=None,
                   help="comma-separated models: tiny, smollm2, 1b, 8b [default: smollm2,1b; "
                        "tiny with --quick]")
    p.add_argument("--with-8b", action="store_true",
                   help="allow the 8b model (writes a 16 GB random checkpoint once, needs 33 GB free "
                        "disk while writing); adds 8b to --models if not listed")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, a few tokens, short contexts, small bandwidth matrix: proves "
                        "the script works (CI), in under a minute; its figures mean nothing")
    p.add_argument("--engines", type=name_list(ENGINES), default=list(ENGINES),
                   help="engines to run [default: npllama,torch]")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median, min, max) "
                   "[default: 3; 2 with --quick]")
    p.add_argument("--prefill", type=int_list, default=None, help="prompt lengths for prefill tok/s "
                   "[default: 16,128,512]")
    p.add_argument("--decode-tokens", type=int, default=None, help="greedy decode steps timed per "
                   "repeat [default: 128]")
    p.add_argument("--decode-prompt", type=int, default=None, help="prompt length before the decode "
                   "steps [default: 16]")
    p.add_argument("--contexts", type=int_list, default=None, help="cache lengths at which decode "
                   "time per token is measured [default: 128,1024,4096]")
    p.add_argument("--context-steps", type=int, default=None, help="decode steps timed per repeat "
                   "at each context length [default: 16]")
    p.add_argument("--prefill-chunk", type=int, default=None, help="tokens per forward pass when "
                   "filling the cache to a context length [default: 512]")
    p.add_argument("--threads", type=int, default=None, help="threads for both engines: "
                   "torch.set_num_threads, and OPENBLAS/OMP_NUM_THREADS for NumPy [default: the "
                   "threads NumPy's BLAS uses]")
    p.add_argument("--torch-gqa", choices=("sdpa", "repeat_kv"), default="sdpa",
                   help="torch attention: SDPA with enable_gqa (no copies), or Meta's repeat_kv copies "
                        "[default: sdpa]")
    p.add_argument("--max-wait", type=float, default=None,
                   help="before each measurement, wait up to this many seconds for other processes "
                        "to use under 0.25 cores (0: never wait); the cores they used during each "
                        "measurement are recorded either way [default: 30; 0 with --quick]")
    p.add_argument("--wait-budget", type=float, default=900,
                   help="stop waiting for a quiet machine once this many seconds have been spent "
                        "waiting in the whole run [default: 900]")
    p.add_argument("--bw-mb", type=int, default=None, help="MB of the float32 matrix of the bandwidth "
                   "probe (far larger than the caches) [default: 256]")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile npllama's decode steps on each model (stats in the JSON, "
                        ".prof files next to it)")
    p.add_argument("--profile-steps", type=int, default=None, help="decode steps profiled [default: 8]")
    p.add_argument("--profile-context", type=int, default=None, help="cache length when profiling "
                   "[default: 128]")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where random checkpoints and converted weights are written once "
                        "[default: $NPLLAMA_BENCH_CACHE or ~/.cache/npllama/bench]")
    p.add_argument("--json", type=Path, default=HERE / "results" / "latest.json",
                   help="JSON results [default: benchmarks/results/latest.json]")
    p.add_argument("--markdown", type=Path, default=None, help="also write the markdown tables here")
    a = p.parse_args(argv)
    defaults = dict(models="smollm2,1b", prefill="16,128,512", decode_tokens=128, decode_prompt=16,
                    contexts="128,1024,4096", context_steps=16, prefill_chunk=512, bw_mb=256, repeats=3,
                    profile_steps=8, profile_context=128, max_wait=30)
    if a.quick:
        defaults.update(QUICK)
    for key, value in defaults.items():
        if getattr(a, key) is None:
            parser = {"models": name_list(MODEL_NAMES), "prefill": int_list, "contexts": int_list}.get(key)
            setattr(a, key, parser(value) if parser else value)
    if a.with_8b and "8b" not in a.models:
        a.models.append("8b")
    if "8b" in a.models and not a.with_8b:
        p.error("the 8b model writes a 16 GB checkpoint: pass --with-8b to confirm")
    for key in ("repeats", "decode_tokens", "decode_prompt", "context_steps", "prefill_chunk", "bw_mb",
                "profile_steps", "profile_context"):
        if getattr(a, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive")
    return a


# --- The machine ----------------------------------------------------------------------------

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


# --- Running the workers --------------------------------------------------------------------

def run_worker(task: str, job: dict, tag: str, threads: int | None) -> dict:
    """Run benchmarks/worker.py in a fresh process, sampling its memory from here."""
    with tempfile.TemporaryDirectory(prefix="npllama-bench-") as tmp:
        spec, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(dict(job, tag=tag)))
        env = dict(os.environ)
        if threads:
            env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        t0, load0 = time.perf_counter(), os.getloadavg()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen([sys.executable, str(HERE / "worker.py"), task, str(spec), str(result)],
                                stdout=sys.stderr, env=env)
        with MemorySampler(proc.pid) as sampler:
            proc.wait()
        if not result.exists():
            return {"status": "error", "error": f"worker exited with code {proc.returncode} and no result"}
        out = json.loads(result.read_text())
        out.setdefault("status", "ok")
        out["peak_memory_sampled_mb"] = sampler.peak
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Other processes on the machine steal cores from the measured one: the load average
        # around each worker and its CPU seconds per wall second tell how much.
        out["wall_s"] = time.perf_counter() - t0
        out["cpu_s"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        out["loadavg_1min"] = {"start": load0[0], "end": os.getloadavg()[0]}
        return out


def engine_cfg(a: argparse.Namespace, engine: str, threads: int) -> dict:
    max_seq_len = 1 + max(max(a.prefill), a.decode_prompt + a.decode_tokens + 2,
                          max(a.contexts) + a.context_steps, a.profile_context + a.profile_steps + 2)
    return dict(engine=engine, repeats=a.repeats, prefill=a.prefill, decode_tokens=a.decode_tokens,
                decode_prompt=a.decode_prompt, contexts=a.contexts, context_steps=a.context_steps,
                prefill_chunk=a.prefill_chunk, threads=threads, torch_gqa=a.torch_gqa,
                max_seq_len=max_seq_len, profile_steps=a.profile_steps, profile_context=a.profile_context)


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


class EngineProcess:
    """One engine in its own `worker.py serve` process, asked for one measurement at a time."""

    def __init__(self, engine: str, spec: dict, cfg: dict, tag: str, threads: int | None):
        self.name, self.tag = engine, tag
        self.tmp = tempfile.TemporaryDirectory(prefix="npllama-bench-")
        job = Path(self.tmp.name) / "job.json"
        job.write_text(json.dumps({"spec": spec, "cfg": cfg, "tag": tag}))
        env = dict(os.environ)
        if threads:
            env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        self.t0, self.load0 = time.perf_counter(), os.getloadavg()
        self.proc = subprocess.Popen([sys.executable, str(HERE / "worker.py"), "serve", str(job), "-"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.sampler = MemorySampler(self.proc.pid).__enter__()
        self.error = None
        self.result = {"engine": engine, "memory": {}}

    def ask(self, op: str, **kwargs) -> dict | None:
        """The worker's reply, or None once it has failed (the error is kept and reported)."""
        if self.error:
            return None
        try:
            self.proc.stdin.write(json.dumps(dict(kwargs, op=op)) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError) as e:
            line = ""
            self.error = f"worker died: {e}"
        if not line:
            self.error = self.error or f"worker exited (code {self.proc.poll()}) during {op}"
        else:
            reply = json.loads(line)
            if "error" not in reply:
                return reply
            self.error = f"{op}: {reply['error']}"
        progress(self.tag, f"FAILED: {self.error}")
        return None

    def close(self) -> dict:
        final = self.ask("memory")
        cpu = cpu_seconds(self.proc.pid)
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except OSError:
                pass
        self.proc.wait()
        self.sampler.__exit__(None, None, None)
        self.tmp.cleanup()
        r = self.result
        r["status"] = "error" if self.error else "ok"
        if self.error:
            r["error"] = self.error
        r["memory_final"] = final or {}
        r["peak_memory_sampled_mb"] = self.sampler.peak
        r["wall_s"], r["cpu_s"] = time.perf_counter() - self.t0, cpu
        r["loadavg_1min"] = {"start": self.load0[0], "end": os.getloadavg()[0]}
        return r


def progress(tag: str, msg: str) -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def measure_engines(a: argparse.Namespace, name: str, spec: dict, threads: int,
                    probe_cfg: dict) -> tuple[dict, dict]:
    """Every figure for every engine, interleaved: each repeat runs all engines back to back,
    alternating which goes first, so a burst of load from other processes lands on both. Each
    round of decode measurements also runs the bandwidth probe, so that the decode's % of the
    limit compares figures measured under the same conditions."""
    procs = [EngineProcess(e, spec, engine_cfg(a, e, threads), f"{name}/{e}", a.threads) for e in a.engines]
    probe = EngineProcess("probe", {}, probe_cfg, f"{name}/probe", a.threads)
    limits = []

    all_pids = [q.proc.pid for q in procs + [probe]]

    def quiet(p):
        """Let the other processes' spinning worker threads go to sleep before measuring p."""
        others = [q.proc.pid for q in procs + [probe] if q is not p and q.proc.poll() is None]
        waited = wait_until_idle(others)
        p.result.setdefault("idle_wait_s", []).append(round(waited, 3))

    def measure(p, op, **kwargs):
        """p.ask(op), after waiting for the machine to be quiet, with the foreign load during it."""
        quiet(p)
        if a.max_wait > 0 and WAITED["s"] < a.wait_budget:
            waited, cores = wait_for_quiet_machine(all_pids, min(a.max_wait, a.wait_budget - WAITED["s"]))
            WAITED["s"] += waited
            p.result.setdefault("quiet_wait_s", []).append(round(waited, 2))
            if cores >= 0.25:
                progress(p.tag, f"machine still busy after {waited:.0f}s ({cores:.1f} cores used by "
                         "other processes): measuring anyway")
            if WAITED["s"] >= a.wait_budget:
                progress(p.tag, f"waited {WAITED['s']:.0f}s in all for a quiet machine (--wait-budget): "
                         "from now on measuring without waiting")
        load = ForeignLoad(all_pids)
        reply = p.ask(op, **kwargs)
        if reply is not None:
            reply["foreign_cores"] = load.cores()
        return reply

    def rounds(label: str, op: str, per_repeat=None, with_probe=False, **kwargs):
        """`repeats` rounds of `op` on every engine; returns {engine: [replies]}."""
        out = {p.name: [] for p in procs}
        for r in range(a.repeats):
            if with_probe:
                reply = measure(probe, "matvec")
                if reply is not None:
                    limits.append(reply["gb_s"])
                    progress(probe.tag, f"matvec {reply['gb_s']:.1f} GB/s (best of "
                             f"{', '.join(f'{v:.1f}' for v in reply['probes'].values())})")
            for p in (procs if r % 2 == 0 else procs[::-1]):
                reply = measure(p, op, **kwargs)
                if reply is not None:
                    out[p.name].append(reply)
                    progress(p.tag, f"{label} {r + 1}/{a.repeats}: {per_repeat(reply) if per_repeat else ''}"
                             f" [other processes: {reply['foreign_cores']:.1f} cores]")
        return out

    def record(key, replies, value, unit, sub=None):
        for p in procs:
            if p.error or not replies[p.name]:
                continue
            stat = summary([value(x) for x in replies[p.name]], unit)
            stat["cpu_seconds"] = [x.get("cpu_seconds") for x in replies[p.name]]
            stat["foreign_cores"] = [round(x["foreign_cores"], 2) for x in replies[p.name]]
            p.result.setdefault("foreign_cores", []).extend(stat["foreign_cores"])
            if sub is None:
                p.result[key] = stat
            else:
                p.result.setdefault(key, {})[sub] = stat

    def memory(label):
        for p in procs:
            m = p.ask("memory")
            if m is not None:
                p.result["memory"][label] = m

    memory("start")
    loads = rounds("load", "load", lambda x: f"{x['seconds']:.2f}s")
    record("load_s", loads, lambda x: x["seconds"], "s")
    memory("after_load")
    for p in procs:
        quiet(p)
        reply = p.ask("setup")
        if reply is not None:
            p.result.update(reply)

    for n in a.prefill:
        replies = rounds(f"prefill {n} tokens", "prefill", lambda x, n=n: f"{x['seconds']:.3f}s = "
                         f"{n / x['seconds']:.1f} tok/s", n=n)
        record("prefill_tok_s", replies, lambda x, n=n: n / x["seconds"], "tok/s", str(n))
    memory("after_prefill")

    n_new = a.decode_tokens
    replies = rounds(f"decode {n_new} tokens after a {a.decode_prompt}-token prompt", "decode",
                     lambda x: f"{n_new / x['seconds']:.2f} tok/s "
                               f"({1e3 * x['seconds'] / n_new:.1f} ms/token)",
                     with_probe=True, prompt=a.decode_prompt, n=n_new)
    record("decode_tok_s", replies, lambda x: n_new / x["seconds"], "tok/s")
    for p in procs:
        if replies[p.name]:
            p.result["greedy_tokens"] = replies[p.name][0]["tokens"]
    memory("after_decode")

    filled = 0
    for ctx in sorted(a.contexts):
        for p in procs:
            reply = measure(p, "fill", start=filled, end=ctx, chunk=a.prefill_chunk)
            if reply is not None:
                p.result.setdefault("fill_s", {})[str(ctx)] = reply["seconds"]
                progress(p.tag, f"filled the cache to {ctx} positions ({ctx - filled} tokens in "
                         f"{a.prefill_chunk}-token chunks): {reply['seconds']:.1f}s")
        filled = ctx
        steps = a.context_steps
        replies = rounds(f"decode at context {ctx}", "decode_at",
                         lambda x: f"{1e3 * x['seconds'] / steps:.1f} ms/token over {steps} steps",
                         with_probe=True, ctx=ctx, steps=steps)
        record("decode_ms_at_context", replies, lambda x: 1e3 * x["seconds"] / steps, "ms/token", str(ctx))
    memory("end")
    probe.close()
    during = summary(limits, "GB/s") if limits else None
    return {p.name: p.close() for p in procs}, during


def derive(model: dict, run_limit_gb_s: float | None) -> None:
    """Figures computed from measured ones: bandwidth %, peak memory, speedups, agreement.

    The decode's % of the bandwidth limit uses the limit probed alongside the decode rounds (the
    same load from other processes); `decode_bandwidth_pct_of_run_best` uses the best probe of
    the whole run (closest to what the machine can do when quiet)."""
    engines = model["engines"]
    during = (model.get("bandwidth_during_decode") or {}).get("median")
    for e in engines.values():
        if e.get("status") != "ok":
            continue
        n_bytes = e["info"]["weight_bytes_per_token"]["bytes"]
        for key, limit in (("decode_bandwidth_pct", during or run_limit_gb_s),
                           ("decode_bandwidth_pct_of_run_best", max(filter(None, [during, run_limit_gb_s])))):
            pct = [100 * n_bytes * r / (limit * 1e9) for r in e["decode_tok_s"]["samples"]]
            e[key] = dict(summary(pct, "%"), weight_bytes_per_token=n_bytes, limit_gb_s=limit)
        e["decode_gb_s"] = n_bytes * e["decode_tok_s"]["median"] / 1e9
        peak = e["peak_memory_sampled_mb"]
        e["peak_memory_mb"] = {"RssAnon": peak.get("RssAnon"), "RssFile": peak.get("RssFile"),
                               "VmHWM": e["memory_final"].get("VmHWM")}
        ctx = e["decode_ms_at_context"]
        lo, hi = min(ctx, key=int), max(ctx, key=int)
        e["context_slowdown"] = {"from": int(lo), "to": int(hi),
                                 "ratio": ctx[hi]["median"] / ctx[lo]["median"]}
    ok = [k for k in ENGINES if engines.get(k, {}).get("status") == "ok"]
    if len(ok) == 2:
        a, b = engines["npllama"], engines["torch"]
        ta, tb = a["greedy_tokens"], b["greedy_tokens"]
        same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        model["greedy_agreement"] = {"leading_tokens_equal": same, "of": min(len(ta), len(tb))}


# --- Report ---------------------------------------------------------------------------------

def fmt(x: float) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def cell(stat: dict | None) -> str:
    if not stat:
        return "-"
    if "min" not in stat or stat["min"] == stat["max"]:
        return fmt(stat["median"])
    return f"{fmt(stat['median'])} ({fmt(stat['min'])}-{fmt(stat['max'])})"


def speedup(a: dict | None, b: dict | None, higher_is_better: bool) -> str:
    if not a or not b:
        return ""
    r = a["median"] / b["median"] if higher_is_better else b["median"] / a["median"]
    return f"{r:.2f}x"


def model_table(model: dict) -> list[str]:
    e = model["engines"]
    np_, th = e.get("npllama", {}), e.get("torch", {})
    if np_.get("status") != "ok":
        np_ = {}
    if th.get("status") != "ok":
        th = {}
    ref = np_ or th
    lines = ["| figure | npllama | torch | npllama speedup |", "|---|---|---|---|"]

    def row(label, key, higher_is_better, sub=None):
        a = np_.get(key, {}) if sub is None else np_.get(key, {}).get(sub)
        b = th.get(key, {}) if sub is None else th.get(key, {}).get(sub)
        lines.append(f"| {label} | {cell(a)} | {cell(b)} | {speedup(a, b, higher_is_better)} |")

    row("load (s)", "load_s", False)
    for n in ref.get("prefill_tok_s", {}):
        row(f"prefill {n} tokens (tok/s)", "prefill_tok_s", True, n)
    row(f"decode {model['settings']['decode_tokens']} tokens (tok/s)", "decode_tok_s", True)
    for n in ref.get("decode_ms_at_context", {}):
        row(f"decode at context {n} (ms/token)", "decode_ms_at_context", False, n)

    def plain(label, get):
        vals = []
        for x in (np_, th):
            try:
                vals.append(get(x))
            except (KeyError, TypeError):
                vals.append(None)
        lines.append(f"| {label} | {vals[0] if vals[0] is not None else '-'} | "
                     f"{vals[1] if vals[1] is not None else '-'} | |")

    if ref.get("context_slowdown"):
        cs = ref["context_slowdown"]
        plain(f"decode slowdown, context {cs['to']} vs {cs['from']}",
              lambda x: f"{x['context_slowdown']['ratio']:.2f}x")
    plain("weights read per decode step (MB)",
          lambda x: fmt(x["info"]["weight_bytes_per_token"]["bytes"] / 2**20))
    plain("decode weight traffic (GB/s)", lambda x: fmt(x["decode_gb_s"]))
    bw = model.get("bandwidth_during_decode")
    if bw:
        lines.append(f"| bandwidth limit probed between decode rounds (GB/s) | {cell(bw)} | | |")
    plain("decode, % of bandwidth limit (probed alongside)", lambda x: cell(x["decode_bandwidth_pct"]))
    plain("decode, % of the run's best probe "
          f"({fmt(ref.get('decode_bandwidth_pct_of_run_best', {}).get('limit_gb_s'))} GB/s)",
          lambda x: cell(x["decode_bandwidth_pct_of_run_best"]))
    plain("other processes' CPU during measurements (cores: median, max)",
          lambda x: f"{statistics.median(x['foreign_cores']):.2f}, {max(x['foreign_cores']):.2f}")
    plain("peak RssAnon (MB, sampled)", lambda x: fmt(x["peak_memory_mb"]["RssAnon"]))
    plain("peak RssFile (MB, sampled)", lambda x: fmt(x["peak_memory_mb"]["RssFile"]))
    plain("VmHWM, peak RSS (MB)", lambda x: fmt(x["peak_memory_mb"]["VmHWM"]))
    plain("RssAnon / RssFile after load (MB)",
          lambda x: " / ".join(fmt(x["memory"]["after_load"][k]) for k in ("RssAnon", "RssFile")))
    return lines


def bandwidth_summary(probes: dict) -> dict:
    ok = {when: p for when, p in probes.items() if p.get("status") == "ok"}
    out = {"probes": probes, "status": "ok" if ok else "error"}
    if ok:
        candidates = [(p["probes"][k]["median"], when, k) for when, p in ok.items()
                      for k in p["probes"] if k.startswith("matvec")]
        out["limit_gb_s"], when, key = max(candidates)
        out["limit_probe"] = f"{key} ({when})"
        out["matrix"] = next(iter(ok.values()))["matrix"]
    return out


def bandwidth_table(bw: dict) -> list[str]:
    rows, cols = bw["matrix"]
    whens = [w for w, p in bw["probes"].items() if p.get("status") == "ok"]
    lines = [f"| bandwidth probe ({rows}x{cols} float32 = {rows * cols * 4 / 2**20:.0f} MB) | "
             + " | ".join(f"GB/s, {w} of run" for w in whens) + " |", "|---" * (1 + len(whens)) + "|"]
    first = bw["probes"][whens[0]]["probes"]
    for key, p in first.items():
        mark = " **(limit)**" if bw["limit_probe"].startswith(key + " ") else ""
        lines.append(f"| {p['label']}{mark} | "
                     + " | ".join(cell(bw["probes"][w]["probes"].get(key)) for w in whens) + " |")
    lines.append(f"\nBandwidth limit: {bw['limit_gb_s']:.2f} GB/s ({bw['limit_probe']}, the best "
                 "median of the matrix-vector probes).")
    return lines


def _fig(m: dict, engine: str, key: str, sub: str | None = None) -> float:
    """The median of one engine's figure on one model."""
    f = m["engines"][engine][key]
    return (f[sub] if sub else f)["median"]


# The targets for npllama: (model, target, measured value from the model's results,
# comparison, threshold, unit). A target whose figures were not measured is left out.
TARGETS = [
    ("smollm2", "decode >= 80% of bandwidth limit",
     lambda m: _fig(m, "npllama", "decode_bandwidth_pct"), ">=", 80, "%"),
    ("smollm2", "decode >= 2.5x torch",
     lambda m: _fig(m, "npllama", "decode_tok_s") / _fig(m, "torch", "decode_tok_s"), ">=", 2.5, "x"),
    ("smollm2", "prefill 128 >= 1.2x torch",
     lambda m: _fig(m, "npllama", "prefill_tok_s", "128") / _fig(m, "torch", "prefill_tok_s", "128"),
     ">=", 1.2, "x"),
    ("smollm2", "decode at 4096 <= 1.5x time at 128",
     lambda m: (_fig(m, "npllama", "decode_ms_at_context", "4096")
                / _fig(m, "npllama", "decode_ms_at_context", "128")), "<=", 1.5, "x"),
    ("1b", "decode >= 80% of bandwidth limit",
     lambda m: _fig(m, "npllama", "decode_bandwidth_pct"), ">=", 80, "%"),
    ("8b", "peak RssAnon <= 3 GB (beyond mapped weights)",
     lambda m: m["engines"]["npllama"]["peak_memory_mb"]["RssAnon"] / 1024, "<=", 3.0, "GB"),
    ("8b", "load < 2 s", lambda m: _fig(m, "npllama", "load_s"), "<", 2.0, "s"),
    ("8b", "decode time <= 1.5x torch bf16",
     lambda m: _fig(m, "torch", "decode_tok_s") / _fig(m, "npllama", "decode_tok_s"), "<=", 1.5, "x"),
]


def check_targets(models: dict) -> list[dict]:
    out = []
    for name, desc, get, op, threshold, unit in TARGETS:
        m = models.get(name)
        if not m or m.get("status") != "ok":
            continue
        try:
            value = get(m)
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        met = {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold}[op]
        out.append({"model": name, "target": desc, "value": value, "unit": unit, "met": met})
    return out


def render(results: dict) -> str:
    m = results["machine"]
    s = results["settings"]
    out = [f"# npllama benchmark, {results['created']}", "",
           f"{m.get('cpu', '?')}, {m.get('cores_available')} cores, {m.get('ram_gb')} GB RAM; "
           f"numpy {m['numpy']} ({(m.get('numpy_blas') or {}).get('name', '?')} "
           f"{(m.get('numpy_blas') or {}).get('version', '')}, {m.get('numpy_blas_threads')} threads), "
           f"torch {m['torch']} ({s['threads']} threads). "
           f"npllama at {(results['code']['commit'] or '?')[:10]}"
           f"{' + uncommitted changes' if results['code']['dirty'] else ''}. "
           f"Timings: median (min-max) of {s['repeats']} runs.", ""]
    if results.get("bandwidth", {}).get("status") == "ok":
        out += bandwidth_table(results["bandwidth"]) + [""]
    for name, model in results["models"].items():
        if model["status"] != "ok":
            out += [f"## {name}: skipped", "", model.get("reason") or model.get("error", ""), ""]
            continue
        out += [f"## {name}: {model['spec']['label']}", ""]
        out += model_table(model)
        notes = []
        for eng, e in model["engines"].items():
            if e.get("status") != "ok":
                notes.append(f"{eng} failed: {e.get('error')}")
            elif "loadavg_1min" in e:
                notes.append(f"{eng} worker: {e['wall_s']:.0f} s wall, {e['cpu_s']:.0f} s CPU; 1-minute load "
                             f"average {e['loadavg_1min']['start']:.1f} -> {e['loadavg_1min']['end']:.1f} "
                             "(counting the benchmark's own threads)")
        ga = model.get("greedy_agreement")
        if ga:
            notes.append(f"greedy tokens: the first {ga['leading_tokens_equal']} of {ga['of']} agree "
                         "between the engines (a check that both do the same work)")
        th = model["engines"].get("torch", {})
        if th.get("status") == "ok":
            notes.append(f"torch: {th['info']['dtype']}, attention {th['info']['gqa']}, "
                         f"{th['info']['num_threads']} threads")
        npi = model["engines"].get("npllama", {})
        if npi.get("status") == "ok":
            notes.append(f"npllama: {npi['info']['dtype']} compute, weights "
                         f"{'resident float32' if npi['info']['resident'] else 'memory-mapped'}; "
                         f"weights read per step {npi['info']['weight_bytes_per_token']['method']}")
        out += [""] + [f"- {n}" for n in notes] + [""]
    if results.get("targets"):
        out += ["## Issue targets (npllama)", "", "| model | target | measured | met |", "|---|---|---|---|"]
        for t in results["targets"]:
            out.append(f"| {t['model']} | {t['target']} | {fmt(t['value'])} {t['unit']} | "
                       f"{'yes' if t['met'] else 'NO'} |")
        out.append("")
    for name, prof in results.get("profiles", {}).items():
        if prof.get("status") != "ok":
            out += [f"## profile {name}: failed", "", prof.get("error", ""), ""]
            continue
        out += [f"## npllama decode profile, {name} (context {prof['context']}, {prof['steps']} steps, "
                f"{fmt(prof['ms_per_token_profiled'])} ms/token under cProfile)", "",
                "| function | calls/token | self ms/token | cumulative ms/token |", "|---|---|---|---|"]
        for r in prof["top_tottime"][:15]:
            out.append(f"| `{r['function']}` | {r['calls'] / prof['steps']:.0f} | "
                       f"{fmt(r['tottime_ms_per_token'])} | {fmt(r['cumtime_ms_per_token'])} |")
        mm = prof.get("matmuls")
        if mm and mm["by_weight"]:
            out += ["", f"Weight matmuls timed one by one (no profiler): {fmt(mm['matmul_ms_per_token'])} of "
                        f"{fmt(mm['ms_per_token'])} ms/token; the rest "
                        f"({fmt(mm['ms_per_token'] - mm['matmul_ms_per_token'])} ms) is everything else.", "",
                    "| weight | calls/token | ms/token | GB/s |", "|---|---|---|---|"]
            for name, r in sorted(mm["by_weight"].items(), key=lambda kv: -kv[1]["ms_per_token"]):
                out.append(f"| {name} | {r['calls_per_token']:.0f} | {fmt(r['ms_per_token'])} | "
                           f"{fmt(r['gb_s'])} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    a = parse_args(argv)
    started = time.perf_counter()
    machine = machine_info()
    threads = a.threads or machine.get("numpy_blas_threads") or machine["cores_available"]
    settings = dict(vars(a), threads=threads, models=a.models, cache_dir=str(a.cache_dir),
                    json=str(a.json), markdown=str(a.markdown) if a.markdown else None)
    results = {"created": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": [sys.executable, *sys.argv], "settings": settings, "machine": machine,
               "code": code_info(), "models": {}, "profiles": {}}
    env_threads = a.threads  # only forced on the children when asked

    cols = 4096 if a.bw_mb >= 64 else 1024
    rows = max(1, a.bw_mb * 2**20 // (4 * cols))

    probe_cfg = dict(engine="probe", threads=threads, bw_rows=rows, bw_cols=cols)

    def probe(when: str) -> dict:
        print(f"[bench] bandwidth probe ({when}, {a.bw_mb} MB float32 matrix)", file=sys.stderr, flush=True)
        return run_worker("bandwidth", {"cfg": dict(threads=threads, bw_rows=rows, bw_cols=cols,
                                                    repeats=a.repeats)}, f"bandwidth/{when}", env_threads)

    # Probed before and after the models: the limit is the best median of the two, so a busy
    # moment during one probe does not make every engine look closer to the limit than it is.
    probes = {"start": probe("start")}
    for name in a.models:
        print(f"[bench] === {name}: preparing ===", file=sys.stderr, flush=True)
        prep = run_worker("prepare", {"model": name, "cache_dir": str(a.cache_dir)}, f"{name}/prepare",
                          env_threads)
        if prep.get("status") != "ok":
            reason = prep.get("reason") or prep.get("error")
            print(f"[bench] {name} skipped: {reason}", file=sys.stderr, flush=True)
            results["models"][name] = {"status": prep["status"], "reason": reason}
            continue
        spec = prep["spec"]
        model = {"status": "ok", "spec": spec, "settings": engine_cfg(a, "", threads),
                 "prepare_peak_memory_mb": prep["peak_memory_sampled_mb"], "engines": {}}
        print(f"[bench] === {name}: {' and '.join(a.engines)}, interleaved ===", file=sys.stderr, flush=True)
        engines, during = measure_engines(a, name, spec, threads, probe_cfg)
        model["engines"], model["bandwidth_during_decode"] = engines, during
        results["models"][name] = model
        if a.profile:
            print(f"[bench] === {name}: profiling npllama decode ===", file=sys.stderr, flush=True)
            cfg = engine_cfg(a, "npllama", threads)
            cfg["profile_out"] = str(a.json.parent / f"profile-{name}.prof")
            results["profiles"][name] = run_worker("profile", {"spec": spec, "cfg": cfg},
                                                   f"{name}/profile", env_threads)

    probes["end"] = probe("end")
    results["bandwidth"] = bandwidth_summary(probes)
    for model in results["models"].values():
        if model["status"] == "ok":
            derive(model, results["bandwidth"].get("limit_gb_s"))
    results["targets"] = check_targets(results["models"])
    results["wall_s"] = time.perf_counter() - started
    results["waited_for_quiet_machine_s"] = WAITED["s"]
    text = render(results)
    print(text)
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(text + "\n")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=1))
    print(f"[bench] done in {results['wall_s']:.0f}s; JSON in {a.json}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
