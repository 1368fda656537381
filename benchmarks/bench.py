"""npllama against a torch eager baseline doing the same work, and llama.cpp beside them: load,
prefill, decode idle and beside a busy core, decode at long context, memory, and decode as a share of
the machine's bandwidth limit. Each engine runs in a worker process of its own (engines.py), their
measurements interleaved round by round. benchmarks/README.md says how each figure is measured.

    python benchmarks/bench.py --quick                       # tiny model: proves it works (a minute)
    python benchmarks/bench.py                               # smollm2 and 1b (half an hour or more)
    python benchmarks/bench.py --with-8b --models 8b,8b-q4km --contexts 128,1024
    python benchmarks/bench.py --models smollm2 --llama-bench ~/llama.cpp/build/bin/llama-bench
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from engines import int16_copies
from harness import (Worker, cell, fmt, listed, machine_info, measure, memory_mb, parser, preset, progress, rounds, settle,
                     stat, summary, table, write)
from prepare import BIG_MODELS, check_models, model_options

ENGINES = {"npllama": "Npllama", "torch": "Torch"}  # engines.py's class of each
QUICK = dict(models="tiny", rounds=2, prefill="8,16", decode_tokens=4, decode_prompt=8, contexts="32,64", context_steps=2,
             bw_mb=16)


def parse_args(argv=None):
    p = parser(__doc__, "latest", loads="idle,busy", models="smollm2,1b")
    model_options(p, "adds 8b if no such model is listed")
    p.add_argument("--engines", type=listed(), default="npllama,torch", help=", ".join(ENGINES))
    p.add_argument("--prefill", type=listed(int), default="16,128,512", help="prompt lengths of the prefill figures")
    p.add_argument("--decode-tokens", type=int, default=128, help="greedy decode steps timed")
    p.add_argument("--decode-prompt", type=int, default=16, help="prompt length before them")
    p.add_argument("--contexts", type=listed(int), default="128,1024,4096", help="cache lengths a decode step is timed at")
    p.add_argument("--context-steps", type=int, default=16, help="decode steps timed at each")
    p.add_argument("--bw-mb", type=int, default=256, help="MB of the bandwidth probe's matrix (beyond the caches)")
    p.add_argument("--fresh-int16-copy", action="store_true",
                   help="delete npllama's int16 copy of a streamed model first, so that the load making it is timed")
    p.add_argument("--llama-bench", metavar="PATH", help="a llama.cpp llama-bench binary: its decode on smollm2")
    preset(p, "--quick", QUICK, "tiny model, a few tokens: proves the script works (CI)", argv, action="store_true")
    a = p.parse_args(argv)
    check_models(p, a)
    if set(a.engines) - set(ENGINES):
        p.error(f"--engines {','.join(a.engines)}: choose from {', '.join(ENGINES)}")
    if a.llama_bench and not os.access(a.llama_bench, os.X_OK):
        p.error(f"--llama-bench {a.llama_bench}: not an executable file")
    a.models += ["8b"] if a.with_8b and not set(a.models) & set(BIG_MODELS) else []
    return a


def engine_cfg(a, threads: int) -> dict:
    keys = ("prefill", "decode_prompt", "decode_tokens", "contexts")
    return dict({k: getattr(a, k) for k in keys}, threads=threads, max_seq_len=1 + max(
        max(a.prefill), a.decode_prompt + a.decode_tokens + 2, max(a.contexts) + a.context_steps))


class LlamaBench:
    """llama.cpp's decode: a `llama-bench -p 0 -n N -r 1` run a call (N tokens from an empty cache, the
    engines' threads) on an F32 GGUF of npllama's decoded weights; a failure is kept, as a Worker's."""

    def __init__(self, binary: str, gguf: str, threads: int):
        self.cmd, self.error = [binary, "-m", gguf, "-p", "0", "-t", str(threads), "-r", "1", "-o", "json"], None
        self.results = {"engine": "llama.cpp", "binary": binary, "gguf": gguf, "threads": threads}

    def decode(self, n: int) -> dict | None:
        try:
            if not self.error:
                result = json.loads(subprocess.run([*self.cmd, "-n", str(n)], capture_output=True, text=True).stdout)[0]
                self.results["build"] = {k: result.get(k) for k in ("build_commit", "backends", "model_type", "type_k")}
                return {"seconds": n / result["avg_ts"]}
        except (OSError, ValueError, LookupError, ZeroDivisionError) as e:
            self.error = f"{' '.join(self.cmd)}: {type(e).__name__}: {e}"
            progress("llama.cpp", f"FAILED: {self.error}")

    def close(self) -> dict:
        return dict(self.results, status="error" if self.error else "ok", **({"error": self.error} if self.error else {}))


def measure_model(a, name: str, spec: dict, threads: int, llama=None) -> dict:
    """Every figure of every engine on one model, the engines' measurements interleaved round by round;
    llama.cpp's decode and the bandwidth limit are measured in the decode rounds."""
    unavailable = spec.get("unavailable", {})
    workers = {e: Worker(f"{name}/{e}", "engines") for e in a.engines if e not in unavailable}
    for e, w in workers.items():
        w.ask(ENGINES[e], spec=spec, cfg=engine_cfg(a, threads))
    probe = Worker(f"{name}/probe", "engines")
    probe.ask("Probe", threads=threads, mb=a.bw_mb)
    res = {e: {} for e in [*workers, "llama.cpp", "probe"]}
    own = lambda: [w.pid for w in (*workers.values(), probe)]  # noqa: E731

    def each(label: str, asks: dict, loads=("idle",)) -> list[dict]:
        cases = [{"engine": e, "load": load} for load in loads for e in asks]
        return rounds(cases, lambda c: asks[c["engine"]](), a.rounds, own, f"{name} {label}")

    def every_engine(fn: str, **kwargs) -> dict:
        return {e: lambda w=w: w.ask(fn, **kwargs) for e, w in workers.items()}

    def record(case: dict, unit: str, value, key: str, sub: str | None = None) -> None:
        """The summary of a case's runs as its engine's figure `key` (or key[sub]), with the load of each."""
        if (s := stat(case, unit, value)) is not None:
            figures = res[case["engine"]]
            figures.setdefault("foreign_cores", []).extend(s.get("foreign_cores", []))
            (figures.setdefault(key, {}) if sub else figures)[sub or key] = s

    for c in each("load", every_engine("load")):
        record(c, "s", "seconds", "load_s")
        for how in ("made", "mapped"):  # a streamed model's first load makes npllama's int16 copy
            seconds = [x["seconds"] for x in c.get("runs", []) if x.get("int16_copy") == how]
            res[c["engine"]].update({f"load_{how}_int16_copy_s": summary(seconds, "s")} if seconds else {})
    for e, w in workers.items():
        res[e]["memory_after_load"] = None if w.error else memory_mb(w.pid)
        settle(own())
        setup = w.ask("setup") or {}
        res[e].update(info=setup.get("info"), model_args=setup.get("model_args"))
    for n in a.prefill:
        for c in each(f"prefill {n}", every_engine("prefill", n=n)):
            record(c, "tok/s", lambda x: n / x["seconds"], "prefill_tok_s", str(n))
    n = a.decode_tokens
    asks = dict(every_engine("decode", prompt=a.decode_prompt, n=n), probe=lambda: probe.ask("matvec"),
                **({"llama.cpp": lambda: llama.decode(n)} if llama else {}))
    for c in each(f"decode {n}", asks, a.loads):
        key = "decode_tok_s" if c["load"] == "idle" else "decode_under_load_tok_s"
        record(c, *(("GB/s", "gb_s") if c["engine"] == "probe" else ("tok/s", lambda x: n / x["seconds"])), key)
        if c["engine"] in workers and c["load"] == "idle" and c.get("runs"):
            res[c["engine"]]["greedy_tokens"] = c["runs"][0]["tokens"]
    filled, steps = 0, a.context_steps
    for ctx in sorted(a.contexts):
        for e, w in workers.items():
            reply = measure(lambda: w.ask("fill", start=filled, end=ctx), own())
            res[e].setdefault("fill_s", {})[str(ctx)] = reply and reply["seconds"]
        filled = ctx
        for c in each(f"decode at {ctx}", every_engine("decode_at", ctx=ctx, steps=steps)):
            record(c, "ms/token", lambda x: 1e3 * x["seconds"] / steps, "decode_ms_at_context", str(ctx))
    probe.close()
    limit, lc = res.pop("probe"), res.pop("llama.cpp")
    engines = {e: dict(res[e], engine=e, **workers[e].close()) if e in workers else
               {"engine": e, "status": "skipped", "reason": unavailable[e]} for e in a.engines}
    return {"engines": engines, "bandwidth_during_decode": limit.get("decode_tok_s"),
            "bandwidth_during_busy_decode": limit.get("decode_under_load_tok_s"),
            **({"llama_cpp": dict(llama.close(), **lc)} if llama else {})}


def benchmark_model(a, name: str, threads: int) -> dict:
    prep = Worker(f"{name}/prepare", "prepare")
    spec = prep.ask("prepare", name=name, cache_dir=a.cache_dir, llama_cpp=a.llama_bench is not None)
    cost = prep.close()
    if spec is None:
        return {"status": "skipped" if "Skip:" in cost["error"] else "error", "reason": cost["error"]}
    if a.fresh_int16_copy and spec.get("weights") != "exact":  # 8b-exact makes no copy: keep the 8b's
        for copy in int16_copies(spec):
            progress("bench", f"deleting {copy} (--fresh-int16-copy)")
            copy.unlink()
    llama = LlamaBench(a.llama_bench, spec["f32_gguf"], threads) if spec.get("f32_gguf") else None
    return {"status": "ok", "spec": spec, "settings": engine_cfg(a, threads), "prepare_peak_memory_mb":
            cost["peak_memory_mb"], **measure_model(a, name, spec, threads, llama)}


def derive(model: dict) -> None:
    """% of the bandwidth limit probed in the decode rounds, and how many greedy tokens the engines agree on."""
    limit = model["bandwidth_during_decode"]["median"]
    for e in model["engines"].values():
        if e.get("status") == "ok" and "info" in e:
            e["decode_bandwidth_pct"] = dict(summary([100 * e["info"]["weight_bytes"] * r / (limit * 1e9)
                                                      for r in e["decode_tok_s"]["samples"]], "%"), limit_gb_s=limit)
    tokens = [e["greedy_tokens"] for e in model["engines"].values() if "greedy_tokens" in e]
    if len(tokens) == 2:
        same = next((i for i, (x, y) in enumerate(zip(*tokens)) if x != y), min(map(len, tokens)))
        model["greedy_agreement"] = {"leading_tokens_equal": same, "of": min(map(len, tokens))}


def model_table(model: dict) -> str:
    """A row a figure, a column an engine (llama.cpp's where it ran), then npllama's speedup over torch."""
    ok = {k: e for k, e in model["engines"].items() if e.get("status") == "ok"}
    columns, s = dict(ok, **{"llama.cpp": model["llama_cpp"]} if "llama_cpp" in model else {}), model["settings"]

    def row(label, get, higher_is_better=None):
        cells = []
        for e in columns.values():
            try:
                cells.append(get(e))
            except (KeyError, TypeError):  # not measured for this engine
                cells.append(None)
        both = higher_is_better is not None and len(ok) == 2 and all(cells[:2])
        return [label, *(cell(c) if isinstance(c, dict) or c is None else c for c in cells),
                f"{(cells[0]['median'] / cells[1]['median']) ** (1 if higher_is_better else -1):.2f}x" if both else ""]
    rows = [row("load (s)", lambda e: e["load_s"], False),
            row("first load, making npllama's int16 copy (s)", lambda e: e["load_made_int16_copy_s"], False),
            row("load mapping npllama's int16 copy (s)", lambda e: e["load_mapped_int16_copy_s"], False),
            *[row(f"prefill {n} tokens (tok/s)", lambda e, n=str(n): e["prefill_tok_s"][n], True) for n in s["prefill"]],
            row(f"decode {s['decode_tokens']} tokens (tok/s)", lambda e: e["decode_tok_s"], True),
            row("the same decode beside a busy core (tok/s)", lambda e: e["decode_under_load_tok_s"], True),
            *[row(f"decode at context {n} (ms/token)", lambda e, n=str(n): e["decode_ms_at_context"][n], False)
              for n in sorted(s["contexts"])],
            row("weights read per decode step (MB)", lambda e: fmt(e["info"]["weight_bytes"] / 2**20)),
            row("bandwidth limit probed in the decode rounds (GB/s)", lambda e: model["bandwidth_during_decode"]),
            row("decode, % of the bandwidth limit", lambda e: e["decode_bandwidth_pct"]),
            row("other processes' CPU during measurements (cores: median, max)",
                lambda e: f"{statistics.median(e['foreign_cores']):.2f}, {max(e['foreign_cores']):.2f}"),
            *[row(f"peak {k} (MB{', sampled' if k != 'VmHWM' else ''})", lambda e, k=k: fmt(e["peak_memory_mb"][k]))
              for k in ("RssAnon", "RssFile", "VmHWM")],
            row("RssAnon / RssFile after load (MB)",
                lambda e: " / ".join(fmt(e["memory_after_load"][k]) for k in ("RssAnon", "RssFile")))]
    return table(["figure", *columns, "npllama speedup" if len(ok) == 2 else ""],
                 [r for r in rows if set(r[1:-1]) != {"-"}])


def model_notes(model: dict) -> list[str]:
    """How each engine ran (or why not), and how many greedy tokens the engines agree on."""
    notes = [f"- greedy tokens: the first {g['leading_tokens_equal']} of {g['of']} agree between the engines"
             for g in [model.get("greedy_agreement")] if g]
    for name, e in [*model["engines"].items(), *([("llama.cpp", model["llama_cpp"])] if "llama_cpp" in model else [])]:
        info, b = e.get("info") or {}, e.get("build", {})
        if e["status"] != "ok":
            how = f"not run: {e['reason']}" if e["status"] == "skipped" else f"failed: {e['error']}"
        elif name == "llama.cpp":
            how = (f"llama-bench {b.get('build_commit')} ({b.get('backends')}), {e['threads']} threads, `-p 0 -r 1` "
                   f"(from an empty cache, {b.get('type_k')} KV cache), an F32 GGUF of npllama's weights")
        else:
            how = (f"{info['dtype']}, {info['num_threads']} threads" if name == "torch" else
                   f"{info['dtype']} compute, weights " + ("resident float32" if info["resident"] else
                   f"{info['resident_layers']} of {info['n_layers']} layers resident, the rest streamed {info['streamed_as']}"))
            how += f"; worker {e['wall_s']:.0f} s wall, {e['cpu_s']:.0f} s CPU"
        notes.append(f"- {name}: {how}")
    return notes


def render(results: dict) -> str:
    s = results["settings"]
    out = [f"Both engines {s['threads']} threads. Timings: median (min-max) of {s['rounds']} runs. Bandwidth limit: "
           f"the fastest float32 matrix-vector product over {s['bw_mb']} MB (NumPy sgemv, NumPy x @ W.T, torch F.linear)."]
    for name, model in results["models"].items():
        out += [f"## {name}: not run", model["reason"]] if model["status"] != "ok" else [
            f"## {name}: {model['spec']['label']}", model_table(model), "\n".join(model_notes(model))]
    return "\n\n".join(out)


def main(argv=None) -> int:
    a = parse_args(argv)
    machine = machine_info()
    threads = machine["blas"].get("num_threads") or machine["cores_available"]
    results = {"settings": dict(vars(a), threads=threads, out=str(a.out)), "models": {}}
    for name in a.models:
        results["models"][name] = benchmark_model(a, name, threads)
        if results["models"][name]["status"] == "ok":
            derive(results["models"][name])
    write(a.out, "npllama against torch (and llama.cpp)", render(results), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
