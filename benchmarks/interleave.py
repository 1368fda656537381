"""Every measurement runs in a worker process (benchmarks/worker.py) driven from here: `Worker` is
one such process, asked one request at a time; `measure_engines` interleaves the engines'
measurements on one model round by round, idle and, for decode, under load (a `Spinner` holding
one core). An engine the model's spec says it cannot run (spec["unavailable"]) gets no worker and
is reported as skipped, with the reason."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import ForeignLoad, QuietMachine, Spinner, cpu_ns, cpu_seconds, wait_until_idle
from stats import MemorySampler, progress, read_memory, summary

HERE = Path(__file__).resolve().parent


class Worker:
    """One benchmarks/worker.py process, asked one JSON-line request at a time. Its memory is
    sampled from here, so the measured process runs undisturbed. A failure is kept, not raised:
    the worker is asked nothing more and its error goes into the results, so one failed engine
    leaves the other's figures standing. `results` collects what was measured in it."""

    def __init__(self, tag: str, threads: int | None):
        self.tag, self.error, self.results = tag, None, {}
        env = dict(os.environ)
        if threads:  # forced on the workers only when asked (--threads)
            env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        self.t0, self.load0 = time.perf_counter(), os.getloadavg()[0]
        self.proc = subprocess.Popen([sys.executable, str(HERE / "worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.pid = self.proc.pid
        self.sampler = MemorySampler(self.pid).start()

    def ask(self, op: str, **request) -> dict | None:
        """The worker's reply, or None once it has failed."""
        if self.error:
            return None
        try:
            self.proc.stdin.write(json.dumps(dict(request, op=op)) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError as e:
            line, self.error = "", f"worker died: {e}"
        if line:
            reply = json.loads(line)
            if "error" not in reply:
                return reply
            self.error = f"{op}: {reply['error']}"
        self.error = self.error or f"worker exited (code {self.proc.poll()}) during {op}"
        progress(self.tag, f"FAILED: {self.error}")
        return None

    def close(self) -> dict:
        """`results`, with what the process cost: status (and error), memory at the end and at its
        peak, wall and CPU seconds, and the load average around it (other processes steal cores)."""
        final, cpu = read_memory(self.pid), cpu_seconds(self.pid)
        try:
            self.proc.stdin.close()  # end of requests: the worker exits
        except OSError:  # a dead worker's pipe still holds the request it failed on
            pass
        self.proc.wait()
        cost = {"status": "error" if self.error else "ok", "memory_final": final,
                "peak_memory_sampled_mb": self.sampler.stop(), "wall_s": time.perf_counter() - self.t0,
                "cpu_s": cpu, "loadavg_1min": {"start": self.load0, "end": os.getloadavg()[0]}}
        if self.error:
            cost["error"] = self.error
        return dict(cost, **self.results)


def run_in_worker(tag: str, threads: int | None, *requests: tuple[str, dict]) -> dict:
    """A fresh worker asked each (op, request) in turn: its last reply, with what it cost."""
    worker = Worker(tag, threads)
    for op, request in requests:
        worker.results = worker.ask(op, **request) or {}
    return worker.close()


def engine_cfg(a: argparse.Namespace, threads: int) -> dict:
    max_seq_len = 1 + max(max(a.prefill), a.decode_prompt + a.decode_tokens + 2,
                          max(a.contexts) + a.context_steps, a.profile_context + a.profile_steps + 2)
    return dict(repeats=a.repeats, prefill=a.prefill, decode_tokens=a.decode_tokens,
                decode_prompt=a.decode_prompt, contexts=a.contexts, context_steps=a.context_steps,
                prefill_chunk=a.prefill_chunk, threads=threads, torch_gqa=a.torch_gqa,
                max_seq_len=max_seq_len, profile_steps=a.profile_steps, profile_context=a.profile_context)


class Interleaved:
    """The engines on one model, each in its worker, and the matrix-vector probe in another. Each
    round runs one measurement on every engine back to back, alternating which goes first, so a
    burst of load from other processes lands on both; decode rounds also probe the bandwidth
    limit, so that the decode's % of it compares figures measured under the same conditions.
    While `spinner` runs, it counts as one of the benchmark's own processes: the waits for a quiet
    machine do not wait for it, and the cores it used are recorded beside the foreign ones.
    `llama_bench` (llama_cpp.LlamaBench), when given, takes part in the decode rounds."""

    def __init__(self, a: argparse.Namespace, name: str, spec: dict, threads: int, quiet: QuietMachine,
                 llama_bench=None):
        self.repeats, self.quiet, self.limits = a.repeats, quiet, []
        unavailable = spec.get("unavailable", {})
        self.skipped = {e: {"engine": e, "status": "skipped", "reason": unavailable[e]}
                        for e in a.engines if e in unavailable}
        for e, s in self.skipped.items():
            progress(f"{name}/{e}", f"not run: {s['reason']}")
        self.engines = {e: Worker(f"{name}/{e}", a.threads) for e in a.engines if e not in unavailable}
        self.order = list(a.engines)
        self.llama_bench, self.spinner = llama_bench, None
        for e, w in self.engines.items():
            w.results = {"engine": e, "memory": {}}
            w.ask("engine", engine=e, spec=spec, cfg=engine_cfg(a, threads))
        self.probe = Worker(f"{name}/probe", a.threads)
        self.probe.ask("probes", threads=threads, mb=a.bw_mb)
        self.pids = [w.pid for w in (*self.engines.values(), self.probe)]

    def settle(self, worker: Worker) -> None:
        """Let the other workers' spinning BLAS/OpenMP threads go to sleep before measuring."""
        others = [w.pid for w in (*self.engines.values(), self.probe)
                  if w is not worker and w.proc.poll() is None]
        worker.results.setdefault("idle_wait_s", []).append(round(wait_until_idle(others), 3))

    def own_pids(self) -> list[int]:
        return [*self.pids, *([self.spinner.pid] if self.spinner else [])]

    def measure(self, worker: Worker, op: str, **request) -> dict | None:
        """worker.ask(op) once the machine is quiet, with the cores other processes used meanwhile
        (and the spinner's, when it runs)."""
        self.settle(worker)
        waited = self.quiet.wait(self.own_pids(), worker.tag)
        if waited is not None:
            worker.results.setdefault("quiet_wait_s", []).append(round(waited, 2))
        load = ForeignLoad(self.own_pids())
        spun = (time.perf_counter(), cpu_ns(self.spinner.pid)) if self.spinner else None
        reply = worker.ask(op, **request)
        if reply is not None:
            reply["foreign_cores"] = load.cores()
            if spun:
                reply["spinner_cores"] = self.spinner.cores(*spun)
        return reply

    def probe_limit(self) -> None:
        reply = self.measure(self.probe, "matvec")
        if reply is not None:
            self.limits.append(reply["gb_s"])
            progress(self.probe.tag, f"matvec {reply['gb_s']:.1f} GB/s (best of "
                     f"{', '.join(f'{v:.1f}' for v in reply['probes'].values())})")

    def rounds(self, label: str, op: str, request: dict, value, unit: str, key: str,
               sub: str | None = None, with_probe: bool = False, engines: dict | None = None
               ) -> dict[str, list]:
        """`repeats` rounds of `op` on every engine (or on `engines`); each engine's `value`s
        summarised as its results[key] (or results[key][sub]). Returns the replies, by engine."""
        engines = self.engines if engines is None else engines
        replies = {e: [] for e in engines}
        order = list(engines.items())
        for r in range(self.repeats):
            if with_probe:
                self.probe_limit()
            for e, w in (order if r % 2 == 0 else order[::-1]):
                reply = self.measure(w, op, **request)
                if reply is not None:
                    replies[e].append(reply)
                    spun = (f"; spinner: {reply['spinner_cores']:.2f} cores"
                            if "spinner_cores" in reply else "")
                    progress(w.tag, f"{label} {r + 1}/{self.repeats}: {value(reply):.4g} {unit} "
                             f"[other processes: {reply['foreign_cores']:.1f} cores{spun}]")
        for e, w in engines.items():
            if w.error or not replies[e]:
                continue
            stat = summary([value(x) for x in replies[e]], unit)
            stat["cpu_seconds"] = [x["cpu_seconds"] for x in replies[e]]
            stat["foreign_cores"] = [round(x["foreign_cores"], 2) for x in replies[e]]
            if self.spinner:
                stat["spinner_cores"] = [round(x["spinner_cores"], 2) for x in replies[e]]
            w.results.setdefault("foreign_cores", []).extend(stat["foreign_cores"])
            if sub is None:
                w.results[key] = stat
            else:
                w.results.setdefault(key, {})[sub] = stat
        return replies

    def memory(self, label: str) -> None:
        for w in self.engines.values():
            if not w.error:
                w.results["memory"][label] = read_memory(w.pid)

    def setup(self) -> None:
        for w in self.engines.values():
            self.settle(w)
            w.results.update(w.ask("setup") or {})

    def fill(self, start: int, end: int, chunk: int) -> None:
        for w in self.engines.values():
            reply = self.measure(w, "fill", start=start, end=end, chunk=chunk)
            if reply is not None:
                w.results.setdefault("fill_s", {})[str(end)] = reply["seconds"]
                progress(w.tag, f"filled the cache to {end} positions ({end - start} tokens in "
                         f"{chunk}-token chunks): {reply['seconds']:.1f}s")

    def under_load(self, rounds) -> None:
        """`rounds()` while a Spinner holds the last core; it is stopped even if they fail."""
        self.spinner = Spinner()
        try:
            rounds(f"under load (a busy loop on core {self.spinner.core})")
        finally:
            self.spinner.stop()
            self.spinner = None

    def close(self) -> dict:
        """Each engine's results (skipped ones too), the limit probed between decode rounds, and
        llama.cpp's results when it ran."""
        self.probe.close()
        measured = {e: w.close() for e, w in self.engines.items()}
        out = {"engines": {e: measured.get(e) or self.skipped[e] for e in self.order},
               "bandwidth_during_decode": summary(self.limits, "GB/s") if self.limits else None}
        if self.llama_bench:
            out["llama_cpp"] = self.llama_bench.close()
        return out


def measure_engines(a: argparse.Namespace, name: str, spec: dict, threads: int, quiet: QuietMachine,
                    llama_bench=None) -> dict:
    """Every figure for every engine on one model (Interleaved.close), and llama.cpp's decode
    figures when `llama_bench` is given."""
    m = Interleaved(a, name, spec, threads, quiet, llama_bench)
    m.memory("start")
    loads = m.rounds("load", "load", {}, lambda x: x["seconds"], "s", "load_s")
    for e, w in m.engines.items():  # a streamed model's first load may make npllama's int16 copy
        for how in ("made", "mapped"):
            seconds = [x["seconds"] for x in loads[e] if x.get("int16_copy") == how]
            if seconds:
                w.results[f"load_{how}_int16_copy_s"] = summary(seconds, "s")
    m.memory("after_load")
    m.setup()
    for n in a.prefill:
        m.rounds(f"prefill {n} tokens", "prefill", {"n": n}, lambda x, n=n: n / x["seconds"], "tok/s",
                 "prefill_tok_s", str(n))
    m.memory("after_prefill")
    n_new, decode = a.decode_tokens, {"prompt": a.decode_prompt, "n": a.decode_tokens}
    decoders = dict(m.engines, **({"llama.cpp": llama_bench} if llama_bench else {}))
    label = f"decode {n_new} tokens after a {a.decode_prompt}-token prompt"
    replies = m.rounds(label, "decode", decode, lambda x: n_new / x["seconds"], "tok/s",
                       "decode_tok_s", with_probe=True, engines=decoders)
    for e, w in m.engines.items():
        if replies[e]:
            w.results["greedy_tokens"] = replies[e][0]["tokens"]
    m.memory("after_decode")
    m.under_load(lambda how: m.rounds(f"{label}, {how}", "decode", decode, lambda x: n_new / x["seconds"],
                                      "tok/s", "decode_under_load_tok_s", engines=decoders))
    filled, steps = 0, a.context_steps
    for ctx in sorted(a.contexts):
        m.fill(filled, ctx, a.prefill_chunk)
        filled = ctx
        m.rounds(f"decode at context {ctx} ({steps} steps)", "decode_at", {"ctx": ctx, "steps": steps},
                 lambda x: 1e3 * x["seconds"] / steps, "ms/token", "decode_ms_at_context", str(ctx),
                 with_probe=True)
    m.memory("end")
    return m.close()
