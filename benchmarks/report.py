"""What the run found: figures derived from the measured ones, the issue's targets, and the
markdown tables."""

from __future__ import annotations

import statistics

from stats import summary

ENGINES = ("npllama", "torch")


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
