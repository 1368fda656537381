"""The engines' worker processes, driven from here: one measurement at a time, the engines
interleaved round by round."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import ForeignLoad, cpu_seconds, wait_for_quiet_machine, wait_until_idle
from stats import MemorySampler, summary

HERE = Path(__file__).resolve().parent
WAITED = {"s": 0.0}  # seconds spent waiting for a quiet machine in this run (see --wait-budget)


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
