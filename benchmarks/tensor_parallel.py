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


def worker(model_path: str, n_tokens: int, weights: str) -> None:
    """One rank: load, prefill, decode; rank 0 prints the measurements as JSON. weights:
    "resident" (a float32 copy in RAM) or "streamed" (bf16 read from the memory map each token)."""
    import npllama
    from stats import read_memory
    model = npllama.load(model_path, max_seq_len=PROMPT_TOKENS + n_tokens + 1, threads=1,
                         weights_budget=0 if weights == "streamed" else None)
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
              "weight_bytes": rank_weight_bytes(model),
              "ms_per_token": 1e3 * seconds / n_tokens,
              "collective_ms_per_token": 1e3 * (group.collective_seconds - seconds0) / n_tokens,
              "collectives_per_token": (group.collectives - count0) / n_tokens,
              "rss_anon_mb": read_memory().get("RssAnon")}
    reports = group.comm.gather(report, 0) if group.size > 1 else [report]
    if group.rank == 0:
        print(json.dumps(reports))


def rank_weight_bytes(model) -> int:
    """Bytes of weights one decode step of this rank reads (worker.npllama_weight_bytes, with the
    collective wrappers of tensor_parallel.py looked through)."""
    from worker import _read_weights, matrix_bytes

    def unwrapped(w):
        return getattr(w, "w", w)
    return sum(matrix_bytes(unwrapped(w)) for layer in model.layers for w in _read_weights(layer)) + \
        matrix_bytes(unwrapped(model.output))


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
    p.add_argument("--weights", default="resident,streamed",
                   help="resident (float32 in RAM) and/or streamed (bf16 from the memory map, as a "
                        "70B shard on a 24 GB machine would run)")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "TOKENS", "WEIGHTS"), help=argparse.SUPPRESS)
    p.add_argument("--latency", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker[0], int(a.worker[1]), a.worker[2])
    dims = [2048, 4096, 8192, 16384]  # Llama 3.2 1B, 3 8B, 3 70B, 3.1 405B
    if a.latency:
        return all_reduce_latency(dims)

    from machine import Spinner, machine_info
    from prepare import default_cache_dir, prepare
    from stats import progress, summary
    spec = prepare(a.model, default_cache_dir())
    ranks = [int(n) for n in a.ranks.split(",")]
    loads = ["idle", "under load"] if a.under_load else ["idle"]
    runs = {(w, load, n): [] for w in a.weights.split(",") for load in loads for n in ranks}
    for r in range(a.rounds):
        for load in loads:
            spinner = Spinner() if load == "under load" else None
            try:
                for w, _, n in [key for key in runs if key[1] == load]:
                    reports = json.loads(launch(n, "--worker", spec["path"], str(a.tokens), w))
                    runs[w, load, n].append(reports)
                    progress("tp", f"round {r + 1}, {w}, {load}, {n} rank(s): {reports[0]['decode_tok_s']:.2f} "
                             f"tok/s, {reports[0]['collective_ms_per_token']:.2f} ms/token in collectives")
            finally:
                if spinner:
                    spinner.stop()
    latency = json.loads(launch(2, "--latency"))
    results = {"machine": machine_info(), "model": spec["label"], "tokens": a.tokens, "rounds": a.rounds,
               "all_reduce_us": {int(k): v for k, v in latency.items()}, "runs": []}
    for (w, load, n), reports in runs.items():
        results["runs"].append({
            "weights": w, "load": load, "ranks": n,
            "weight_gb_s_per_rank": summary([rep[0]["weight_bytes"] * rep[0]["decode_tok_s"] / 1e9
                                             for rep in reports], "GB/s"),
            "decode_tok_s": summary([rep[0]["decode_tok_s"] for rep in reports], "tok/s"),
            "ms_per_token": summary([rep[0]["ms_per_token"] for rep in reports], "ms"),
            "collective_ms_per_token": summary([rep[0]["collective_ms_per_token"] for rep in reports], "ms"),
            "collectives_per_token": reports[0][0]["collectives_per_token"],
            "rss_anon_mb_per_rank": [rank["rss_anon_mb"] for rank in reports[-1]]})
    base = next((run for run in results["runs"] if run["ranks"] == 1 and run["load"] == "idle"
                 and run["weights"] == "streamed"), None)
    if base:
        results["scaling_model"] = {"gb_s_per_core": base["weight_gb_s_per_rank"]["median"],
                                    "network": NETWORK, "context": CONTEXT,
                                    "rows": scaling_model(base["weight_gb_s_per_rank"]["median"])}
    out = HERE / "results" / "tensor_parallel"
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(results))
    print(report(results))


# Llama 3 70B and Llama 3.1 405B as their params.json give them (Meta's llama-models).
BIG_MODELS = {
    "Llama 3 70B": (8, dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                            ffn_dim_multiplier=1.3)),
    "Llama 3.1 405B": (16, dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                                ffn_dim_multiplier=1.2)),
}
# The network of the model: 10 Gb Ethernet, a 50 µs message latency and 1.25 GB/s. MPICH
# all-reduces a short vector by recursive doubling: log2(N) exchanges of the whole vector.
NETWORK = {"name": "10 Gb Ethernet", "latency_s": 50e-6, "bytes_per_s": 1.25e9}
CONTEXT = 8192


def scaling_model(gb_s_per_core: float) -> list[dict]:
    """Time per decoded token of each BIG_MODELS over its N machines, one rank (one core's
    throughput) per machine: the rank's weight bytes read at the measured rate, plus the
    all-reduces after wo and w2 in every layer and the embedding's, plus the logits' all-gather,
    each over NETWORK."""
    from npllama.config import ModelArgs
    from npllama.tensor_parallel import rank_args
    alpha, beta = NETWORK["latency_s"], NETWORK["bytes_per_s"]
    rows = []
    for name, (n, sizes) in BIG_MODELS.items():
        args = ModelArgs(**sizes, vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0)
        share = rank_args(args, 0, n, name)
        shapes = share.weight_shapes()
        bf16_bytes = {k: 2 * int(np.prod(v)) for k, v in shapes.items()}
        resident = sum(bf16_bytes.values())
        read = resident - bf16_bytes["tok_embeddings.weight"]  # a lookup reads one row
        steps = np.log2(n)
        all_reduce = steps * (alpha + 4 * args.dim / beta)  # one token's [1, dim] float32
        all_gather = steps * alpha + (n - 1) / n * 4 * args.vocab_size / beta  # [1, vocab] float32
        kv_cache = 2 * share.n_layers * share.n_kv_heads * share.head_dim * 4 * CONTEXT
        compute = read / (gb_s_per_core * 1e9)
        network = (2 * args.n_layers + 1) * all_reduce + all_gather
        rows.append({"model": name, "ranks": n, "model_gb": 2 * sum(int(np.prod(v)) for v in args.weight_shapes().values()) / 1e9,
                     "rank_weights_gb": resident / 1e9, "rank_read_gb": read / 1e9,
                     "kv_cache_gb": kv_cache / 1e9, "all_reduce_us": 1e6 * all_reduce,
                     "compute_s": compute, "network_s": network, "seconds_per_token": compute + network})
    return rows


def report(results: dict) -> str:
    lines = [f"# Tensor parallelism: {results['model']}", "",
             f"Decode of {results['tokens']} tokens after a {PROMPT_TOKENS}-token prompt, one BLAS thread per "
             f"rank, median of {results['rounds']} rounds (min-max).", "",
             "| weights | load | ranks | decode tok/s | ms/token | weights read per rank, GB/s "
             "| in collectives, ms/token | collectives/token | RssAnon per rank, MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        tok, ms, coll = run["decode_tok_s"], run["ms_per_token"], run["collective_ms_per_token"]
        lines.append(f"| {run['weights']} | {run['load']} | {run['ranks']} | {tok['median']:.2f} "
                     f"({tok['min']:.2f}-{tok['max']:.2f}) | {ms['median']:.1f} | "
                     f"{run['weight_gb_s_per_rank']['median']:.2f} | {coll['median']:.2f} | "
                     f"{run['collectives_per_token']:.0f} | "
                     f"{', '.join(f'{m:.0f}' for m in run['rss_anon_mb_per_rank'])} |")
    lines += ["", "All-reduce of one token's [1, dim] float32 vector between 2 ranks on this machine (median):", "",
              "| dim | µs |", "|---|---|"]
    lines += [f"| {dim} | {us:.1f} |" for dim, us in results["all_reduce_us"].items()]
    if "scaling_model" in results:
        m = results["scaling_model"]
        net = m["network"]
        lines += ["", f"Scaling model: one rank per machine, each streaming its bf16 shard at the "
                      f"{m['gb_s_per_core']:.2f} GB/s one core reached above (streamed, 1 rank, idle); "
                      f"{net['name']} ({1e6 * net['latency_s']:.0f} µs, {net['bytes_per_s'] / 1e9:.2f} GB/s), "
                      f"all-reduce by recursive doubling; KV cache at context {m['context']}.", "",
                  "| model | machines | bf16 weights, whole / per rank (GB) | read per token per rank (GB) "
                  "| KV cache per rank (GB) | one all-reduce (µs) | compute (s) | network (s) | s/token |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['ranks']} | {r['model_gb']:.0f} / {r['rank_weights_gb']:.1f} | "
                  f"{r['rank_read_gb']:.1f} | {r['kv_cache_gb']:.2f} | {r['all_reduce_us']:.0f} | "
                  f"{r['compute_s']:.2f} | {r['network_s']:.3f} | {r['seconds_per_token']:.2f} |"
                  for r in m["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
