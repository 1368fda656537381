"""Tensor parallelism measured: decode of one model on 1 and on 2 processes (mpiexec), one BLAS
thread each, the time each token spends in collectives, and the all-reduce's latency alone.

    python benchmarks/tensor_parallel.py [--model 1b] [--tokens 64] [--rounds 3] [--under-load]

For each round, each configuration runs once, in turn (so that a change in the machine's load
hits both alike): `mpiexec -n N python benchmarks/tensor_parallel.py --worker ...` loads the
model, prefills a 16-token prompt, decodes --tokens greedy tokens and reports from rank 0. With
--under-load every configuration also runs beside a busy loop on one core (machine.Spinner).
Results go to benchmarks/results/tensor_parallel.{json,md}; the README's scaling model of 70B
and 405B over many machines starts from these numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

PROMPT_TOKENS = 16
MPIEXEC = Path(sys.executable).with_name("mpiexec")


def worker(model_path: str, n_tokens: int) -> None:
    """One rank: load, prefill, decode; rank 0 prints the measurements as JSON."""
    import npllama
    from stats import read_memory
    model = npllama.load(model_path, max_seq_len=PROMPT_TOKENS + n_tokens + 1, threads=1)
    group = model.group
    prompt = list(np.random.default_rng(0).integers(0, model.args.vocab_size, PROMPT_TOKENS))
    cache = model.new_cache()
    logits = model.forward(prompt, 0, cache, last_only=True)
    group.barrier()
    seconds0, count0 = group.collective_seconds, group.collectives
    t0 = time.perf_counter()
    for pos in range(PROMPT_TOKENS, PROMPT_TOKENS + n_tokens):
        token = group.bcast(int(np.argmax(logits[-1])))
        logits = model.forward([token], pos, cache, last_only=True)
    seconds = time.perf_counter() - t0
    report = {"rank": group.rank, "ranks": group.size, "decode_tok_s": n_tokens / seconds,
              "ms_per_token": 1e3 * seconds / n_tokens,
              "collective_ms_per_token": 1e3 * (group.collective_seconds - seconds0) / n_tokens,
              "collectives_per_token": (group.collectives - count0) / n_tokens,
              "rss_anon_mb": read_memory().get("RssAnon")}
    reports = group.comm.gather(report, 0) if group.size > 1 else [report]
    if group.rank == 0:
        print(json.dumps(reports))


def all_reduce_latency(dims: list[int], repeats: int = 2000) -> None:
    """Under mpiexec -n 2: the median time of an all-reduce of a [1, dim] float32 vector."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    out = {}
    for dim in dims:
        x = np.ones(dim, np.float32)
        for _ in range(100):
            comm.Allreduce(MPI.IN_PLACE, x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, x)
            times.append(time.perf_counter() - t0)
        out[dim] = 1e6 * float(np.median(times))
    if comm.rank == 0:
        print(json.dumps(out))


def launch(n: int, *args: str) -> str:
    command = [str(MPIEXEC), "-n", str(n)] if n > 1 else []
    done = subprocess.run([*command, sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="1b", help="a benchmarks/prepare.py model name")
    p.add_argument("--tokens", type=int, default=64, help="tokens to decode")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ranks", default="1,2", help="process counts to compare")
    p.add_argument("--under-load", action="store_true", help="also run beside a busy loop on one core")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "TOKENS"), help=argparse.SUPPRESS)
    p.add_argument("--latency", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker[0], int(a.worker[1]))
    dims = [2048, 4096, 8192, 16384]  # Llama 3.2 1B, 3 8B, 3 70B, 3.1 405B
    if a.latency:
        return all_reduce_latency(dims)

    from machine import Spinner, machine_info
    from prepare import default_cache_dir, prepare
    from stats import progress, summary
    spec = prepare(a.model, default_cache_dir())
    ranks = [int(n) for n in a.ranks.split(",")]
    loads = ["idle", "under load"] if a.under_load else ["idle"]
    runs = {(load, n): [] for load in loads for n in ranks}
    for r in range(a.rounds):
        for load in loads:
            spinner = Spinner() if load == "under load" else None
            try:
                for n in ranks:
                    reports = json.loads(launch(n, "--worker", spec["path"], str(a.tokens)))
                    runs[load, n].append(reports)
                    progress("tp", f"round {r + 1}, {load}, {n} rank(s): {reports[0]['decode_tok_s']:.2f} tok/s, "
                             f"{reports[0]['collective_ms_per_token']:.2f} ms/token in collectives")
            finally:
                if spinner:
                    spinner.stop()
    latency = json.loads(launch(2, "--latency"))
    results = {"machine": machine_info(), "model": spec["label"], "tokens": a.tokens, "rounds": a.rounds,
               "all_reduce_us": {int(k): v for k, v in latency.items()}, "runs": []}
    for (load, n), reports in runs.items():
        results["runs"].append({
            "load": load, "ranks": n,
            "decode_tok_s": summary([rep[0]["decode_tok_s"] for rep in reports], "tok/s"),
            "ms_per_token": summary([rep[0]["ms_per_token"] for rep in reports], "ms"),
            "collective_ms_per_token": summary([rep[0]["collective_ms_per_token"] for rep in reports], "ms"),
            "collectives_per_token": reports[0][0]["collectives_per_token"],
            "rss_anon_mb_per_rank": [rank["rss_anon_mb"] for rank in reports[-1]]})
    out = HERE / "results" / "tensor_parallel"
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    lines = [f"# Tensor parallelism: {results['model']}", "",
             f"Decode of {results['tokens']} tokens after a {PROMPT_TOKENS}-token prompt, one BLAS thread per "
             f"rank, median of {results['rounds']} rounds (min-max).", "",
             "| load | ranks | decode tok/s | ms/token | in collectives, ms/token | collectives/token "
             "| RssAnon per rank, MB |", "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        tok, ms, coll = run["decode_tok_s"], run["ms_per_token"], run["collective_ms_per_token"]
        lines.append(f"| {run['load']} | {run['ranks']} | {tok['median']:.2f} ({tok['min']:.2f}-{tok['max']:.2f}) "
                     f"| {ms['median']:.1f} | {coll['median']:.2f} | {run['collectives_per_token']:.0f} | "
                     f"{', '.join(f'{m:.0f}' for m in run['rss_anon_mb_per_rank'])} |")
    lines += ["", "All-reduce of one token's [1, dim] float32 vector between 2 ranks on this machine (median):", "",
              "| dim | µs |", "|---|---|"]
    lines += [f"| {dim} | {us:.1f} |" for dim, us in results["all_reduce_us"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
