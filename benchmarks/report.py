"""What the run found: figures derived from the measured ones, the issue's targets, and the
markdown tables."""

from __future__ import annotations

import statistics

from stats import summary

ENGINES = ("npllama", "torch")


def under_load_ratio(e: dict) -> None:
    """Decode under load over idle decode (medians), as e["decode_under_load_vs_idle"]."""
    if e.get("decode_under_load_tok_s") and e.get("decode_tok_s"):
        e["decode_under_load_vs_idle"] = e["decode_under_load_tok_s"]["median"] / e["decode_tok_s"]["median"]


def derive(model: dict, run_limit_gb_s: float | None) -> None:
    """Figures computed from measured ones: bandwidth %, peak memory, under load vs idle,
    speedups, agreement.

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
        under_load_ratio(e)
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
    if model.get("llama_cpp", {}).get("status") == "ok":
        under_load_ratio(model["llama_cpp"])


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


def table(*head: str) -> list[str]:
    """A markdown table's header lines."""
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]


def row(*cells) -> str:
    return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"


def model_table(model: dict) -> list[str]:
    np_, th = ({} if e.get("status") != "ok" else e for e in
               (model["engines"].get("npllama", {}), model["engines"].get("torch", {})))
    ref = np_ or th
    lines = table("figure", "npllama", "torch", "npllama speedup")

    def timing(label, higher_is_better, key, sub=None):
        a, b = (x.get(key, {}) if sub is None else x.get(key, {}).get(sub) for x in (np_, th))
        lines.append(row(label, cell(a), cell(b), speedup(a, b, higher_is_better)))

    def plain(label, get):
        vals = []
        for x in (np_, th):
            try:
                vals.append(get(x))
            except (KeyError, TypeError):  # an engine that failed has no figures
                vals.append("-")
        lines.append(row(label, *vals, ""))

    timing("load (s)", False, "load_s")
    if "load_made_int16_copy_s" in ref:
        timing("first load, making npllama's int16 copy (s)", False, "load_made_int16_copy_s")
    if "load_mapped_int16_copy_s" in ref:
        timing("load mapping npllama's existing int16 copy (s)", False, "load_mapped_int16_copy_s")
    for n in ref.get("prefill_tok_s", {}):
        timing(f"prefill {n} tokens (tok/s)", True, "prefill_tok_s", n)
    timing(f"decode {model['settings']['decode_tokens']} tokens (tok/s)", True, "decode_tok_s")
    if ref.get("decode_under_load_tok_s"):
        timing("the same decode under load: a busy loop on one core (tok/s)", True, "decode_under_load_tok_s")
        plain("decode under load / idle", lambda x: f"{x['decode_under_load_vs_idle']:.2f}x")
    for n in ref.get("decode_ms_at_context", {}):
        timing(f"decode at context {n} (ms/token)", False, "decode_ms_at_context", n)
    if ref.get("context_slowdown") and ref["context_slowdown"]["from"] != ref["context_slowdown"]["to"]:
        cs = ref["context_slowdown"]
        plain(f"decode slowdown, context {cs['to']} vs {cs['from']}",
              lambda x: f"{x['context_slowdown']['ratio']:.2f}x")
    plain("weights read per decode step (MB)",
          lambda x: fmt(x["info"]["weight_bytes_per_token"]["bytes"] / 2**20))
    plain("decode weight traffic (GB/s)", lambda x: fmt(x["decode_gb_s"]))
    if model.get("bandwidth_during_decode"):
        lines.append(row("bandwidth limit probed between decode rounds (GB/s)",
                         cell(model["bandwidth_during_decode"]), "", ""))
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


def llama_cpp_table(model: dict) -> list[str]:
    """Decode idle and under load, llama.cpp beside the engines."""
    lc = model["llama_cpp"]
    if lc["status"] != "ok":
        return [f"- llama.cpp failed: {lc['error']}"]
    engines = {k: e for k, e in model["engines"].items() if e["status"] == "ok"}
    engines["llama.cpp"] = lc
    lines = table(f"decode {model['settings']['decode_tokens']} tokens (tok/s)", *engines)
    lines.append(row("idle", *(cell(e.get("decode_tok_s")) for e in engines.values())))
    lines.append(row("under load (a busy loop on one core)",
                     *(cell(e.get("decode_under_load_tok_s")) for e in engines.values())))
    lines.append(row("under load / idle", *(f"{e['decode_under_load_vs_idle']:.2f}x"
                                            if "decode_under_load_vs_idle" in e else "-"
                                            for e in engines.values())))
    b = lc.get("build", {})
    return lines + ["", f"- llama.cpp: llama-bench {b.get('build_commit')} ({b.get('backends')}), "
                        f"{lc['threads']} threads, `-p 0 -n {model['settings']['decode_tokens']} -r 1` "
                        f"(decodes from an empty cache, {b.get('type_k')} KV cache) in each round, on an "
                        f"F32 GGUF of npllama's decoded weights ({b.get('model_type')})"]


def model_notes(model: dict) -> list[str]:
    notes = []
    for name, e in model["engines"].items():
        if e["status"] == "skipped":
            notes.append(f"{name} not run: {e['reason']}")
        elif e["status"] != "ok":
            notes.append(f"{name} failed: {e['error']}")
        else:
            notes.append(f"{name} worker: {e['wall_s']:.0f} s wall, {e['cpu_s']:.0f} s CPU; 1-minute load "
                         f"average {e['loadavg_1min']['start']:.1f} -> {e['loadavg_1min']['end']:.1f} "
                         "(counting the benchmark's own threads)")
    ga = model.get("greedy_agreement")
    if ga:
        notes.append(f"greedy tokens: the first {ga['leading_tokens_equal']} of {ga['of']} agree "
                     "between the engines (a check that both do the same work)")
    th, npi = (model["engines"].get(e, {}) for e in ("torch", "npllama"))
    if th.get("status") == "ok":
        notes.append(f"torch: {th['info']['dtype']}, attention {th['info']['gqa']}, "
                     f"{th['info']['num_threads']} threads")
    if npi.get("status") == "ok":
        info = npi["info"]
        if info["resident"]:
            weights = "resident float32"
        elif info["resident_layers"]:
            weights = (f"{info['resident_layers']} of {info['n_layers']} layers resident float32, "
                       "the rest streamed")
        else:
            weights = "memory-mapped and streamed"
        notes.append(f"npllama: {info['dtype']} compute, weights {weights}; "
                     f"weights read per step {info['weight_bytes_per_token']['method']}")
        if "load_mapped_int16_copy_s" in npi and "load_made_int16_copy_s" not in npi:
            notes.append("npllama's int16 copy existed before the first load: --fresh-int16-copy deletes "
                         "it first, to time the load that makes it")
    return [f"- {n}" for n in notes]


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
    whens = [w for w, p in bw["probes"].items() if p["status"] == "ok"]
    lines = table(f"bandwidth probe ({rows}x{cols} float32 = {rows * cols * 4 / 2**20:.0f} MB)",
                  *(f"GB/s, {w} of run" for w in whens))
    for key, p in bw["probes"][whens[0]]["probes"].items():
        mark = " **(limit)**" if bw["limit_probe"].startswith(key + " ") else ""
        lines.append(row(p["label"] + mark, *(cell(bw["probes"][w]["probes"].get(key)) for w in whens)))
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
    ("smollm2", "decode >= 65% of bandwidth limit (issue 12)",
     lambda m: _fig(m, "npllama", "decode_bandwidth_pct"), ">=", 65, "%"),
    ("smollm2", "decode under load >= 0.6x its idle decode",
     lambda m: m["engines"]["npllama"]["decode_under_load_vs_idle"], ">=", 0.6, "x"),
    ("smollm2", "decode under load ahead of llama.cpp under load",
     lambda m: _fig(m, "npllama", "decode_under_load_tok_s") / m["llama_cpp"]["decode_under_load_tok_s"]["median"],
     ">", 1.0, "x"),
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
    ("8b", "decode time <= 1.2x torch bf16 (issue 20)",
     lambda m: _fig(m, "torch", "decode_tok_s") / _fig(m, "npllama", "decode_tok_s"), "<=", 1.2, "x"),
    ("8b-q4km", "peak RSS <= 20 GB",
     lambda m: m["engines"]["npllama"]["peak_memory_mb"]["VmHWM"] / 1024, "<=", 20, "GB"),
    ("8b-q4km", "first load (makes the int16 copy) <= 2 min",
     lambda m: _fig(m, "npllama", "load_made_int16_copy_s"), "<=", 120, "s"),
    ("8b-q4km", "later load (maps the int16 copy) <= 10 s",
     lambda m: _fig(m, "npllama", "load_mapped_int16_copy_s"), "<=", 10, "s"),
    ("8b-q4km", "decode <= 1.0 s/token (issue 20)", lambda m: 1 / _fig(m, "npllama", "decode_tok_s"), "<=", 1.0, "s"),
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
        met = {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold,
               ">": value > threshold}[op]
        out.append({"model": name, "target": desc, "value": value, "unit": unit, "met": met})
    return out


def profile_section(name: str, prof: dict) -> list[str]:
    if prof["status"] != "ok":
        return [f"## profile {name}: failed", "", prof["error"]]
    steps, mm = prof["steps"], prof["matmuls"]
    lines = [f"## npllama decode profile, {name} (context {prof['context']}, {steps} steps, "
             f"{fmt(prof['ms_per_token_profiled'])} ms/token under cProfile)", "",
             *table("function", "calls/token", "self ms/token", "cumulative ms/token")]
    lines += [row(f"`{r['function']}`", f"{r['calls'] / steps:.0f}", fmt(r["tottime_ms_per_token"]),
                  fmt(r["cumtime_ms_per_token"])) for r in prof["top_tottime"][:15]]
    lines += ["", f"Weight matmuls timed one by one (no profiler): {fmt(mm['matmul_ms_per_token'])} of "
                  f"{fmt(mm['ms_per_token'])} ms/token; the rest "
                  f"({fmt(mm['ms_per_token'] - mm['matmul_ms_per_token'])} ms) is everything else.", "",
              *table("weight", "calls/token", "ms/token", "GB/s")]
    by_time = sorted(mm["by_weight"].items(), key=lambda kv: -kv[1]["ms_per_token"])
    return lines + [row(w, f"{r['calls_per_token']:.0f}", fmt(r["ms_per_token"]), fmt(r["gb_s"]))
                    for w, r in by_time]


def render(results: dict) -> str:
    m, s, code = results["machine"], results["settings"], results["code"]
    blas = m.get("numpy_blas") or {}
    out = [f"# npllama benchmark, {results['created']}", "",
           f"{m.get('cpu', '?')}, {m['cores_available']} cores, {m.get('ram_gb')} GB RAM; "
           f"numpy {m['numpy']} ({blas.get('name', '?')} {blas.get('version', '')}, "
           f"{m['numpy_blas_threads']} threads), torch {m['torch']} ({s['threads']} threads). "
           f"npllama at {(code['commit'] or '?')[:10]}{' + uncommitted changes' if code['dirty'] else ''}. "
           f"Timings: median (min-max) of {s['repeats']} runs.", ""]
    if results["bandwidth"]["status"] == "ok":
        out += bandwidth_table(results["bandwidth"]) + [""]
    for name, model in results["models"].items():
        if model["status"] != "ok":
            out += [f"## {name}: skipped", "", model["reason"], ""]
        else:
            out += [f"## {name}: {model['spec']['label']}", "", *model_table(model), "",
                    *model_notes(model), ""]
            if "llama_cpp" in model:
                out += [f"### {name}: llama.cpp beside npllama and torch", "", *llama_cpp_table(model), ""]
    if results["targets"]:
        out += ["## Issue targets (npllama)", "", *table("model", "target", "measured", "met")]
        out += [row(t["model"], t["target"], f"{fmt(t['value'])} {t['unit']}", "yes" if t["met"] else "NO")
                for t in results["targets"]] + [""]
    for name, prof in results["profiles"].items():
        out += profile_section(name, prof) + [""]
    return "\n".join(out)
