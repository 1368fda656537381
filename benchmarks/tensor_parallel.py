"""Tensor parallelism: decode on 1 and 2 MPI ranks (one BLAS thread each; an `mpiexec -n N` run a measurement),
resident and streamed, with its time in collectives; the all-reduce's latency; a model of Llama 3 70B and 405B
over many machines at the measured rate."""

import math
import sys
import time
import timeit
from pathlib import Path

import numpy as np
from harness import cell, listed, memory_mb, parser, rounds, run_once, stat, table, write

PROMPT_TOKENS = 16
MPIEXEC = [str(Path(sys.executable).with_name("mpiexec")), "-n"]
FIGURE_UNITS = {"decode_tok_s": "tok/s", "ms_per_token": "ms", "weight_gb_s": "GB/s", "collective_ms_per_token": "ms"}
# Llama 3 70B and Llama 3.1 405B as their params.json give them, and the machines each would need;
# the network: 10 Gb Ethernet, 50 µs a message, 1.25 GB/s (MPICH all-reduces by recursive doubling).
BIG_MODELS = {"Llama 3 70B": (8, dict(dim=8192, n_layers=80, n_heads=64, ffn_dim_multiplier=1.3)),
              "Llama 3.1 405B": (16, dict(dim=16384, n_layers=126, n_heads=128, ffn_dim_multiplier=1.2))}
NETWORK = {"name": "10 Gb Ethernet", "latency_s": 50e-6, "bytes_per_s": 1.25e9}
CONTEXT = 8192
# The scaling model's columns: header, key, format.
SCALING = [("model", "model", "{}"), ("machines", "ranks", "{}"), ("bf16 weights, whole (GB)", "model_gb", "{:.0f}"),
           ("per rank (GB)", "rank_weights_gb", "{:.1f}"), ("read a token per rank (GB)", "rank_read_gb", "{:.1f}"),
           ("KV cache per rank (GB)", "kv_cache_gb", "{:.2f}"), ("one all-reduce (µs)", "all_reduce_us", "{:.0f}"),
           ("compute (s)", "compute_s", "{:.2f}"), ("network (s)", "network_s", "{:.3f}"),
           ("s/token", "seconds_per_token", "{:.2f}")]


def decode(model_path: str, tokens: int, weights: str) -> dict | None:
    """One rank's decode (resident: a float32 copy; streamed: bf16 from the map); rank 0 replies for every rank."""
    import npllama
    from engines import weight_bytes
    model = npllama.load(model_path, max_seq_len=PROMPT_TOKENS + tokens + 1, threads=1,
                         weights_budget=0 if weights == "streamed" else None)
    group, cache = model.group, model.new_cache()
    logits = model.forward(list(np.random.default_rng(0).integers(0, model.args.vocab_size, PROMPT_TOKENS)), 0, cache)
    group.node_barrier()  # the ranks start together
    seconds0, count0, t0 = group.collective_seconds, group.collectives, time.perf_counter()
    for pos in range(PROMPT_TOKENS, PROMPT_TOKENS + tokens):
        logits = model.forward([group.bcast(int(np.argmax(logits[-1])))], pos, cache, last_only=True)
    seconds = time.perf_counter() - t0
    mine = {"decode_tok_s": tokens / seconds, "ms_per_token": 1e3 * seconds / tokens,
            "weight_gb_s": weight_bytes(model, lambda w: getattr(w, "w", w)) * tokens / seconds / 1e9,  # unwrapped
            "collective_ms_per_token": 1e3 * (group.collective_seconds - seconds0) / tokens,
            "collectives_per_token": (group.collectives - count0) / tokens, "rss_anon_mb": memory_mb()["RssAnon"]}
    ranks = group.comm.gather(mine, 0) if group.size > 1 else [mine]
    return {**ranks[0], "ranks": ranks} if group.rank == 0 else None


def all_reduce(dims: list[int], repeats: int = 2000) -> dict | None:
    """Under mpiexec -n 2: the median microseconds of an all-reduce of a [1, dim] float32 vector."""
    from mpi4py import MPI
    comm, us = MPI.COMM_WORLD, {}
    for dim in dims:
        x = np.ones(dim, np.float32)
        times = timeit.repeat(lambda: comm.Allreduce(MPI.IN_PLACE, x), number=1, repeat=100 + repeats)
        us[str(dim)] = 1e6 * float(np.median(times[100:]))  # the first 100 warm up
    return {"us": us} if comm.rank == 0 else None


def scaling_model(name: str, n: int, sizes: dict, gb_s_per_core: float) -> dict:
    """Seconds a token of `name` over n machines, a rank (one core) each: its bf16 weights read at the measured
    rate, plus two all-reduces a layer and the embedding's and the logits' all-gather over NETWORK."""
    from npllama.config import ModelArgs
    from npllama.tensor_parallel import rank_args
    args = ModelArgs(**sizes, n_kv_heads=8, multiple_of=4096, vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0)
    share = rank_args(args, 0, n, name)
    model_gb, rank_gb = (2 * sum(map(math.prod, m.weight_shapes().values())) / 1e9 for m in (args, share))  # bf16
    read_gb = rank_gb - 2 * math.prod(share.weight_shapes()["tok_embeddings.weight"]) / 1e9  # a lookup reads one row
    latency, bandwidth = NETWORK["latency_s"], NETWORK["bytes_per_s"]
    all_reduce = np.log2(n) * (latency + 4 * args.dim / bandwidth)  # one token's [1, dim] float32
    all_gather = np.log2(n) * latency + (n - 1) / n * 4 * args.vocab_size / bandwidth  # the float32 logits
    network = (2 * args.n_layers + 1) * all_reduce + all_gather
    compute = read_gb / gb_s_per_core
    return {"model": name, "ranks": n, "model_gb": model_gb, "rank_weights_gb": rank_gb, "rank_read_gb": read_gb,
            "kv_cache_gb": 2 * share.n_layers * share.n_kv_heads * share.head_dim * 4 * CONTEXT / 1e9,
            "all_reduce_us": 1e6 * all_reduce, "compute_s": compute, "network_s": network,
            "seconds_per_token": compute + network}


def main() -> None:
    from prepare import prepare  # not in the ranks: torch would weigh on their memory
    p = parser(__doc__, "tensor_parallel", tokens=64)
    p.add_argument("--model", default="1b", help="a benchmarks/prepare.py model [%(default)s]")
    p.add_argument("--ranks", type=listed(int), default="1,2", help="MPI processes [%(default)s]")
    p.add_argument("--weights", type=listed(), default="resident,streamed", help="resident, streamed [%(default)s]")
    a = p.parse_args()
    spec = prepare(a.model)
    cases = [{"weights": w, "load": load, "ranks": n} for w in a.weights for load in a.loads for n in a.ranks]
    rounds(cases, lambda c: run_once("tensor_parallel", "decode", MPIEXEC + [str(c["ranks"])], model_path=spec["path"],
                                     tokens=a.tokens, weights=c["weights"]), a.rounds, tag="tp")
    latency = run_once("tensor_parallel", "all_reduce", MPIEXEC + ["2"], dims=[2048, 4096, 8192, 16384])["us"]
    for c in cases:
        c.update({key: stat(c, unit, key) for key, unit in FIGURE_UNITS.items()})
    text = [table(["weights", "load", "ranks", "decode tok/s", "ms/token", "weights read per rank, GB/s",
                   "in collectives, ms/token", "collectives/token", "RssAnon per rank, MB"],
                  [[c["weights"], c["load"], c["ranks"], *(cell(c[key]) for key in FIGURE_UNITS),
                    f"{c['runs'][-1]['collectives_per_token']:.0f}",
                    ", ".join(f"{r['rss_anon_mb']:.0f}" for r in c["runs"][-1]["ranks"])] for c in cases]),
            "All-reduce of one token's [1, dim] float32 vector between 2 ranks (median):",
            table(["dim", "µs"], [[d, f"{us:.1f}"] for d, us in latency.items()])]
    results = {"model": spec["label"], "tokens": a.tokens, "rounds": a.rounds, "all_reduce_us": latency, "runs": cases}
    if one_core := next((c for c in cases if (c["weights"], c["load"], c["ranks"]) == ("streamed", "idle", 1)), None):
        rate = one_core["weight_gb_s"]["median"]
        rows = [scaling_model(name, n, sizes, rate) for name, (n, sizes) in BIG_MODELS.items()]
        results["scaling_model"] = {"gb_s_per_core": rate, "network": NETWORK, "context": CONTEXT, "rows": rows}
        text += [f"Scaling model: a rank a machine, each streaming its bf16 shard at the {rate:.2f} GB/s one core "
                 f"reached above (streamed, 1 rank, idle); {NETWORK['name']}; KV cache at context {CONTEXT}.",
                 table([h for h, _, _ in SCALING], [[f.format(r[k]) for _, k, f in SCALING] for r in rows])]
    write(a.out, f"Tensor parallelism: {spec['label']}, {a.tokens} tokens after a {PROMPT_TOKENS}-token prompt, one "
          f"BLAS thread a rank, median (min-max) of {a.rounds} rounds", "\n\n".join(text), results)


if __name__ == "__main__":
    main()
