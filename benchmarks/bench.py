"""npllama against a torch baseline doing the same work, side by side, in one run.

    python benchmarks/bench.py                      # smollm2 and 1b, 3 repeats (half an hour or more)
    python benchmarks/bench.py --quick              # tiny model, proves the script works (a minute)
    python benchmarks/bench.py --models 1b --decode-tokens 32 --contexts 128,1024
    python benchmarks/bench.py --with-8b --models 8b --contexts 128,1024   # writes a 16 GB file
    python benchmarks/bench.py --models 1b --profile                      # + cProfile of decode
    python benchmarks/bench.py --models smollm2 --llama-bench ~/llama.cpp/build/bin/llama-bench

The baseline is torch eager with a KV cache (benchmarks/torch_llama.py, written the way Meta's
reference is; see its docstring for why not oracle.reference.Oracle), given the same weights and
dtype, with torch.set_num_threads equal to the threads NumPy's BLAS uses. Both engines compute
logits of the last position only, feed back the argmax (greedy) and use the same token ids.

Figures, for each engine on each model:
  load            npllama.load(...) until it returns; torch: state dict load + model build
                  (tokenizer not loaded by torch, KV cache allocation excluded on both sides);
  prefill         tok/s of one forward pass over a 16-, 128- and 512-token prompt (--prefill);
  decode          tok/s over --decode-tokens greedy steps after a --decode-prompt-token prompt;
  under load      the same decode while a busy loop holds the last core (machine.Spinner), and
                  its ratio to the idle decode: npllama gives BLAS the cores other processes
                  leave free, torch keeps its threads;
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

--llama-bench PATH adds llama.cpp's decode, idle and under load, on smollm2: the given llama-bench
binary runs an F32 GGUF of npllama's decoded weights, in the decode rounds (benchmarks/llama_cpp.py).

Models (--models, comma-separated): tiny, smollm2 (the default SmolLM2-135M GGUF), 1b (random
Llama-3.2-1B shape, float32), and, only with --with-8b as they write multi-GB files: 8b (random
Meta-Llama-3-8B, bf16 file; npllama streams its int16 copy), 8b-exact (the same file, npllama alone
streaming the bf16 as stored), 8b-tiered (the same file, npllama alone with an 8 GB weights
budget: part of the layers float32-resident) and 8b-q4km (a random Meta-Llama-3-8B Q4_K_M GGUF,
npllama alone). The first load of a streamed model makes npllama's int16 copy; --fresh-int16-copy
deletes it first so that load is timed. An engine a model's spec says cannot run it is reported as not run, with
the reason. Random checkpoints are written once into --cache-dir (default ~/.cache/npllama/bench).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from interleave import engine_cfg, measure_engines, run_in_worker  # noqa: E402
from llama_cpp import LlamaBench  # noqa: E402
from machine import QuietMachine, code_info, machine_info  # noqa: E402
from prepare import BIG_MODELS, MODEL_NAMES, default_cache_dir, int16_copies  # noqa: E402
from report import ENGINES, bandwidth_summary, check_targets, derive, render  # noqa: E402
from stats import progress  # noqa: E402


# --- Command line ---------------------------------------------------------------------------

def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    return [positive_int(v) for v in text.split(",")]


def name_list(choices):
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}: choose from {', '.join(choices)}")
        return names
    return parse


# The options whose default --quick shrinks: name: (type, default, default with --quick, help).
SIZES = {
    "models": (name_list(MODEL_NAMES), "smollm2,1b", "tiny",
               "comma-separated models: " + ", ".join(MODEL_NAMES)),
    "repeats": (positive_int, "3", "2", "timed runs per figure (median, min, max)"),
    "prefill": (positive_ints, "16,128,512", "8,16", "prompt lengths for prefill tok/s"),
    "decode_tokens": (positive_int, "128", "4", "greedy decode steps timed per repeat"),
    "decode_prompt": (positive_int, "16", "8", "prompt length before the decode steps"),
    "contexts": (positive_ints, "128,1024,4096", "32,64", "cache lengths at which decode time per token "
                 "is measured"),
    "context_steps": (positive_int, "16", "2", "decode steps timed per repeat at each context length"),
    "prefill_chunk": (positive_int, "512", "32", "tokens per forward pass when filling the cache to a "
                      "context length"),
    "max_wait": (float, "30", "0", "before each measurement, wait up to this many seconds for other "
                 "processes to use under 0.25 cores (0: never wait); the cores they used during each "
                 "measurement are recorded either way"),
    "bw_mb": (positive_int, "256", "16", "MB of the float32 matrix of the bandwidth probe (far larger "
              "than the caches)"),
    "profile_steps": (positive_int, "8", "2", "decode steps profiled"),
    "profile_context": (positive_int, "128", "16", "cache length when profiling"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark npllama against a torch eager baseline (same weights, same dtype, "
                    "same threads): load, prefill, decode, decode at long context, memory, and "
                    "decode as a percentage of the machine's measured bandwidth limit.",
        epilog="How each figure is measured: see the docstring of benchmarks/bench.py.")
    p.add_argument("--with-8b", action="store_true",
                   help="allow the models that write multi-GB files once: " +
                        "; ".join(f"{k}: {v}" for k, v in BIG_MODELS.items()) +
                        " (the 8b's checkpoint needs 33 GB free disk while writing); adds 8b to "
                        "--models if none of them is listed")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, a few tokens, short contexts, small bandwidth matrix: proves "
                        "the script works (CI), in under a minute; its figures mean nothing")
    p.add_argument("--engines", type=name_list(ENGINES), default=list(ENGINES),
                   help="engines to run [default: npllama,torch]")
    for key, (kind, default, quick, text) in SIZES.items():
        p.add_argument("--" + key.replace("_", "-"), type=kind,
                       help=f"{text} [default: {default}; {quick} with --quick]")
    p.add_argument("--threads", type=int, default=None, help="threads for both engines: "
                   "torch.set_num_threads, and OPENBLAS/OMP_NUM_THREADS for NumPy [default: the "
                   "threads NumPy's BLAS uses]")
    p.add_argument("--torch-gqa", choices=("sdpa", "repeat_kv"), default="sdpa",
                   help="torch attention: SDPA with enable_gqa (no copies), or Meta's repeat_kv copies "
                        "[default: sdpa]")
    p.add_argument("--wait-budget", type=float, default=900,
                   help="stop waiting for a quiet machine once this many seconds have been spent "
                        "waiting in the whole run [default: 900]")
    p.add_argument("--fresh-int16-copy", action="store_true",
                   help="delete npllama's int16 copy of a streamed model (8b, 8b-q4km) before its loads, "
                        "so that the first load, which makes it again, is timed")
    p.add_argument("--llama-bench", metavar="PATH", default=None,
                   help="a llama.cpp llama-bench binary: adds llama.cpp's decode, idle and under "
                        "load, on smollm2 (an F32 GGUF of npllama's decoded weights, written once)")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile npllama's decode steps on each model (stats in the JSON, "
                        ".prof files next to it)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where random checkpoints and converted weights are written once "
                        "[default: $NPLLAMA_BENCH_CACHE or ~/.cache/npllama/bench]")
    p.add_argument("--json", type=Path, default=HERE / "results" / "latest.json",
                   help="JSON results [default: benchmarks/results/latest.json]")
    p.add_argument("--markdown", type=Path, default=None, help="also write the markdown tables here")
    a = p.parse_args(argv)
    for key, (kind, default, quick, _) in SIZES.items():
        if getattr(a, key) is None:
            setattr(a, key, kind(quick if a.quick else default))
    if a.llama_bench and not os.access(a.llama_bench, os.X_OK):
        p.error(f"--llama-bench {a.llama_bench}: not an executable file")
    big = [m for m in a.models if m in BIG_MODELS]
    if a.with_8b and not big:
        a.models.append("8b")
    if big and not a.with_8b:
        p.error("; ".join(f"{m} writes {BIG_MODELS[m]}" for m in big) + ": pass --with-8b to confirm")
    return a


# --- The run --------------------------------------------------------------------------------

def bandwidth_probe(a: argparse.Namespace, threads: int, when: str) -> dict:
    tag = f"bandwidth/{when}"
    progress("bench", f"bandwidth probe ({when}, {a.bw_mb} MB float32 matrix)")
    probe = run_in_worker(tag, a.threads, ("probes", dict(threads=threads, mb=a.bw_mb)),
                          ("bandwidth", dict(repeats=a.repeats)))
    for p in probe.get("probes", {}).values():
        progress(tag, f"{p['label']}: {p['median']:.2f} GB/s")
    return probe


def benchmark_model(a: argparse.Namespace, name: str, threads: int, quiet: QuietMachine) -> dict:
    progress("bench", f"=== {name}: preparing ===")
    prep = run_in_worker(f"{name}/prepare", a.threads, ("prepare", dict(
        name=name, cache_dir=str(a.cache_dir), llama_cpp=a.llama_bench is not None)))
    if prep["status"] != "ok":
        reason = prep.get("reason") or prep.get("error")
        progress("bench", f"{name} skipped: {reason}")
        return {"status": prep["status"], "reason": reason}
    spec = prep["spec"]
    if a.fresh_int16_copy and spec.get("weights") != "exact":  # 8b-exact makes no copy: keep the 8b's
        for copy in int16_copies(spec):
            progress("bench", f"deleting {copy} (--fresh-int16-copy): the first load makes it again")
            copy.unlink()
    llama = LlamaBench(f"{name}/llama.cpp", a.llama_bench, spec["f32_gguf"], threads) \
        if spec.get("f32_gguf") else None
    runs = [e for e in a.engines if e not in spec.get("unavailable", {})] + (["llama.cpp"] if llama else [])
    progress("bench", f"=== {name}: {' and '.join(runs)}, interleaved ===")
    measured = measure_engines(a, name, spec, threads, quiet, llama)
    return {"status": "ok", "spec": spec, "settings": engine_cfg(a, threads),
            "prepare_peak_memory_mb": prep["peak_memory_sampled_mb"], **measured}


def profile_decode(a: argparse.Namespace, name: str, spec: dict, threads: int) -> dict:
    tag = f"{name}/profile"
    progress("bench", f"=== {name}: profiling npllama decode ===")
    prof = run_in_worker(tag, a.threads,
                         ("engine", dict(engine="npllama", spec=spec, cfg=engine_cfg(a, threads))),
                         ("load", {}), ("profile", dict(out=str(a.json.parent / f"profile-{name}.prof"))))
    if prof["status"] == "ok":
        mm = prof["matmuls"]
        progress(tag, f"{prof['steps']} decode steps at context {prof['context']}: "
                 f"{prof['ms_per_token_profiled']:.1f} ms/token under cProfile (stats in "
                 f"{prof['prof_file']}); matmuls {mm['matmul_ms_per_token']:.1f} of "
                 f"{mm['ms_per_token']:.1f} ms/token without it")
    return prof


def main(argv=None) -> int:
    a = parse_args(argv)
    started = time.perf_counter()
    machine = machine_info()
    threads = a.threads or machine.get("numpy_blas_threads") or machine["cores_available"]
    settings = dict(vars(a), threads=threads, cache_dir=str(a.cache_dir), json=str(a.json),
                    markdown=str(a.markdown) if a.markdown else None)
    results = {"created": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": [sys.executable, *sys.argv], "settings": settings, "machine": machine,
               "code": code_info(), "models": {}, "profiles": {}}
    quiet = QuietMachine(a.max_wait, a.wait_budget)
    # Probed before and after the models: the limit is the best median of the two, so a busy
    # moment during one probe does not make every engine look closer to the limit than it is.
    probes = {"start": bandwidth_probe(a, threads, "start")}
    for name in a.models:
        model = results["models"][name] = benchmark_model(a, name, threads, quiet)
        if a.profile and model["status"] == "ok":
            results["profiles"][name] = profile_decode(a, name, model["spec"], threads)
    probes["end"] = bandwidth_probe(a, threads, "end")
    results["bandwidth"] = bandwidth_summary(probes)
    for model in results["models"].values():
        if model["status"] == "ok":
            derive(model, results["bandwidth"].get("limit_gb_s"))
    results["targets"] = check_targets(results["models"])
    results["wall_s"] = time.perf_counter() - started
    results["waited_for_quiet_machine_s"] = quiet.waited
    text = render(results)
    print(text)
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(text + "\n")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=1))
    progress("bench", f"done in {results['wall_s']:.0f}s; JSON in {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
